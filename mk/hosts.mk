# Two hosts on this machine (kvxfer.hosts; docs/two-hosts.md): prefill in one network namespace,
# decode and the proxy in another, joined by a switch; UCX over TCP between them; partitions by
# taking a link down. Needs root (CAP_NET_ADMIN); elsewhere the tests skip and say why.
#   make test-hosts   the whole suite: topology, the short e2e (also in `make test`) and the long
#                     link-fault tests (READ and WRITE, direct and staged; handshake, transfer, lease),
#                     then the vLLM connector across the two hosts (`make test-vllm-hosts`)
#   make soak-hosts   `kvxfer soak --hosts 2`: 500 requests, link faults added to the fault mix
#                     (docs/reliability.md); SOAK_HOSTS_ARGS adds flags (e.g. --fault-seed N)
SOAK_HOSTS_REQUESTS ?= 500
SOAK_HOSTS_FAULTS ?= 48
SOAK_HOSTS_ARGS ?=

.PHONY: test-hosts soak-hosts

test-hosts: $(STAMP)
	$(PY) -m pytest tests/hosts -m hosts $(PYTEST_ARGS)
	$(MAKE) test-vllm-hosts

soak-hosts: $(STAMP)
	$(VENV)/bin/kvxfer soak --hosts 2 --requests $(SOAK_HOSTS_REQUESTS) --faults $(SOAK_HOSTS_FAULTS) \
		--concurrency $(SOAK_CONCURRENCY) --max-time-s 5400 $(SOAK_HOSTS_ARGS)

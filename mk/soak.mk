# Reliability runs (docs/reliability.md). Not part of `make test`: the soak takes tens of minutes.
#   make soak   the demo topology (prefill TP 2 -> decode TP 4, proxy, CURVE) under 2,000 requests
#               and >= 50 random faults; one table; fails on any wrong, hung or unclear answer or
#               leaked block. SOAK_ARGS adds flags (e.g. --fault-seed N to replay a run).
#   make fuzz   100,000 hostile side-channel inputs and 10,000 HTTP API inputs against real services
SOAK_REQUESTS ?= 2000
SOAK_FAULTS ?= 64
SOAK_CONCURRENCY ?= 4
SOAK_ARGS ?=
FUZZ_SIDECHANNEL_INPUTS ?= 100000
FUZZ_API_INPUTS ?= 10000

.PHONY: soak fuzz fuzz-sidechannel fuzz-api

soak: $(STAMP)
	$(VENV)/bin/kvxfer soak --requests $(SOAK_REQUESTS) --faults $(SOAK_FAULTS) \
		--concurrency $(SOAK_CONCURRENCY) --max-time-s 5400 $(SOAK_ARGS)

fuzz: fuzz-sidechannel fuzz-api

fuzz-sidechannel: $(STAMP)
	KVXFER_FUZZ_INPUTS=$(FUZZ_SIDECHANNEL_INPUTS) $(PY) -m pytest -q -p no:cacheprovider --timeout 0 \
		tests/test_sidechannel_fuzz.py

fuzz-api: $(STAMP)
	KVXFER_API_FUZZ_INPUTS=$(FUZZ_API_INPUTS) $(PY) -m pytest -q -s -p no:cacheprovider --timeout 0 \
		tests/test_api_fuzz.py

# Two commands for a newcomer (README.md): `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast plan bench lint typecheck soak fuzz clean

setup: $(STAMP)

# torch is pinned to the CPU build first: an unpinned torch would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvxfer demo

# The linter, the type checker, the main suite, then the vLLM plugin against a real vLLM in its
# own virtualenv (mk/vllm.mk).
test: $(STAMP)
	$(MAKE) lint typecheck
	$(PY) -m pytest
	$(MAKE) test-vllm

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

plan: $(STAMP)
	$(VENV)/bin/kvxfer plan --prefill-tp 4 --decode-tp 2 --kv-heads 2 --layout flashinfer-hnd

lint: $(STAMP)
	$(VENV)/bin/ruff check kvxfer tests

# The modules mypy passes (settings in pyproject.toml). Grow this list: a module joins once
# `$(PY) -m mypy MODULE` is clean. Not yet: agents/{consumer,producer,endpoint,nixl_agent,
# staged_transfer}, the daemons' services (prefill, decode, service, http,
# cluster), the vLLM worker, scheduler, params, stats and testing.
TYPED := kvxfer/__init__.py kvxfer/attention.py kvxfer/cli.py kvxfer/deadline.py kvxfer/errors.py \
	kvxfer/tables.py kvxfer/layouts kvxfer/planning kvxfer/engine kvxfer/commands kvxfer/soak \
	kvxfer/agents/sidechannel \
	$(addprefix kvxfer/agents/,calibrate.py capability.py compat.py heartbeat.py inbox.py keys.py landings.py limited_log.py \
		leases.py messages.py metrics.py pacing.py peers.py prepare.py staging.py transfer_choice.py unit_copy.py) \
	$(addprefix kvxfer/daemons/,api.py bus.py checks.py commands.py config.py curve.py decode_rank.py \
		enums.py landing.py prefill_rank.py proxy.py rank_setup.py rehearsal.py resolve.py runtime.py settings.py warm.py worker.py) \
	kvxfer/bench \
	$(addprefix kvxfer/integrations/vllm/,__init__.py config.py connector.py)

typecheck: $(STAMP)
	$(PY) -m mypy $(TYPED)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Optional pieces (vLLM plugin tests, soak/fuzz) keep their targets in mk/.
-include mk/*.mk

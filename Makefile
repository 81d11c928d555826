# Two commands for a newcomer (README.md): `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast plan bench lint soak fuzz clean

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

# The main suite, then the vLLM plugin against a real vLLM in its own virtualenv (mk/vllm.mk).
test: $(STAMP)
	$(PY) -m pytest
	$(MAKE) test-vllm

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

plan: $(STAMP)
	$(VENV)/bin/kvxfer plan --prefill-tp 4 --decode-tp 2 --kv-heads 2 --layout flashinfer-hnd

lint: $(STAMP)
	$(VENV)/bin/ruff check kvxfer tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Optional pieces (vLLM plugin tests, soak/fuzz) keep their targets in mk/.
-include mk/*.mk

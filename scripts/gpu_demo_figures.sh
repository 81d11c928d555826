#!/usr/bin/env bash
# The daemons' request latency on a GPU: `kvxfer demo --device cuda --json` per configuration,
# one line of figures each (first request alone, p50 and p99 over the rest). Run from the
# repository root on the GPU machine once kvxfer's wheelhouse is installed
# (../shared/device/make-wheelhouse.sh), e.g.:
#   scripts/gpu_demo_figures.sh "$OUT" tp11        # TP 1 -> 1, bf16, READ and WRITE
#   scripts/gpu_demo_figures.sh "$OUT" tp24        # TP 2 -> 4, fp32, WRITE and READ
# Each demo's full output is kept as OUTDIR/demo-NAME.log.
set -uo pipefail
out=${1:?output directory}
which=${2:-tp11}
export PYTHONUNBUFFERED=1

demo() {
    local name=$1 started
    shift
    started=$(date +%s)
    python3 -m kvxfer.cli demo --device cuda --prompts 16 --json --workdir "/tmp/demo-$name" "$@" \
        > "$out/demo-$name.log" 2>&1
    local rc=$?
    printf '%s rc=%d %ds ' "$name" "$rc" $(( $(date +%s) - started ))
    tail -n 1 "$out/demo-$name.log" | python3 -c '
import json, sys
try:
    d = json.loads(sys.stdin.read())
except ValueError:
    print("no JSON (see the log)"); sys.exit()
keys = ("matched", "total", "first_transfer_ms", "transfer_ms_p50", "transfer_ms_p99")
print(json.dumps({k: round(d[k], 3) if isinstance(d[k], float) else d[k] for k in keys}))'
}

case $which in
    tp11)
        demo tp11-write --dtype bfloat16 --preset small-gpu --prefill-tp 1 --decode-tp 1 --mode write
        demo tp11-read --dtype bfloat16 --preset small-gpu --prefill-tp 1 --decode-tp 1 --mode read ;;
    tp24)
        demo tp24-write --dtype float32 --prefill-tp 2 --decode-tp 4 --mode write
        demo tp24-read --dtype float32 --prefill-tp 2 --decode-tp 4 --mode read ;;
    *) echo "unknown set $which (tp11, tp24)"; exit 2 ;;
esac

#!/usr/bin/env bash
# The staged GPU path's figures (issue 15), each bench once with this tree's kvxfer and once with
# the kvxfer of an earlier commit unpacked at $OLD (the same commands, the same machine, one after
# the other, so the ratios compare like with like). Run from the repository root on the GPU
# machine once kvxfer's wheelhouse is installed (../shared/device/make-wheelhouse.sh):
#   OLD=.old scripts/gpu_staged_bench.sh "$OUT"
set -uo pipefail
out=${1:?output directory}
old=${OLD:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader
cases=(
  "512-tp12   --tokens 512  --decode-tp 2 --plan auto --verify --iters 15"
  "8192-tp12  --tokens 8192 --decode-tp 2 --plan staged --mode write --verify --iters 7"
  "8192-tp11  --tokens 8192 --decode-tp 1 --plan staged --mode write --verify --iters 7"
  "512-tp11   --tokens 512  --decode-tp 1 --plan auto --verify --iters 15"
)
for case in "${cases[@]}"; do
    name=${case%% *}; args=${case#* }
    for tree in new ${old:+old}; do
        root=$PWD; [ "$tree" = old ] && root=$PWD/$old
        started=$(date +%s)
        PYTHONPATH=$root:${PYTHONPATH:-} timeout 120 python3 -m kvxfer.cli bench --device cuda $args --json \
            > "$out/bench-$name-$tree.log" 2>&1
        echo "== $name $tree rc=$? $(( $(date +%s) - started ))s"
        tail -1 "$out/bench-$name-$tree.log" | python3 -c '
import json, sys
try:
    r = json.loads(sys.stdin.read())
except ValueError:
    sys.exit("no JSON line")
print(f"  plan {r[\"plan\"]} {r[\"bytes\"] / 2**20:.0f} MiB: {r[\"gbps\"]:.1f} GB/s (device copy {r[\"memcpy_gbps\"]:.0f}), "
      f"ms {r[\"transfer_ms_all\"]}, phases {r.get(\"phases_ms\")}, verified {r[\"verified\"]}")' \
            || tail -5 "$out/bench-$name-$tree.log"
    done
done

#!/usr/bin/env bash
# The staged GPU path's figures (issue 15), each bench once with this tree's kvxfer and once with
# the kvxfer of an earlier commit unpacked at $OLD (the same commands, the same machine, one after
# the other, so the ratios compare like with like). Run from the repository root on the GPU
# machine once kvxfer's wheelhouse is installed (../shared/device/make-wheelhouse.sh):
#   OLD=.old scripts/gpu_staged_bench.sh "$OUT"      # ONLY=REGEX: just the cases it names
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
summary='
import json, statistics, sys
r = json.loads(sys.stdin.read().strip())
plan, mib, gbps, copy = r["plan"], r["bytes"] / 2**20, r["gbps"], r["memcpy_gbps"]
ms, phases, verified = statistics.median(r["transfer_ms_all"]), r.get("phases_ms"), r["verified"]
print(f"  {plan} {mib:.0f} MiB: {gbps:.1f} GB/s, median {ms:.3f} ms (device copy {copy:.0f} GB/s), "
      f"phases {phases}, verified {verified}")'
for case in "${cases[@]}"; do
    name=${case%% *}; args=${case#* }
    [[ $name =~ ${ONLY:-.} ]] || continue
    for tree in new ${old:+old}; do
        root=$PWD; [ "$tree" = old ] && root=$PWD/$old
        started=$(date +%s)
        PYTHONPATH=$root:${PYTHONPATH:-} timeout 120 python3 -m kvxfer.cli bench --device cuda $args --json \
            > "$out/bench-$name-$tree.log" 2>&1
        echo "== $name $tree rc=$? $(( $(date +%s) - started ))s"
        tail -1 "$out/bench-$name-$tree.log" | python3 -c "$summary" || tail -5 "$out/bench-$name-$tree.log"
    done
done

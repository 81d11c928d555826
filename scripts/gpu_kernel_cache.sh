#!/usr/bin/env bash
# Kernels ahead of time on a GPU: `kvxfer warmup` into an empty kernel cache, then the daemons'
# demos started from that cache (as a restarted pod would be), counting what each service
# compiled and loaded, and checking the cache was only read. Run from the repository root on the
# GPU machine once kvxfer's wheelhouse is installed (../shared/device/make-wheelhouse.sh):
#   scripts/gpu_kernel_cache.sh "$OUT"            # TP 1 -> 1 (bf16, small-gpu) and TP 2 -> 4 (fp32)
set -uo pipefail
out=${1:?output directory}
cache=${KERNEL_CACHE:-/tmp/kvxfer-kernels}
export PYTHONUNBUFFERED=1
rm -rf "$cache" ~/.triton/cache ~/.cache/flashinfer
started=$(date +%s)
python3 -m kvxfer.cli warmup --model small-gpu --dtype bfloat16 --pairs 1:1 --cache-dir "$cache" > "$out/warmup-small-gpu.log" 2>&1
echo "warmup small-gpu rc=$? $(( $(date +%s) - started ))s: $(grep -h 'warmup: .* staging copiers' "$out/warmup-small-gpu.log" | cut -d: -f4-)"
python3 -m kvxfer.cli warmup --model tiny-demo --dtype float32 --tp 2 4 --pairs 2:4 --cache-dir "$cache" > "$out/warmup-tiny-demo.log" 2>&1
echo "warmup tiny-demo rc=$? $(( $(date +%s) - started ))s: $(grep -h 'warmup: .* staging copiers' "$out/warmup-tiny-demo.log" | cut -d: -f4-)"
listing() { (cd "$cache" && find . -type f -print0 | sort -z | xargs -0 md5sum); }
listing > "$out/cache-before.txt"
echo "kernel cache: $(wc -l < "$out/cache-before.txt") files"
chmod -R a-w "$cache"
rm -rf ~/.triton/cache ~/.cache/flashinfer  # nothing else to load from
KVXFER_KERNEL_CACHE=$cache bash scripts/gpu_demo_figures.sh "$out" tp11
KVXFER_KERNEL_CACHE=$cache bash scripts/gpu_demo_figures.sh "$out" tp24
listing > "$out/cache-after.txt"
if cmp -s "$out/cache-before.txt" "$out/cache-after.txt"; then echo "kernel cache unchanged by the demos"; else echo "kernel cache CHANGED"; fi
for demo in tp11-write tp11-read tp24-write tp24-read; do
    logs=(/tmp/demo-$demo/*.log)
    echo "$demo: kernels compiled $(cat "${logs[@]}" | grep -c 'kvxfer.kernels: kernel compiled'), after ready $(cat "${logs[@]}" | grep -c 'kernel compiled after ready'), loaded from the cache $(cat "${logs[@]}" | grep -c 'kernel loaded from the cache')"
    grep -h -E "kernel compiled|met producer" "${logs[@]}" | cut -c1-300
done

#!/usr/bin/env bash
# Issue 5: the batch job on 1, 2, 4 and 8 GPUs, one engine per GPU, plus tensor-parallel engines for the 2B
# shape. One call per shape and tile budget (each under 10 minutes on 8 GPUs):
#   run(command="bash bench/scripts/scaling.sh 1b 1", carry=[".devsite"], kind="nvidia-h100-x8")
#   run(command="bash bench/scripts/scaling.sh 2b 12", carry=[".devsite"], kind="nvidia-h100-x8")
# The table's "vs raylens on 1 GPU (efficiency)" column is the figure the issue targets (90% at 8 GPUs).
# On a smaller kind it stops at the machine's GPU count. Results and each contender's log land in $OUT.
set -u -o pipefail
size=${1:?usage: $0 1b|2b TILES}; tiles=${2:?usage: $0 1b|2b TILES}
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
nvidia-smi -L
gpus=$(nvidia-smi -L | wc -l)
contenders="raylens"
for n in 2 4 8; do [ "$n" -le "$gpus" ] && contenders="$contenders raylens@x$n"; done
if [ "$size" = 2b ]; then
    for n in 1 2 4; do [ $((2 * n)) -le "$gpus" ] && contenders="$contenders raylens@x${n}tp2"; done
fi
# Enough images that every engine gets many batches: fill and drain must not dominate the window.
images=$(( tiles > 4 ? 256 * gpus : 2048 * gpus ))
timeout 590 python -m bench.throughput --sizes "$size" --tiles "$tiles" --images "$images" --images-many-tiles "$images" \
    --contenders $contenders --timeout 150 --out "$OUT/scaling-$size-t$tiles.json" 2>&1 | grep -E '^\|'
mkdir -p "$OUT/logs"; cp /tmp/raylens-bench/*.log "$OUT/logs/" 2>/dev/null

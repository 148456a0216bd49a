#!/usr/bin/env bash
# Issue 5: the batch job on 1, 2, 4 and 8 GPUs, one engine per GPU, plus tensor-parallel engines for the 2B
# shape. One call per shape, tile budget and layout family (each about 6-9 minutes on 8 GPUs):
#   run(command="bash bench/scripts/scaling.sh 1b 1 x", carry=[".devsite"], kind="nvidia-h100-x8")
#   run(command="bash bench/scripts/scaling.sh 2b 12 tp", carry=[".devsite"], kind="nvidia-h100-x8")
# x: one engine per GPU on 1, 2, 4, 8 GPUs; tp: engines of 2 GPUs (lmdeploy tp=2) on 2, 4, 8 GPUs.
# The table's "vs raylens on 1 GPU (efficiency)" column is the figure the issue targets (90% at 8 GPUs).
# On a smaller kind it stops at the machine's GPU count. Results and each contender's log land in $OUT.
set -u -o pipefail
usage="usage: $0 1b|2b TILES x|tp"
size=${1:?$usage}; tiles=${2:?$usage}; family=${3:?$usage}
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
nvidia-smi -L
gpus=$(nvidia-smi -L | wc -l)
contenders="raylens"
for n in 2 4 8; do
    [ "$family" = x ] && [ "$n" -le "$gpus" ] && contenders="$contenders raylens@x$n"
    [ "$family" = tp ] && [ "$n" -le "$gpus" ] && contenders="$contenders raylens@x$((n / 2))tp2"
done
# As many images as fit the 10-minute call with the 1-GPU run included (about 80 images/s at 1 tile and
# 22 at 12 tiles on one GPU): every engine still gets many batches, so filling and draining stay small.
images=$(( tiles > 4 ? 256 * gpus : 1024 * gpus ))
timeout 590 python -m bench.throughput --sizes "$size" --tiles "$tiles" --images "$images" --images-many-tiles "$images" \
    --contenders $contenders --timeout 200 --out "$OUT/scaling-$size-t$tiles-$family.json" 2>&1 | grep -E '^\|'
mkdir -p "$OUT/logs"; cp /tmp/raylens-bench/*.log "$OUT/logs/" 2>/dev/null

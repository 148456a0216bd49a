#!/usr/bin/env bash
# For the next GPU session (written in session 8, not yet run): issue 13's speed goal after the loader's bf16 pixels
# (one H200, about 8 minutes).
#   run(command="bash bench/scripts/s9_call4.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# bench.finetune_compare, 2B shape, 6 tiles, LoRA r 16, bf16, gradient checkpointing, 120 measured steps after 20:
#   a: each contender with its own torch threads (the Ray worker 3, the plain process 16), as session 8 measured
#      0.917x; b: both with 16 (--threads 16): what is left of the gap once the thread counts are equal.
#   -> $OUT/finetune-2b-t6-{a,b}.json
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
for run in a b; do
  (( SECONDS + 250 < 590 )) || { echo "no time for finetune_compare $run"; break; }
  extra=(); [ "$run" = b ] && extra=(--threads 16)
  timeout $((585 - SECONDS)) python -m bench.finetune_compare --size 2b --tiles 6 --images 64 --steps 140 --warmup-steps 20 \
    --batch-size 2 --timeout 170 --contenders raylens plain --workdir /tmp/finetune-compare "${extra[@]}" \
    --out "$OUT/finetune-2b-t6-$run.json" > "$OUT/finetune-compare-$run.log" 2>&1
  echo "finetune_compare $run rc=$? after ${SECONDS}s"; grep -vE "^\(|INFO|WARNING|^\s*$" "$OUT/finetune-compare-$run.log" | tail -6
done

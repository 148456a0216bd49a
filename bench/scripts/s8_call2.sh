#!/usr/bin/env bash
# For the next GPU session (written in session 7, not yet run): issue 13's speed goal with a longer window
# (one H200, about 7.5 minutes).
#   run(command="bash bench/scripts/s8_call2.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# bench.finetune_compare, 2B shape, 6 tiles, LoRA r 16, bf16, gradient checkpointing, 120 measured steps after
#    20 of warm-up: jobs.finetune --workers 1 against the plain loop, twice (session 6 measured 0.91x over 20 steps,
#    and the plain loop alone varied 3.26-4.04 samples/s between calls).  -> $OUT/finetune-2b-t6-{a,b}.json
# RAYLENS_FINETUNE_B_ARGS: more bench.finetune_compare flags for round b only (session 8 ran it without; next:
#    RAYLENS_FINETUNE_B_ARGS="--threads 16", the same torch threads in both contenders).
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
for run in a b; do
  (( SECONDS + 250 < 590 )) || { echo "no time for finetune_compare $run"; break; }
  extra=(); [ "$run" = b ] && read -r -a extra <<< "${RAYLENS_FINETUNE_B_ARGS:-}"
  timeout $((585 - SECONDS)) python -m bench.finetune_compare --size 2b --tiles 6 --images 64 --steps 140 --warmup-steps 20 \
    --batch-size 2 --timeout 170 --contenders raylens plain --workdir /tmp/finetune-compare "${extra[@]}" \
    --out "$OUT/finetune-2b-t6-$run.json" > "$OUT/finetune-compare-$run.log" 2>&1
  echo "finetune_compare $run rc=$? after ${SECONDS}s"; grep -vE "^\(|INFO|WARNING|^\s*$" "$OUT/finetune-compare-$run.log" | tail -6
done

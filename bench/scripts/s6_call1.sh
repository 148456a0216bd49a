#!/usr/bin/env bash
# Session 6, first GPU call (one H200, about 9 minutes):
#   run(command="bash bench/scripts/s6_call1.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# 1. The GPU tests of every lmdeploy path not yet run on a GPU, in one pytest session (one Ray instance):
#    InternVL2.5/3 tiny checkpoints in both formats on lmdeploy (issue 11), conversations/streams/stops, the
#    demo model on both engines, the endpoint inside Serve on lmdeploy (issue 12), the merged model on lmdeploy
#    and jobs.finetune on a CUDA worker with DDP and FSDP (issue 13).  -> $OUT/gpu-tests.log
# 2. bench.finetune_compare on a random 2B-shaped checkpoint, 6 tiles + thumbnail, batch 2, LoRA r 16, bf16,
#    gradient checkpointing: jobs.finetune --workers 1 vs a plain transformers+peft loop, plus the FSDP smoke
#    run (issue 13).  -> $OUT/finetune-2b-t6.json
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT  # the carried Ray has no dashboard build
nvidia-smi -L
export LMDEPLOY_ENABLE_CHECK_ENV=0
E=tests/raylens/engines/test_lmdeploy_engine.py
SECONDS=0
LMDEPLOY_SKIP_WARMUP=1 timeout 290 python -m pytest -v -m gpu -p no:cacheprovider --durations=0 \
    "$E::test_lmdeploy_runs_internvl2_5_and_internvl3_checkpoints" \
    "$E::test_lmdeploy_conversations_streams_stops_and_errors[internlm2-raylens]" \
    "$E::test_demo_model_captions_identically_on_both_engines[raylens]" \
    tests/serve/test_endpoint_gpu.py tests/jobs/test_merge.py tests/jobs/test_finetune_gpu.py \
    > $OUT/gpu-tests.log 2>&1
echo "gpu tests rc=$? after ${SECONDS}s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/gpu-tests.log | tail -20
left=$((575 - SECONDS))
(( left > 120 )) || { echo "no time left for finetune_compare (${left}s)"; exit 0; }
per=$(( (left - 60) / 3 ))
timeout $left python -m bench.finetune_compare --size 2b --tiles 6 --images 64 --steps 30 --warmup-steps 10 \
  --batch-size 2 --timeout $per --workdir /tmp/finetune-compare --out "$OUT/finetune-2b-t6.json" > $OUT/finetune-compare.log 2>&1
echo "finetune_compare rc=$? after ${SECONDS}s (${per}s per contender)"
grep -vE "^\(|INFO|WARNING|^\s*$" $OUT/finetune-compare.log | tail -25

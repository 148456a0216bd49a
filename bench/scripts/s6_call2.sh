#!/usr/bin/env bash
# Session 6, second GPU call (one H200, about 8 minutes), after the fixes call 1 asked for:
#   run(command="bash bench/scripts/s6_call2.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# 1. GPU tests: the -hf InternVL2.5/3 checkpoints on lmdeploy (their processor now names a video token), answers
#    cut inside a UTF-8 character (the engine decodes token ids itself), the endpoint's concurrent streams, and
#    the paths the decoding change touches (conversations/streams/stops in both preprocessing modes, the demo
#    model on both engines).  -> $OUT/gpu-tests.log
# 2. bench.finetune_compare (2B shape, 6 tiles, LoRA r 16, bf16, gradient checkpointing): jobs.finetune
#    --workers 1 vs the plain loop, and the FSDP smoke run, each contender's whole log kept.
#    -> $OUT/finetune-2b-t6.json, $OUT/finetune-*.log
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
E=tests/raylens/engines/test_lmdeploy_engine.py
SECONDS=0
LMDEPLOY_SKIP_WARMUP=1 timeout 240 python -m pytest -v -m gpu -p no:cacheprovider --durations=0 \
    "$E::test_lmdeploy_runs_internvl2_5_and_internvl3_checkpoints" \
    "$E::test_answers_cut_inside_a_character_keep_their_text" \
    "$E::test_lmdeploy_conversations_streams_stops_and_errors[internlm2-raylens]" \
    "$E::test_lmdeploy_conversations_streams_stops_and_errors[qwen2-lmdeploy]" \
    "$E::test_demo_model_captions_identically_on_both_engines" \
    "$E::test_demo_model_stops_where_the_transformers_engine_stops" \
    tests/serve/test_endpoint_gpu.py > $OUT/gpu-tests.log 2>&1
echo "gpu tests rc=$? after ${SECONDS}s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/gpu-tests.log | tail -16
left=$((585 - SECONDS))
(( left > 150 )) || { echo "no time left for finetune_compare (${left}s)"; exit 0; }
timeout $left python -m bench.finetune_compare --size 2b --tiles 6 --images 64 --steps 30 --warmup-steps 10 \
  --batch-size 2 --timeout 200 --workdir /tmp/finetune-compare --out "$OUT/finetune-2b-t6.json" > $OUT/finetune-compare.log 2>&1
echo "finetune_compare rc=$? after ${SECONDS}s"
for f in /tmp/finetune-compare/*.log; do cp "$f" "$OUT/finetune-$(basename $f)"; done
grep -vE "^\(|INFO|WARNING|^\s*$" $OUT/finetune-compare.log | tail -12

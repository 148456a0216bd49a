#!/usr/bin/env bash
# For the next GPU session (written in session 8, not yet run), after s9_call1.sh on the warm machine: issue 16 at
# 1 tile, lmdeploy's admission of a wave (one H200, about 8 minutes).
#   run(command="bash bench/scripts/s9_call3.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# Session 8's timeline: lmdeploy moves a wave of 256 one-tile requests from waiting to running 30-60 at a time over
# ~1.2 s (8192-token prefill budget: ~29 prompts of ~280 tokens a step, between decode steps). A larger budget
# admits more per step. raylens with --tiles-on-cpu and 16384 / 32768 prefill tokens, then 32768 double-buffered.
# Compare with s9_call1.sh's runs (same images, same machine).
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
LIMIT=${RAYLENS_CALL_LIMIT_S:-590}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32 --tiles 1 --images 4096 --contenders raylens --tiles-on-cpu"
source bench/scripts/step.sh
bench_inputs 4096
step i16-2b-t1-raylens-tiles-on-cpu-prefill16k 140 --engine-options '{"max_prefill_token_num": 16384}'
step i16-2b-t1-raylens-tiles-on-cpu-prefill32k 140 --engine-options '{"max_prefill_token_num": 32768}'
step i16-2b-t1-raylens-tiles-on-cpu-prefill32k-db16 140 --batches-in-flight 16 \
    --engine-options '{"max_prefill_token_num": 32768, "max_batch_size": 256}'
python -m bench.throughput table $OUT/i16-2b-*.json

#!/usr/bin/env bash
# Session 7, first GPU call (one H200, about 9.5 minutes): issue 16 at 1 tile, side by side in one call.
#   run(command="bash bench/scripts/s7_call1.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# 2B shape, 640x480 JPEGs, greedy, 64 new tokens with ignore_eos:
#   the plain pipeline; raylens with the job's defaults (8 batches of 32 in flight per engine);
#   raylens double-buffered (16 batches in flight, lmdeploy max_batch_size 256: the next wave is queued in
#   the engine while one runs); then the 1B puzzle's CPU reproduction and, if it fits, raylens at 12 tiles
#   with a prefill budget of 16384 tokens (four 12-tile prompts of 3,514 tokens per prefill step instead of two).
# s7_call2.sh (12 tiles and the mixed workload) follows on the warm machine; the images stay in /tmp.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
nvidia-smi -L
LIMIT=${RAYLENS_CALL_LIMIT_S:-585}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32"
source bench/scripts/step.sh
timeout 100 python -c "from pathlib import Path; from bench.throughput import ensure_checkpoint; from bench.data import \
write_images; w = Path('/tmp/raylens-bench'); ensure_checkpoint(w, '2b'); write_images(w / 'images', 4096)"
echo "images and checkpoint rc=$? after ${SECONDS}s"
step i16-2b-t1-pipeline 125 --tiles 1 --images 1536 --contenders pipeline
step i16-2b-t1-raylens 110 --tiles 1 --images 4096 --contenders raylens
step i16-2b-t1-raylens-db16 110 --tiles 1 --images 4096 --contenders raylens --batches-in-flight 16 \
    --engine-options '{"max_batch_size": 256}'
timeout 25 python -m bench.omp_straggler --out $OUT/i16-omp-straggler.json | tail -9
step i16-2b-t12-raylens-prefill16k 100 --tiles 12 --images-many-tiles 512 --contenders raylens \
    --engine-options '{"max_prefill_token_num": 16384}'
python -m bench.throughput table $OUT/i16-2b-*.json

#!/usr/bin/env bash
# Session 7, third GPU call (one H200, about 9 minutes): raylens at 1 tile again (in s7_call1.sh both raylens
# runs of 4096 images passed their 110 s and the benchmark's pipe reading hung; it now writes to files), with
# 2048 images and room to finish, default and double-buffered; then the lmdeploy engine's GPU tests, not run
# since the stop-string fix (944ba60).
#   run(command="bash bench/scripts/s7_call3.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
LIMIT=${RAYLENS_CALL_LIMIT_S:-590}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32"
source bench/scripts/step.sh
timeout 80 python -c "from pathlib import Path; from bench.throughput import ensure_checkpoint; from bench.data import \
write_images; w = Path('/tmp/raylens-bench'); ensure_checkpoint(w, '2b'); write_images(w / 'images', 2048)"
echo "images and checkpoint rc=$? after ${SECONDS}s"
step i16-2b-t1-raylens 160 --tiles 1 --images 2048 --contenders raylens
cp /tmp/raylens-bench/raylens-2b-t1.log $OUT/logs/i16-2b-t1-raylens.contender.log 2>/dev/null
step i16-2b-t1-raylens-db16 160 --tiles 1 --images 2048 --contenders raylens --batches-in-flight 16 \
    --engine-options '{"max_batch_size": 256}'
cp /tmp/raylens-bench/raylens-2b-t1.log $OUT/logs/i16-2b-t1-raylens-db16.contender.log 2>/dev/null
python -m bench.throughput table $OUT/i16-2b-*.json
left=$((LIMIT - SECONDS - 5))
(( left > 60 )) || { echo "no time left for the GPU tests (${left}s)"; exit 0; }
LMDEPLOY_SKIP_WARMUP=1 timeout $left python -m pytest -v -m gpu -p no:cacheprovider --durations=5 \
    tests/raylens/engines/test_lmdeploy_engine.py > $OUT/gpu-tests.log 2>&1
echo "gpu tests rc=$? after ${SECONDS}s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/gpu-tests.log | tail -20

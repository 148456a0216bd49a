#!/usr/bin/env bash
# Session 7, fourth GPU call (one H200, about 5 minutes): raylens at 1 tile with the engine process's GIL
# switch interval at 0.5 ms instead of Python's 5 ms (LMDeployEngine's gil_switch_interval_ms), with the
# job's defaults and double-buffered. s7_call3.sh's timelines showed requests held by the engine actor but
# not yet in lmdeploy: ~0.9 s per wave with 8 batches in flight, and ~32 requests/s admitted with 16 while
# lmdeploy decoded (the preprocessing threads waiting for the GIL the engine's loop holds).
#   run(command="bash bench/scripts/s7_call4.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=...)
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
LIMIT=${RAYLENS_CALL_LIMIT_S:-300}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32"
source bench/scripts/step.sh
timeout 70 python -c "from pathlib import Path; from bench.throughput import ensure_checkpoint; from bench.data import \
write_images; w = Path('/tmp/raylens-bench'); ensure_checkpoint(w, '2b'); write_images(w / 'images', 2560)"
echo "images and checkpoint rc=$? after ${SECONDS}s"
step i16-2b-t1-raylens-gil05 115 --tiles 1 --images 2560 --contenders raylens --engine-options '{"gil_switch_interval_ms": 0.5}'
cp /tmp/raylens-bench/raylens-2b-t1.log $OUT/logs/i16-2b-t1-raylens-gil05.contender.log 2>/dev/null
step i16-2b-t1-raylens-gil05-db16 115 --tiles 1 --images 2560 --contenders raylens --batches-in-flight 16 \
    --engine-options '{"gil_switch_interval_ms": 0.5, "max_batch_size": 256}'
cp /tmp/raylens-bench/raylens-2b-t1.log $OUT/logs/i16-2b-t1-raylens-gil05-db16.contender.log 2>/dev/null
python -m bench.throughput table $OUT/i16-2b-*.json

#!/usr/bin/env bash
# For the next GPU session (written in session 8, not yet run): issue 16 at 1 tile, side by side in one call
# (one H200, about 9.5 minutes).
#   run(command="bash bench/scripts/s9_call1.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# 2B shape, 640x480 JPEGs, greedy, 64 new tokens with ignore_eos; 4096 images per raylens run:
#   the plain pipeline; raylens with the job's defaults; raylens with --tiles-on-cpu (tiles cut and normalised
#   into bf16 by the CPU stage: session 8's timelines showed the engine actor holding 256 requests that lmdeploy
#   had not received yet for ~0.7 s of every ~3.2 s wave, its preparation threads serialised on the GIL); the
#   same double-buffered (16 batches in flight, max_batch_size 256), which session 7 found starved by that
#   preparation. The images are written by a process pool (seconds).
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
nvidia-smi -L
LIMIT=${RAYLENS_CALL_LIMIT_S:-590}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32"
source bench/scripts/step.sh
bench_inputs 4096
step i16-2b-t1-pipeline 125 --tiles 1 --images 1536 --contenders pipeline
step i16-2b-t1-raylens 140 --tiles 1 --images 4096 --contenders raylens
cp /tmp/raylens-bench/raylens-2b-t1.log $OUT/logs/i16-2b-t1-raylens.contender.log 2>/dev/null
step i16-2b-t1-raylens-tiles-on-cpu 140 --tiles 1 --images 4096 --contenders raylens --tiles-on-cpu
cp /tmp/raylens-bench/raylens-2b-t1.log $OUT/logs/i16-2b-t1-raylens-tiles-on-cpu.contender.log 2>/dev/null
step i16-2b-t1-raylens-tiles-on-cpu-db16 140 --tiles 1 --images 4096 --contenders raylens --tiles-on-cpu \
    --batches-in-flight 16 --engine-options '{"max_batch_size": 256}'
cp /tmp/raylens-bench/raylens-2b-t1.log $OUT/logs/i16-2b-t1-raylens-tiles-on-cpu-db16.contender.log 2>/dev/null
python -m bench.throughput table $OUT/i16-2b-*.json

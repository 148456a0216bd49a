#!/usr/bin/env bash
# Issue 16, first call: where the GPU's idle time goes for raylens on the 2B shape at 1 tile, one lever
# against it, and the 1B/2B puzzle of the plain pipeline. One H200, about 8 minutes:
#   run(command="bash bench/scripts/diagnose_waves.sh", carry=[".devsite"], kind="nvidia-h200")
# Every raylens run records its engine's timeline (held requests, lmdeploy running/waiting every 100 ms,
# batch arrivals: bench/timed_engine.py) beside 100 ms GPU samples; the pipelines time lmdeploy's own
# preprocessing during the run and alone.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
export PATH=/tmp/devsite/py_spy-0.4.3.data/scripts:$PATH
nvidia-smi -L
B="python -m bench.throughput --gpu-sample-ms 100 --timeline"
# 1. the job as it is (8 batches of 32 in flight, lmdeploy's max_batch_size 1024 on an H200), GIL-profiled
timeout 200 $B --sizes 2b --tiles 1 --images 3072 --contenders raylens --timeout 190 \
    --profile $OUT/prof --profile-gil --out $OUT/w-base.json 2>&1 | grep -E '^\| |error|Error' | tail -5
# 2. double buffering: the engine runs at most 256 sequences while 512 are submitted
timeout 170 $B --sizes 2b --tiles 1 --images 3072 --contenders raylens --batches-in-flight 16 \
    --engine-options '{"max_batch_size": 256}' --timeout 160 --out $OUT/w-mbs256.json 2>&1 | grep -E '^\| |error|Error' | tail -5
# 3. the plain pipeline on both shapes, GIL-profiled, its preprocessing timed
timeout 230 $B --sizes 1b 2b --tiles 1 --images 768 --contenders pipeline --timeout 110 \
    --profile $OUT/prof --profile-gil --out $OUT/w-pipe.json 2>&1 | grep -E '^\| |error|Error' | tail -5
gzip -f $OUT/prof/*.txt
ls -la $OUT $OUT/prof

#!/usr/bin/env bash
# Issue 16's figures on one H200, in one device call (about 7 minutes; bench/scripts/final_call2.sh has the
# mixed workload and the 1B reproduction):
#   run(command="bash bench/scripts/issue16_final.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# 2B shape, 640x480 JPEGs (the same files, first N), greedy, 64 new tokens with ignore_eos. Each contender
# gets its own image count so that each has >= 30 s of steady state; `python -m bench.throughput table
# $OUT/i16-2b-t1-*.json` puts them in one table (ratios against the pipeline of the same call):
#   t1: pipeline; raylens with the job's defaults (batch 32 as the bench always used);
#   t12: pipeline; raylens.
# (A double-buffered probe, --batches-in-flight 16 with max_batch_size 256, was cut for device time.)
# Every raylens run records its engine timeline (bench/timed_engine.py).
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # the carried Ray has no dashboard build
nvidia-smi -L
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32"
show() { grep -E '^\| |rror' | grep -v -e '--- |' -e 'contender |' | tail -2; }
timeout 90 python -c "from pathlib import Path; from bench.throughput import ensure_checkpoint; from bench.data import \
write_images; w = Path('/tmp/raylens-bench'); ensure_checkpoint(w, '2b'); write_images(w / 'images', 4096)"
timeout 75 $T --tiles 1 --images 1536 --contenders pipeline --timeout 70 --out $OUT/i16-2b-t1-pipeline.json 2>&1 | show
timeout 110 $T --tiles 1 --images 4096 --contenders raylens --timeout 105 --out $OUT/i16-2b-t1-raylens.json 2>&1 | show
timeout 70 $T --tiles 12 --images-many-tiles 352 --contenders pipeline --timeout 65 --out $OUT/i16-2b-t12-pipeline.json 2>&1 | show
timeout 100 $T --tiles 12 --images-many-tiles 512 --contenders raylens --timeout 95 --out $OUT/i16-2b-t12-raylens.json 2>&1 | show
python -m bench.throughput table $OUT/i16-2b-*.json

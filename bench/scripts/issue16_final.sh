#!/usr/bin/env bash
# Issue 16's figures on one H200, in one device call (about 9 minutes; bench/scripts/final_call2.sh has the
# mixed workload and the 1B reproduction):
#   run(command="bash bench/scripts/issue16_final.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# 2B shape, 640x480 JPEGs (the same files, first N), greedy, 64 new tokens with ignore_eos. Each contender
# gets its own image count so that each has >= 30 s of steady state; `python -m bench.throughput table
# $OUT/i16-2b-*.json` puts them in one table (ratios against the pipeline of the same call):
#   t1: pipeline; raylens with the job's defaults (batch 32 as the bench always used);
#   t12: pipeline; raylens.
# A pipeline run takes ~100 s at 1 tile and more at 12 (start-up ~50 s, its preprocessing probe, exit):
# session 5's 75 s and 70 s killed both. Steps that would not fit in RAYLENS_CALL_LIMIT_S (default 580) are
# skipped and say so. Every raylens run records its engine timeline (bench/timed_engine.py); every run's
# whole log is kept under $OUT/logs.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
nvidia-smi -L
LIMIT=${RAYLENS_CALL_LIMIT_S:-580}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32"
source bench/scripts/step.sh
timeout 90 python -c "from pathlib import Path; from bench.throughput import ensure_checkpoint; from bench.data import \
write_images; w = Path('/tmp/raylens-bench'); ensure_checkpoint(w, '2b'); write_images(w / 'images', 4096)"
step i16-2b-t1-pipeline 125 --tiles 1 --images 1536 --contenders pipeline
step i16-2b-t1-raylens 110 --tiles 1 --images 4096 --contenders raylens
step i16-2b-t12-pipeline 150 --tiles 12 --images-many-tiles 352 --contenders pipeline
step i16-2b-t12-raylens 100 --tiles 12 --images-many-tiles 512 --contenders raylens
python -m bench.throughput table $OUT/i16-2b-*.json

#!/usr/bin/env bash
# For the next GPU session (written in session 9, not yet run): issue 16 at 1 tile, double buffering that reaches
# lmdeploy (one H200, about 9.7 minutes).
#   run(command="bash bench/scripts/s10_call1.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# Session 9's timelines (docs/benchmarks.md, "Session 9"): with tiles made in the CPU stage (now the default) a
# normal wave of 256 requests is 87% busy; what is left is the hand-over between waves (all 8 batches finish in one
# step, Ray Data sends the next 8 over ~0.19 s) and two freezes of the actor's loop. Session 9's 16-in-flight run
# capped lmdeploy at max_batch_size 256, so half its requests waited outside the scheduler; lmdeploy's default on an
# H200 is 1024. Here: the pipeline; raylens as the job runs by default (8 x 32 in flight, a second sample of
# session 9's 129.4); 16 x 32 in flight with lmdeploy's own max_batch_size; 8 x 64 in flight. Each timeline now
# lists the actor's garbage collections of 20 ms or more ("gc").
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
LIMIT=${RAYLENS_CALL_LIMIT_S:-590}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --tiles 1"
source bench/scripts/step.sh
bench_inputs 4096
step i16-2b-t1-pipeline 125 --images 1536 --contenders pipeline --batch-size 32
step i16-2b-t1-raylens 140 --images 4096 --contenders raylens --batch-size 32
step i16-2b-t1-raylens-db16 140 --images 4096 --contenders raylens --batch-size 32 --batches-in-flight 16
step i16-2b-t1-raylens-b64 140 --images 4096 --contenders raylens --batch-size 64
python -m bench.throughput table $OUT/i16-2b-*.json

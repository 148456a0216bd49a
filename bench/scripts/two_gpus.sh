#!/usr/bin/env bash
# The 2-GPU runs of docs/benchmarks.md (device kind nvidia-h100-x2), in one call:
#   run(command="bash bench/scripts/two_gpus.sh", carry=[".devsite"], kind="nvidia-h100-x2")
# Results land in $OUT. Each step has its own time limit so one slow step cannot starve the rest.
set -u -o pipefail
source .devsite/activate.sh
# The carried Ray build has no dashboard web files; without this folder the dashboard dies and ray.init()
# waits ~60 s for it (a pip-installed Ray ships the folder; see docs/benchmarks.md, "Start-up").
mkdir -p /tmp/devsite/ray/dashboard/client/build/static
nvidia-smi -L
W=/tmp/raylens-bench

# 1 GPU vs 2 GPUs (one engine per GPU), InternVL2-1B shape, 1 and 12 tiles.
timeout 230 python -m bench.throughput --sizes 1b --tiles 1 12 --images 2048 --images-many-tiles 384 \
    --contenders raylens raylens@x2 --timeout 120 --out "$OUT/bench-1b-2gpu.json" 2>&1 | tee "$OUT/bench-1b-2gpu.log" | grep -E '^\|'

# The job's CLI as users run it, 2 replicas on 2 GPUs: the 1B shape and the shipped tiny demo model.
timeout 80 python -m jobs.caption --input $W/images --output /tmp/out-1b --overwrite --model $W/internvl2-1b-random \
    --engine lmdeploy --replicas 2 --max-tiles 1 --batch-size 32 --max-new-tokens 64 --ignore-eos 2>&1 | grep -E 'summary|error|shards' | tee "$OUT/cli.log"
timeout 60 python -m jobs.caption --input $W/images --output /tmp/out-demo --overwrite --engine lmdeploy \
    --replicas 2 --batch-size 32 2>&1 | grep -E 'summary|error|shards' | tee -a "$OUT/cli.log"

# 2B shape at 12 tiles: one engine on one GPU vs one engine spanning two (lmdeploy tp=2).
timeout 200 python -m bench.throughput --sizes 2b --tiles 12 --images 64 --images-many-tiles 192 \
    --contenders raylens raylens@tp2 --timeout 95 --out "$OUT/bench-2b-tp2.json" 2>&1 | tee "$OUT/bench-2b-tp2.log" | grep -E '^\|'

#!/usr/bin/env bash
# The 2-GPU runs of docs/benchmarks.md (device kind nvidia-h100-x2), in one call:
#   run(command="bash bench/scripts/two_gpus.sh", carry=[".devsite"], kind="nvidia-h100-x2")
# Results land in $OUT. Each step has its own time limit so one slow step cannot starve the rest.
# Session 2 ran the first two steps at 1 tile (the 12-tile half was cut by its limit) and the tp=2 step
# with a 95 s limit, which it did not meet; the steps below are what is still to measure.
set -u -o pipefail
source .devsite/activate.sh
# The carried Ray build has no dashboard web files; without this folder the dashboard dies and ray.init()
# waits ~60 s for it (a pip-installed Ray ships the folder; see docs/benchmarks.md, "Start-up").
mkdir -p /tmp/devsite/ray/dashboard/client/build/static
nvidia-smi -L
W=/tmp/raylens-bench

# 1 GPU vs 2 GPUs (one engine per GPU), InternVL2-1B shape, 12 tiles (1 tile: 79.0 -> 189.3 images/s in session 2).
timeout 200 python -m bench.throughput --sizes 1b --tiles 12 --images 64 --images-many-tiles 384 \
    --contenders raylens raylens@x2 --timeout 95 --out "$OUT/bench-1b-t12-2gpu.json" 2>&1 | tee "$OUT/bench-1b-t12-2gpu.log" | grep -E '^\|'

# 2B shape, 1 tile, 1 vs 2 GPUs.
timeout 170 python -m bench.throughput --sizes 2b --tiles 1 --images 2048 \
    --contenders raylens raylens@x2 --timeout 80 --out "$OUT/bench-2b-2gpu.json" 2>&1 | tee "$OUT/bench-2b-2gpu.log" | grep -E '^\|'

# One engine spanning both GPUs (lmdeploy tp=2 through the job's placement group), with its whole log.
timeout 200 python -m bench.throughput --sizes 2b --tiles 12 --images 64 --images-many-tiles 96 \
    --contenders raylens@tp2 --timeout 190 --out "$OUT/bench-2b-tp2.json" 2>&1 | grep -E '^\|'
cp $W/raylens-tp2-2b-t12.log "$OUT/tp2.log"

#!/usr/bin/env bash
# The 1- and 2-GPU runs of docs/benchmarks.md (device kind nvidia-h100-x2), in calls of under 10 minutes each:
#   run(command="bash bench/scripts/two_gpus.sh tests", carry=[".devsite"], kind="nvidia-h100-x2")
#   run(command="bash bench/scripts/two_gpus.sh 2b", carry=[".devsite"], kind="nvidia-h100-x2")   # and "... tp2"
# Results land in $OUT, each contender's whole output in $OUT/logs. Each step has its own time limit so one
# slow step cannot starve the rest.
set -u -o pipefail
source .devsite/activate.sh
# The carried Ray build has no dashboard web files; without this folder the dashboard dies and ray.init()
# waits ~60 s for it (a pip-installed Ray ships the folder; see docs/benchmarks.md, "Start-up").
mkdir -p /tmp/devsite/ray/dashboard/client/build/static
nvidia-smi -L
W=/tmp/raylens-bench
keep_logs() { mkdir -p "$OUT/logs"; cp $W/*.log "$OUT/logs/" 2>/dev/null; }
case "${1:-}" in
tests)
    # The GPU tests, the job's four layouts among them (1 GPU, 2 engines on 1 GPU, 2 GPUs, tp=2).
    timeout 330 python -m pytest -m gpu -v -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/pytest-gpu.txt" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed"
    # InternVL2-1B shape at 12 tiles, 1 GPU vs one engine per GPU (1 tile: 79.0 -> 189.3 images/s in session 2).
    timeout 200 python -m bench.throughput --sizes 1b --tiles 12 --images 64 --images-many-tiles 384 \
        --contenders raylens raylens@x2 --timeout 95 --out "$OUT/bench-1b-t12-2gpu.json" 2>&1 | grep -E '^\|'
    keep_logs ;;
2b)
    # InternVL2-2B shape: 1 GPU vs one engine per GPU, at 1 and 12 tiles.
    timeout 330 python -m bench.throughput --sizes 2b --tiles 1 12 --images 1024 --images-many-tiles 256 \
        --contenders raylens raylens@x2 --timeout 80 --out "$OUT/bench-2b-2gpu.json" 2>&1 | grep -E '^\|'
    keep_logs ;;
tp2)
    # One engine over both GPUs (lmdeploy tp=2), InternVL2-2B shape, against one engine on one GPU.
    timeout 400 python -m bench.throughput --sizes 2b --tiles 1 12 --images 1024 --images-many-tiles 256 \
        --contenders raylens raylens@tp2 --timeout 90 --out "$OUT/bench-2b-tp2.json" 2>&1 | grep -E '^\|'
    keep_logs ;;
*) echo "usage: $0 tests|2b|tp2" >&2; exit 2 ;;
esac

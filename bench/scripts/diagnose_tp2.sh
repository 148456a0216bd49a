#!/usr/bin/env bash
# Why `--gpus-per-replica 2` (lmdeploy tp=2 inside the job's engine actor) returned nothing, and the 2-GPU
# figures that do not need it, in one call (device kind nvidia-h100-x2):
#   run(command="bash bench/scripts/diagnose_tp2.sh", carry=[".devsite"], kind="nvidia-h100-x2")
# 1. tp=2 outside Ray Data (lmdeploy starts its own Ray): the GPU test, 100 s.
# 2. tp=2 in the job, the demo model, 120 s, with every Ray worker's Python stack after 75 s.
# 3. InternVL2-1B shape at 12 tiles on 1 GPU vs one engine per GPU (now that an actor queues no more batches
#    than it runs), and the 2B shape at 1 tile the same way.
set -u
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
export PATH="/tmp/devsite/py_spy-0.4.3.data/scripts:$PATH"
nvidia-smi -L
timeout 100 python -m pytest -v -p no:cacheprovider -s tests/raylens/engines/test_lmdeploy_engine.py \
    -k tensor_parallelism > "$OUT/tp2-plain.log" 2>&1
echo "tp2 outside Ray Data rc=$? $(grep -a -E 'PASSED|FAILED|passed|failed' "$OUT/tp2-plain.log" | tail -2)"
ray stop --force > /dev/null 2>&1
( sleep 75; for pid in $(pgrep -f "ray::"); do
    echo "=== $pid $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-120)"; py-spy dump --pid "$pid" 2>&1
  done > "$OUT/tp2-stacks.txt" ) &
start=$(date +%s)
timeout 120 python -m jobs.caption --input examples/images --output /tmp/o-tp2 --overwrite --engine lmdeploy \
    --gpus-per-replica 2 --batch-size 4 > "$OUT/demo-tp2.log" 2>&1
echo "tp2 in the job rc=$? $(( $(date +%s) - start ))s $(grep -ao '"succeeded": [0-9]*' "$OUT/demo-tp2.log")"
ray stop --force > /dev/null 2>&1
wait
timeout 180 python -m bench.throughput --sizes 1b --tiles 12 --images 64 --images-many-tiles 384 \
    --contenders raylens raylens@x2 --timeout 85 --out "$OUT/bench-1b-t12-2gpu.json" 2>&1 | grep -E '^\|'
timeout 170 python -m bench.throughput --sizes 2b --tiles 1 --images 1024 \
    --contenders raylens raylens@x2 --timeout 80 --out "$OUT/bench-2b-t1-2gpu.json" 2>&1 | grep -E '^\|'
mkdir -p "$OUT/logs"; cp /tmp/raylens-bench/*.log "$OUT/logs/" 2>/dev/null

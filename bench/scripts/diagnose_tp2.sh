#!/usr/bin/env bash
# `--gpus-per-replica 2` (lmdeploy tp=2 inside the job's engine actor): the demo model with a 120 s limit,
# its whole log, and the Python stacks of the driver and the engine actor after 80 s; if it succeeds, the
# InternVL2-2B shape at 1 tile on one GPU vs one engine over two (device kind nvidia-h100-x2):
#   run(command="bash bench/scripts/diagnose_tp2.sh", carry=[".devsite"], kind="nvidia-h100-x2")
set -u
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
export PATH="/tmp/devsite/py_spy-0.4.3.data/scripts:$PATH"
nvidia-smi -L
( sleep 80; for pid in $(pgrep -f "jobs.caption|GenerateStage"); do
    echo "=== $pid $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-120)"; py-spy dump --pid "$pid" 2>&1
  done > "$OUT/tp2-stacks.txt" ) &
start=$(date +%s)
timeout 120 python -m jobs.caption --input examples/images --output /tmp/o-tp2 --overwrite --engine lmdeploy \
    --gpus-per-replica 2 --batch-size 4 > "$OUT/demo-tp2.log" 2>&1
rc=$?
echo "tp2 in the job rc=$rc $(( $(date +%s) - start ))s $(grep -ao '"succeeded": [0-9]*' "$OUT/demo-tp2.log")"
grep -a "placement group" "$OUT/demo-tp2.log" | cut -c1-200
ray stop --force > /dev/null 2>&1
wait
[ $rc -eq 0 ] && timeout 170 python -m bench.throughput --sizes 2b --tiles 1 --images 1024 \
    --contenders raylens raylens@tp2 --timeout 75 --out "$OUT/bench-2b-t1-tp2.json" 2>&1 | grep -E '^\|'
mkdir -p "$OUT/logs"; cp /tmp/raylens-bench/*.log "$OUT/logs/" 2>/dev/null

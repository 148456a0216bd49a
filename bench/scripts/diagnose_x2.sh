#!/usr/bin/env bash
# Issue 3's two open GPU items, on 2 GPUs, with whole logs in $OUT:
#   run(command="bash bench/scripts/diagnose_x2.sh", carry=[".devsite"], kind="nvidia-h100-x2")
# 1. The shipped demo model with --replicas 2 died in its engine constructor on 2 H200s. The engine now
#    caps lmdeploy's KV cache at what the model can use (raylens/engines/kv_cache.py); the second run
#    forces the old size (~2.2 M blocks) to show whether that was the cause.
# 2. --gpus-per-replica 2 (lmdeploy tp=2 via the job's placement group) built its engine but returned
#    nothing. If it is still running after 110 s, every Ray worker's Python stack is dumped.
set -u
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
nvidia-smi -L
caption() {
    name=$1; limit=$2; shift 2
    start=$(date +%s)
    timeout "$limit" python -m jobs.caption --input examples/images --output "/tmp/o-$name" --overwrite \
        --engine lmdeploy "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - start ))s $(grep -ao '"succeeded": [0-9]*' "$OUT/$name.log")"
    grep -a "^error:\|num_gpu_blocks\|Error" "$OUT/$name.log" | head -5
    ray stop --force > /dev/null 2>&1
}
caption demo-2-replicas 100 --replicas 2
caption demo-2-replicas-old-kv 100 --replicas 2 --engine-args '{"num_gpu_blocks": 2200000}'
( sleep 110; for pid in $(pgrep -f "ray::"); do
    echo "=== $pid $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-120)"; py-spy dump --pid "$pid" 2>&1
  done > "$OUT/tp2-stacks.txt" ) &
caption demo-tp2 170 --gpus-per-replica 2
wait

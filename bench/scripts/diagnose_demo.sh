#!/usr/bin/env bash
# Open question for the next GPU session (docs/benchmarks.md, "Open"): on 2 H200s the shipped demo model's
# engine actors died while being built (`--replicas 2`); on one H100 the same command with 1 or 2 replicas
# worked. Full logs land in $OUT.
#   run(command="bash bench/scripts/diagnose_demo.sh", carry=[".devsite"], kind="nvidia-h100-x2")
set -u
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
nvidia-smi -L
run() {
    name=$1; shift
    timeout 90 python -m jobs.caption --input examples/images --output "/tmp/o-$name" --overwrite --engine lmdeploy "$@" \
        > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(grep -o '"succeeded": [0-9]*' "$OUT/$name.log")"
    grep -a "^error:" "$OUT/$name.log"
}
run two-replicas --replicas 2
# If the KV cache sized from 0.8 of an H200's memory is what breaks a 3-layer model, a fixed size works:
run two-replicas-fixed-kv --replicas 2 --engine-args '{"num_gpu_blocks": 16384}'
run one-replica

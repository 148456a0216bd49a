#!/usr/bin/env bash
# The 1-GPU levers docs/benchmarks.md ("Where the time goes") lists, each against a baseline run in the
# same call, raylens only (the pipeline figures are in docs/benchmarks.md):
#   run(command="bash bench/scripts/one_gpu_levers.sh", carry=[".devsite"], kind="nvidia-h100-x1")
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
nvidia-smi -L
bench() { name=$1; shift; timeout 150 python -m bench.throughput --sizes 1b --images 2048 --images-many-tiles 384 \
    --timeout 130 --out "$OUT/$name.json" "$@" 2>&1 | grep -E '^\| 1b'; }
bench t1-baseline --tiles 1 --contenders raylens
LMDEPLOY_MULTIMODAL_SESSION_TRIM_COUNT=4096 bench t1-trim4096 --tiles 1 --contenders raylens
bench t1-bif16 --tiles 1 --contenders raylens --batches-in-flight 16
bench t1-r2 --tiles 1 --contenders raylens@r2
bench t12-baseline --tiles 12 --contenders raylens
bench t12-prefill16k --tiles 12 --contenders raylens --engine-options '{"max_prefill_token_num": 16384}'

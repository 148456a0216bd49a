#!/usr/bin/env bash
# Issue 12's endpoint measurement on one H200, in one device call (about 8 minutes):
#   run(command="bash bench/scripts/serve_gpu.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=590)
# 1. the endpoint's GPU tests (lmdeploy engine through Serve: continuous batching, parity, streaming);
# 2. bench.serve_load on a random 2B-shaped checkpoint at 12 tiles: raylens endpoint vs lmdeploy's
#    api_server (C = 1 16 64 256, 12 s per level), plus the batch job's images/s on the same images.
# Results: $OUT/serve-load-2b-t12.json and the logs beside it.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # the carried Ray has no dashboard build
nvidia-smi -L
export LMDEPLOY_ENABLE_CHECK_ENV=0
timeout 200 python -m pytest -q tests/serve/test_endpoint_gpu.py 2>&1 | tail -15
timeout 360 python -m bench.serve_load --size 2b --tiles 12 --concurrency 1 16 64 256 --level-seconds 12 \
    --batch-images 384 --workdir /tmp/serve-load --out "$OUT/serve-load-2b-t12.json" 2>&1 | grep -vE "^\(|INFO|WARNING" | tail -40
cp /tmp/serve-load/api_server.log "$OUT/" 2>/dev/null || true

#!/usr/bin/env bash
# For the next GPU session (written in session 7, not yet run): issue 12's time to first token, the endpoint in
# both layouts against lmdeploy's api_server in one call (one H200, about 8 minutes).
#   run(command="bash bench/scripts/s8_call3.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# 2B shape, 12 tiles, streamed, 64 tokens; C=1 (the TTFT goal) and C=64 (the throughput goal), 12 s per level.
# raylens-single is `layout: single` (the engine in the HTTP replica: one Ray hop less each way). If it meets
# both goals, it can become the GPU default; if only the TTFT one, it is the low-latency choice.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
timeout 580 python -m bench.serve_load --size 2b --tiles 12 --concurrency 1 64 --level-seconds 12 \
  --contenders raylens raylens-single raylens-single-mp api_server --workdir /tmp/serve-load --out "$OUT/serve-load-layouts-2b-t12.json" \
  > $OUT/serve-load.log 2>&1
echo "serve_load rc=$? after ${SECONDS}s"; grep -vE "^\(|INFO|WARNING" $OUT/serve-load.log | tail -30
cp /tmp/serve-load/api_server.log "$OUT/" 2>/dev/null || true

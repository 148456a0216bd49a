#!/usr/bin/env bash
# For the next GPU session (written in session 9, not yet run): issue 12, a layout that meets all three goals
# (one H200, about 8 minutes).
#   run(command="bash bench/scripts/s10_call2.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# Session 9: `layout: single` met the C=1 TTFT goal (0.157 against api_server's 0.160 s at p50) but reached 0.78x the
# batch job at C=64 (13.6 req/s: HTTP, image decoding, tiling and lmdeploy's loop share one process); the split
# layout met C=64 (15.5 req/s, 3.40x api_server, 0.89x the batch job) but not C=1 (0.171 s). Here, at 12 tiles,
# C=1 and C=64: the single layout with two replicas sharing the GPU (two processes, two engines, each with 0.4 of
# the free memory for its KV cache), then the single layout as it is, then api_server, in one call. 20 s levels; the
# results now carry steady_requests_per_s (C / mean latency under full load) beside the wall-time rate.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
L="python -m bench.serve_load --size 2b --tiles 12 --concurrency 1 64 --level-seconds 20 --workdir /tmp/serve-load"
timeout 240 $L --contenders raylens-single --engine-args '{"cache_max_entry_count": 0.4}' \
  --serve-args '{"min_replicas": 2, "max_replicas": 2, "num_gpus": 0.5}' --out "$OUT/serve-load-single-x2-2b-t12.json" \
  > $OUT/serve-load-single-x2.log 2>&1
echo "single x2 rc=$? after ${SECONDS}s"; grep -E "^  C=|one-token|failed" $OUT/serve-load-single-x2.log
timeout $((585 - SECONDS)) $L --contenders raylens-single api_server --out "$OUT/serve-load-single-api-2b-t12.json" \
  > $OUT/serve-load.log 2>&1
echo "single and api_server rc=$? after ${SECONDS}s"; grep -E "^==|^  C=|one-token|failed" $OUT/serve-load.log
cp /tmp/serve-load/api_server.log "$OUT/" 2>/dev/null || true

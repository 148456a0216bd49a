#!/usr/bin/env bash
# Issue 12's endpoint measurement on one H200 (about 9 minutes for everything):
#   run(command="bash bench/scripts/serve_gpu.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=590)
# or in two calls if one is too tight: `serve_gpu.sh tests load` then `serve_gpu.sh batch`.
# Parts (default: all three, in this order):
#   tests  the endpoint's GPU tests (lmdeploy engine inside Serve: concurrent streams, multi-turn, parity with the job)
#   load   bench.serve_load on a random 2B-shaped checkpoint at 12 tiles: raylens endpoint vs lmdeploy's
#          api_server, C = 1 16 64 256, 12 s per level -> $OUT/serve-load-2b-t12.json (+ api_server.log)
#   batch  the batch job's steady-state images/s on the same checkpoint and tiles -> $OUT/serve-batch-2b-t12.json
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # the carried Ray has no dashboard build
nvidia-smi -L
export LMDEPLOY_ENABLE_CHECK_ENV=0
parts=("${@:-tests load batch}")
for part in ${parts[@]}; do
  case $part in
    tests) timeout 200 python -m pytest -q tests/serve/test_endpoint_gpu.py 2>&1 | tail -15 ;;
    load) timeout 330 python -m bench.serve_load --size 2b --tiles 12 --concurrency 1 16 64 256 --level-seconds 12 \
            --contenders raylens api_server --workdir /tmp/serve-load --out "$OUT/serve-load-2b-t12.json" 2>&1 \
            | grep -vE "^\(|INFO|WARNING" | tail -30
          cp /tmp/serve-load/api_server.log "$OUT/" 2>/dev/null || true ;;
    batch) timeout 200 python -m bench.serve_load --size 2b --tiles 12 --contenders batch --batch-images 256 \
             --workdir /tmp/serve-load --out "$OUT/serve-batch-2b-t12.json" 2>&1 | grep -vE "^\(|INFO|WARNING" | tail -5 ;;
    *) echo "unknown part $part (tests | load | batch)"; exit 2 ;;
  esac
done

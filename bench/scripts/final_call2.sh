#!/usr/bin/env bash
# The session's second GPU call, right after issue16_final.sh (about 7 minutes; steps that would not fit
# in RAYLENS_CALL_LIMIT_S, default 430 s, are skipped and say so):
#   run(command="bash bench/scripts/final_call2.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=450)
# 1. The pipeline contender at 1 and 12 tiles (issue16_final.sh's pipeline runs need >75 s with start-up).
# 2. The 1B puzzle's reproduction: bench.omp_straggler (CPU only, on the GPU machine's 16 cores).
# 3. Issue 16's realistic workload (bench.throughput --workload mixed, max tiles 12): pipeline and raylens.
# Each run's whole log is kept under $OUT/logs. The GPU tests are bench/scripts/gpu_tests_subset.sh.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
LIMIT=${RAYLENS_CALL_LIMIT_S:-430}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32"
step() {  # step NAME TIMEOUT ARGS...: one bench run if it fits in what is left of the call
  local name=$1 t=$2; shift 2
  if (( SECONDS + t > LIMIT )); then echo "skipped $name: ${t}s do not fit in the $((LIMIT - SECONDS))s left"; return; fi
  timeout $t $T "$@" --timeout $((t - 5)) --out $OUT/$name.json > $OUT/logs/$name.log 2>&1
  echo "$name rc=$? after ${SECONDS}s"; grep -E '^\| 2b|rror' $OUT/logs/$name.log | tail -3
}
timeout 60 python -c "from pathlib import Path; from bench.throughput import ensure_checkpoint; from bench.data import \
write_images; w = Path('/tmp/raylens-bench'); ensure_checkpoint(w, '2b'); write_images(w / 'images', 1536)"
step i16-2b-t1-pipeline 120 --tiles 1 --images 1536 --contenders pipeline
step i16-2b-t12-pipeline 100 --tiles 12 --images-many-tiles 352 --contenders pipeline
timeout 25 python -m bench.omp_straggler --out $OUT/i16-omp-straggler.json | tail -9
timeout 30 python -c "from bench.data import write_mixed_images; write_mixed_images('/tmp/raylens-bench/images-mixed', 384)"
step i16-2b-mixed-pipeline 75 --workload mixed --tiles 12 --images-many-tiles 256 --contenders pipeline
step i16-2b-mixed-raylens 75 --workload mixed --tiles 12 --images-many-tiles 384 --contenders raylens

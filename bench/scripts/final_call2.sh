#!/usr/bin/env bash
# Issue 16's second GPU call, right after issue16_final.sh on the warm machine (about 6 minutes):
#   run(command="bash bench/scripts/final_call2.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=420)
# 1. The realistic workload (bench.throughput --workload mixed, max tiles 12): pipeline and raylens, each
#    given enough images for >= 30 s of steady state.
# 2. The 1B puzzle's reproduction: bench.omp_straggler (CPU only, on the GPU machine's cores).
# Steps that would not fit in RAYLENS_CALL_LIMIT_S (default 400) are skipped and say so; every run's whole
# log is kept under $OUT/logs. The GPU tests are bench/scripts/gpu_tests_subset.sh.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
LIMIT=${RAYLENS_CALL_LIMIT_S:-400}
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32 --workload mixed --tiles 12"
source bench/scripts/step.sh
timeout 25 python -m bench.omp_straggler --out $OUT/i16-omp-straggler.json | tail -9
timeout 40 python -c "from bench.data import write_mixed_images; write_mixed_images('/tmp/raylens-bench/images-mixed', 512)"
step i16-2b-mixed-pipeline 150 --images-many-tiles 256 --contenders pipeline
step i16-2b-mixed-raylens 140 --images-many-tiles 512 --contenders raylens
python -m bench.throughput table $OUT/i16-2b-mixed-*.json

#!/usr/bin/env bash
# For the next GPU session (written in session 8): issue 16 at 12 tiles and mixed with --tiles-on-cpu (one H200, ~9.5 min):
#   run(command="bash bench/scripts/s9_call2.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# Issue 16 at 12 tiles (pipeline and raylens in one call) and the realistic workload (bench.throughput --workload
# mixed: thumbnails to 12-megapixel photos, answers of 8..128 tokens), pipeline and raylens. RAYLENS_ENGINE_OPTIONS
# (JSON) sets raylens's engine options. Writes the checkpoint and images only where missing.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT/logs  # the carried Ray has no dashboard build
LIMIT=${RAYLENS_CALL_LIMIT_S:-590}
ENGINE=${RAYLENS_ENGINE_OPTIONS:-'{}'}  # raylens's engine options in these runs
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32"
source bench/scripts/step.sh
bench_inputs 1024
step i16-2b-t12-pipeline 150 --tiles 12 --images-many-tiles 352 --contenders pipeline
step i16-2b-t12-raylens 100 --tiles 12 --images-many-tiles 512 --contenders raylens --tiles-on-cpu --engine-options "$ENGINE"
timeout 40 python -c "from bench.data import write_mixed_images; write_mixed_images('/tmp/raylens-bench/images-mixed', 512)"
echo "mixed images rc=$? after ${SECONDS}s"
T="$T --workload mixed --tiles 12"
step i16-2b-mixed-pipeline 150 --images-many-tiles 256 --contenders pipeline
step i16-2b-mixed-raylens 140 --images-many-tiles 512 --contenders raylens --tiles-on-cpu --engine-options "$ENGINE"
python -m bench.throughput table $OUT/i16-2b-*.json

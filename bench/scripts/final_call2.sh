#!/usr/bin/env bash
# The session's second GPU call, right after issue16_final.sh on the warm machine (about 6 minutes):
#   run(command="bash bench/scripts/final_call2.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=400)
# 1. GPU tests of this session's new lmdeploy paths (a subset: the device time of the session allows no
#    more): conversations/streams/stops on lmdeploy, InternVL2.5 and InternVL3 checkpoints, the demo model
#    on both engines after the fidelity changes, the endpoint on lmdeploy, fine-tuning's merged model.
# 2. Issue 16's realistic workload (bench.throughput --workload mixed, max tiles 12): pipeline and raylens,
#    each given enough images for >= 30 s of steady state.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
E=tests/raylens/engines/test_lmdeploy_engine.py
LMDEPLOY_SKIP_WARMUP=1 timeout 175 python -m pytest -q -m gpu -p no:cacheprovider \
    "$E::test_lmdeploy_conversations_streams_stops_and_errors[internlm2-raylens]" \
    "$E::test_lmdeploy_runs_internvl2_5_and_internvl3_checkpoints[internvl2_5-internlm2-internvl_chat]" \
    "$E::test_lmdeploy_runs_internvl2_5_and_internvl3_checkpoints[internvl3-qwen2-internvl_chat]" \
    "$E::test_demo_model_captions_identically_on_both_engines[raylens]" \
    tests/serve/test_endpoint_gpu.py tests/jobs/test_merge.py 2>&1 | tee $OUT/gpu-tests.log | tail -15
T="python -m bench.throughput --gpu-sample-ms 200 --timeline --sizes 2b --batch-size 32 --workload mixed --tiles 12"
show() { grep -E '^\| |rror' | grep -v -e '--- |' -e 'contender |' | tail -2; }
timeout 30 python -c "from bench.data import write_mixed_images; write_mixed_images('/tmp/raylens-bench/images-mixed', 768)"
timeout 85 $T --images-many-tiles 448 --contenders pipeline --timeout 80 --out $OUT/i16-2b-mixed-pipeline.json 2>&1 | show
timeout 100 $T --images-many-tiles 768 --contenders raylens --timeout 95 --out $OUT/i16-2b-mixed-raylens.json 2>&1 | show
python -m bench.throughput table $OUT/i16-2b-mixed-*.json

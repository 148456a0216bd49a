#!/usr/bin/env bash
# GPU tests of the lmdeploy paths added since the last full GPU run (about 3 minutes):
#   run(command="bash bench/scripts/gpu_tests_subset.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=240)
# conversations/streams/stops on lmdeploy, InternVL2.5 and InternVL3 checkpoints, the demo model on both
# engines after the fidelity changes, the endpoint on lmdeploy, fine-tuning's merged model.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
E=tests/raylens/engines/test_lmdeploy_engine.py
LMDEPLOY_SKIP_WARMUP=1 timeout 220 python -m pytest -q -m gpu -p no:cacheprovider \
    "$E::test_lmdeploy_conversations_streams_stops_and_errors[internlm2-raylens]" \
    "$E::test_lmdeploy_runs_internvl2_5_and_internvl3_checkpoints[internvl2_5-internlm2-internvl_chat]" \
    "$E::test_lmdeploy_runs_internvl2_5_and_internvl3_checkpoints[internvl3-qwen2-internvl_chat]" \
    "$E::test_demo_model_captions_identically_on_both_engines[raylens]" \
    tests/serve/test_endpoint_gpu.py tests/jobs/test_merge.py 2>&1 | tee $OUT/gpu-tests.log | tail -15

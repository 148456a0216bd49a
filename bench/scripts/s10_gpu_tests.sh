#!/usr/bin/env bash
# For the next GPU session (written in session 9): the GPU tests, with every log kept under $OUT (one H200, at most
# 9.7 minutes).
#   run(command="bash bench/scripts/s10_gpu_tests.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# First the endpoint's GPU tests in both layouts (session 9: one failure in the `single` layout, most likely
# test_same_answer_as_the_batch_job_on_the_gpu[single], whose report a timeout cut off), then the rest of the GPU
# suite in what time is left (the job's layouts, the engines, fine-tuning's merge). -rA: every outcome's reason.
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
PYTEST="python -m pytest -m gpu -p no:cacheprovider -rA --durations=20"
LMDEPLOY_SKIP_WARMUP=1 timeout 280 $PYTEST -v tests/serve/test_endpoint_gpu.py > $OUT/gpu-tests-endpoint.log 2>&1
echo "endpoint GPU tests rc=$? after ${SECONDS}s"; grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/gpu-tests-endpoint.log | tail -12
left=$((585 - SECONDS))
LMDEPLOY_SKIP_WARMUP=1 timeout $left $PYTEST -v tests --ignore=tests/serve/test_endpoint_gpu.py > $OUT/gpu-tests-rest.log 2>&1
echo "other GPU tests rc=$? after ${SECONDS}s"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" $OUT/gpu-tests-rest.log | tail -40

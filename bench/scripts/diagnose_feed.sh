#!/usr/bin/env bash
# Issue 16, second call: py-spy of the raylens engine actor (all threads, and the GIL holder) in its
# steady state on the 2B shape at 1 tile, and of the plain pipeline on 1B and 2B, with lmdeploy's
# preprocessing timed during the run and alone. One H200, about 5 minutes:
#   run(command="bash bench/scripts/diagnose_feed.sh", carry=[".devsite"], kind="nvidia-h200")
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
export PATH=/tmp/devsite/py_spy-0.4.3.data/scripts:$PATH
P="--self-profile $OUT/prof --self-profile-after-s 8 --self-profile-s 12"
timeout 150 python -m bench.throughput --gpu-sample-ms 100 --timeline $P --sizes 2b --tiles 1 --images 2048 \
    --contenders raylens --timeout 140 --out $OUT/f-raylens.json 2>&1 | grep -E '^\| |rror' | tail -4
timeout 200 python -m bench.throughput --gpu-sample-ms 100 --timeline $P --sizes 1b 2b --tiles 1 --images 640 \
    --contenders pipeline --timeout 95 --out $OUT/f-pipe.json 2>&1 | grep -E '^\| |rror' | tail -6
sleep 2; gzip -f $OUT/prof/*.txt; ls -la $OUT/prof
python - <<'PY'
import json, os
for f in ("f-raylens.json", "f-pipe.json"):
    p = os.path.join(os.environ["OUT"], f)
    if os.path.exists(p):
        for r in json.load(open(p))["results"]:
            print(f, r.get("contender"), r.get("size"), r.get("images_per_s"), r.get("gpu_util_mean"),
                  r.get("preprocess_during_run_ms"), r.get("preprocess_alone_ms"), (r.get("error") or "")[-600:])
PY

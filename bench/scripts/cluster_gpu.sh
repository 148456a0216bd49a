#!/usr/bin/env bash
# Issue 14 on the GPU machine: the README's "Run on a cluster" path with a GPU. A head started with
# `ray start --head` (token authentication on, its GPU detected), the caption job submitted with
# `ray job submit --working-dir .` running the lmdeploy engine on the GPU, then the same command again
# after one shard is deleted: only that shard is redone. About 3 minutes.
#
#   run (device tool), carry [".devsite"]:  bash bench/scripts/cluster_gpu.sh
#
# Results under $OUT: cluster_gpu.log (every command's output), summary-1.json / summary-2.json.
set -euo pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static   # the carried Ray has no dashboard web build
OUT=${OUT:-/tmp/cluster-gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/cluster_gpu.log") 2>&1

# The carried site-packages has no console scripts: a `ray` command as pip would install it.
shim=$(mktemp -d); printf '#!/bin/sh\nexec python3 -m ray.scripts.scripts "$@"\n' > "$shim/ray"; chmod +x "$shim/ray"
export PATH="$shim:$PATH" HOME=$(mktemp -d) RAY_AUTH_MODE=token
export LMDEPLOY_SKIP_WARMUP=1 LMDEPLOY_ENABLE_CHECK_ENV=0 RAY_DATA_DISABLE_PROGRESS_BARS=1
ray get-auth-token --generate
setsid ray start --head --block --disable-usage-stats --dashboard-host=127.0.0.1 --temp-dir=/tmp/rl-gpu \
  > "$OUT/ray-start.log" 2>&1 &
head_pid=$!
trap 'kill -TERM -- -$head_pid 2>/dev/null || true; wait $head_pid 2>/dev/null || true' EXIT
for _ in $(seq 90); do
  curl -sf -H "Authorization: Bearer $(cat "$HOME/.ray/auth_token")" http://127.0.0.1:8265/api/jobs/ >/dev/null && break
  sleep 2
done
sleep 5   # the head's dashboard agent registers a few seconds after the dashboard answers
python3 - <<'PY'
import ray; ray.init(address="auto", logging_level="ERROR"); print("cluster resources:", ray.cluster_resources())
PY

out=/tmp/cluster-gpu-captions; rm -rf "$out"
submit() {
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
    python3 -m jobs.caption --input examples/images --output "$out" --engine lmdeploy --shard-size 3
}
t0=$(date +%s); submit; echo "first submission: $(( $(date +%s) - t0 )) s"
cp "$out/_summary.json" "$OUT/summary-1.json"
rm "$out/part-000001.parquet"
t0=$(date +%s); submit | tee "$OUT/second.log"; echo "second submission: $(( $(date +%s) - t0 )) s"
cp "$out/_summary.json" "$OUT/summary-2.json"
grep -q "1 of 3 shards to do (3 images)" "$OUT/second.log"
python3 - "$out" <<'PY'
import sys, pandas
rows = pandas.read_parquet(sys.argv[1])
print(rows[["id", "text", "error"]].to_string())
assert sorted(rows["id"]) == sorted(set(rows["id"])) and len(rows) == 8, "each image exactly once"
assert rows["error"].isna().all(), "no errors"
print("engine:", pandas.read_json(sys.argv[1] + "/_summary.json", typ="series")["engine"])
PY
echo "cluster_gpu: OK"

#!/usr/bin/env bash
# For the next GPU session (written in session 7, not yet run): issue 13's speed goal with a longer window and
# issue 12's time to first token split, in one call (one H200, about 9.5 minutes).
#   run(command="bash bench/scripts/s8_call2.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=600)
# 1. bench.finetune_compare, 2B shape, 6 tiles, LoRA r 16, bf16, gradient checkpointing, 120 measured steps after
#    20 of warm-up: jobs.finetune --workers 1 against the plain loop, twice (session 6 measured 0.91x over 20 steps,
#    and the plain loop alone varied 3.26-4.04 samples/s between calls).  -> $OUT/finetune-2b-t6-{a,b}.json
# 2. The endpoint (lmdeploy engine, the same 2B checkpoint bench.throughput writes) and bench.ttft_split: its time
#    to first token against the engine's own in this process.  -> $OUT/ttft-split.txt, $OUT/serve.log
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static $OUT  # the carried Ray has no dashboard build
export LMDEPLOY_ENABLE_CHECK_ENV=0
for run in a b; do
  (( SECONDS + 200 < 420 )) || { echo "no time for finetune_compare $run"; break; }
  timeout 200 python -m bench.finetune_compare --size 2b --tiles 6 --images 64 --steps 140 --warmup-steps 20 \
    --batch-size 2 --timeout 190 --contenders raylens plain --workdir /tmp/finetune-compare \
    --out "$OUT/finetune-2b-t6-$run.json" > "$OUT/finetune-compare-$run.log" 2>&1
  echo "finetune_compare $run rc=$? after ${SECONDS}s"; grep -vE "^\(|INFO|WARNING|^\s*$" "$OUT/finetune-compare-$run.log" | tail -6
done
timeout 60 python -c "from pathlib import Path; from bench.throughput import ensure_checkpoint; \
ensure_checkpoint(Path('/tmp/raylens-bench'), '2b')"
CKPT=/tmp/raylens-bench/internvl2-2b-random
sed -e "s#model: null .*#model: $CKPT#" -e "s#engine: transformers .*#engine: lmdeploy#" -e "s#num_gpus: 0#num_gpus: 1#" \
    -e 's#engine_args: {}#engine_args: {"cache_max_entry_count": 0.5}#' serve/config.yaml > /tmp/serve-2b.yaml
RAY_ADDRESS=local setsid serve run /tmp/serve-2b.yaml > $OUT/serve.log 2>&1 &
SERVE=$!
for i in $(seq 90); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 2; done
curl -s http://127.0.0.1:8000/v1/models | head -c 300; echo
left=$((585 - SECONDS))
timeout $left python -m bench.ttft_split --engine lmdeploy --model $CKPT --url http://127.0.0.1:8000 --requests 40 \
  > $OUT/ttft-split.txt 2>&1
echo "ttft_split rc=$? after ${SECONDS}s"; tail -8 $OUT/ttft-split.txt
kill -- -$SERVE 2>/dev/null

#!/usr/bin/env bash
# Issue 13's fine-tuning figures on one H200 (about 6-8 minutes; one device call):
#   run(command="bash bench/scripts/finetune_gpu.sh", carry=[".devsite"], kind="nvidia-h200", timeout_s=560)
# 1. the merge's lmdeploy load test and jobs.finetune on the GPU (tests marked gpu), ~1 min;
# 2. bench.finetune_compare on a random 2B-shaped checkpoint (InternViT-300M + InternLM2-1.8B), 6 tiles + thumbnail
#    (1344x896 JPEGs), batch 2, LoRA r 16, bf16 with float32 LoRA, gradient checkpointing, 40 steps of which the
#    last 30 are measured: jobs.finetune --workers 1 vs a plain transformers+peft loop (samples/s, peak GPU memory;
#    goal >= 0.95x the plain loop's speed at no more memory), and jobs.finetune --strategy fsdp --workers 1 as a
#    smoke run -> $OUT/finetune-2b-t6.json (+ the printed table).
set -u -o pipefail
source .devsite/activate.sh
mkdir -p /tmp/devsite/ray/dashboard/client/build/static  # see bench/scripts/two_gpus.sh
nvidia-smi -L
python -c "import peft, torch, transformers; print('peft', peft.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" \
  || { echo "peft is missing on this machine: the fine-tuning figures need it"; exit 1; }
timeout 150 python -m pytest -q tests/jobs/test_merge.py tests/jobs/test_finetune_gpu.py -m gpu 2>&1 | tail -8
timeout 420 python -m bench.finetune_compare --size 2b --tiles 6 --images 64 --steps 40 --warmup-steps 10 \
  --batch-size 2 --timeout 180 --workdir /tmp/finetune-compare --out "$OUT/finetune-2b-t6.json" 2>&1 \
  | grep -vE "^\(|INFO|WARNING|^\s*$" | tail -25

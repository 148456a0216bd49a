#!/bin/bash
# usage: sweep.sh file_with_json_lines
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
python3 -c "import torch, transformers, tokenizers, PIL; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
i=0
while read -r line; do
  [ -z "$line" ] && continue
  python3 _proto/sweep_one.py "$line" > $OUT/run$i.log 2>&1 &
  i=$((i+1))
done < "$1"
wait
grep -h "step\|params\|Error" $OUT/run*.log

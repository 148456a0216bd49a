# --engine-args keys reach lmdeploy's PytorchEngineConfig; a key it does not know is one clear error line.
source .devsite/activate.sh; mkdir -p /tmp/devsite/ray/dashboard/client/build/static; nvidia-smi -L
run() { name=$1; shift; timeout 60 python -m jobs.caption --input examples/images --output /tmp/o-$name --overwrite --engine lmdeploy "$@" > $OUT/$name.log 2>&1; echo "$name rc=$? $(grep -o '"succeeded": [0-9]*' $OUT/$name.log)"; grep -a "^error:" $OUT/$name.log; }
run config-option --engine-args '{"num_gpu_blocks": 16384, "block_size": 32}'
run misspelt-option --engine-args '{"num_gpu_blockz": 16384}'

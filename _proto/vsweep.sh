export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
i=0
while read -r line; do python3 _proto/vprobe.py "$line" > $OUT/v$i.log 2>&1 & i=$((i+1)); done < "$1"
wait; grep -h "acc\|Error" $OUT/v*.log

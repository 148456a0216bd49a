# Sourced by the device scripts: `step NAME TIMEOUT ARGS...` runs `$T ARGS... --timeout (TIMEOUT-5) --out
# $OUT/NAME.json` with its whole log in $OUT/logs/NAME.log, if TIMEOUT fits in what is left of LIMIT seconds
# (bash's SECONDS counts from the script's start); otherwise it says that it skipped the run.
step() {
  local name=$1 t=$2; shift 2
  if (( SECONDS + t > LIMIT )); then echo "skipped $name: ${t}s do not fit in the $((LIMIT - SECONDS))s left"; return; fi
  PYTHONUNBUFFERED=1 timeout "$t" $T "$@" --timeout $((t - 5)) --out "$OUT/$name.json" > "$OUT/logs/$name.log" 2>&1
  echo "$name rc=$? after ${SECONDS}s"; grep -E '^\| [0-9a-z]+ \||rror' "$OUT/logs/$name.log" | tail -3
}
# `bench_inputs N`: the 2B checkpoint and N 640x480 JPEGs under /tmp/raylens-bench (only what is missing).
bench_inputs() {
  timeout 100 python -c "from pathlib import Path; from bench.throughput import ensure_checkpoint; from bench.data import \
write_images; w = Path('/tmp/raylens-bench'); ensure_checkpoint(w, '2b'); write_images(w / 'images', $1)"
  echo "images and checkpoint rc=$? after ${SECONDS}s"
}

#!/usr/bin/env bash
# Forward-pass benchmarks of the engine on random-weight models (not part of CI).
#   bench/engine_bench.sh [iters]
# Prints one JSON line per configuration (see `mmdit bench`). The f32/bf16 rows also replay
# the forward's matrix products alone (--roofline true) and print forward_over_standalone_matmuls. Models are written once into
# $MMDIT_BENCH_MODELS (default /tmp/mmdit-bench-models): seed-default is 1 GB in fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
iters="${1:-10}"
models="${MMDIT_BENCH_MODELS:-/tmp/mmdit-bench-models}"
mmdit=./build/bin/mmdit
[ -x "$mmdit" ] || ./scripts/build.sh

init() {  # init NAME ARGS...
  local name=$1; shift
  [ -f "$models/$name/model.safetensors" ] || "$mmdit" init --out "$models/$name" --seed 0 "$@"
}
init seed-default --preset seed-default
init sd3-medium-4l --preset sd3-medium --depth 4

run() {  # run LABEL MODEL ARGS...
  local label=$1 model=$2; shift 2
  printf '%-34s ' "$label"
  "$mmdit" bench --model "$models/$model" --iters "$iters" --warmup 2 "$@"
}
for threads in 1 2; do
  run "seed-default b1 T32 threads=$threads" seed-default --batch 1 --img_tokens 64 --txt_tokens 32 --threads "$threads"
  run "seed-default b8 T32 threads=$threads" seed-default --batch 8 --img_tokens 64 --txt_tokens 32 --threads "$threads"
done
# fp32 and bf16 side by side (2 threads), each with its roofline ratio.
for dtype in f32 bf16; do
  common=(--threads 2 --dtype "$dtype" --roofline true)
  run "seed-default b1 T32 $dtype" seed-default --batch 1 --img_tokens 64 --txt_tokens 32 "${common[@]}"
  run "seed-default b8 T32 $dtype" seed-default --batch 8 --img_tokens 64 --txt_tokens 32 "${common[@]}"
  run "sd3-medium 4 layers 32x32 b1 T77 $dtype" sd3-medium-4l --batch 1 --latent 16,32,32 --txt_tokens 77 "${common[@]}"
  run "sd3-medium 4 layers 32x32 b4 T77 $dtype" sd3-medium-4l --batch 4 --latent 16,32,32 --txt_tokens 77 "${common[@]}"
done

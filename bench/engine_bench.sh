#!/usr/bin/env bash
# Forward-pass benchmarks of the engine on random-weight models (not part of CI).
#   bench/engine_bench.sh [iters]
# Prints one JSON line per configuration (see `mmdit bench`), then issue 4's ratios from them.
# The f32/bf16 rows also replay the forward's matrix products alone (--roofline true) and print
# forward_over_standalone_matmuls. Models are written once into $MMDIT_BENCH_MODELS (default
# /tmp/mmdit-bench-models): seed-default is 1 GB in fp32.
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

results=$(mktemp)
trap 'rm -f "$results"' EXIT
run() {  # run LABEL MODEL ARGS...: prints and keeps "LABEL<TAB>JSON"
  local label=$1 model=$2 json; shift 2
  json=$("$mmdit" bench --model "$models/$model" --iters "${run_iters:-$iters}" --warmup 2 "$@")
  printf '%-40s %s\n' "$label" "$json"
  printf '%s\t%s\n' "$label" "$json" >> "$results"
}
# Thread scaling, seed-default f32: one thread then two, three rounds (the VM's speed drifts
# over minutes), each round's ratio and their median.
for round in 1 2 3; do
  for threads in 1 2; do
    run "seed-default b1 T32 threads=$threads round $round" seed-default --batch 1 --img_tokens 64 --txt_tokens 32 \
      --threads "$threads"
    run "seed-default b8 T32 threads=$threads round $round" seed-default --batch 8 --img_tokens 64 --txt_tokens 32 \
      --threads "$threads"
  done
done
# fp32 and bf16 side by side (2 threads), each with its roofline ratio.
for dtype in f32 bf16; do
  common=(--threads 2 --dtype "$dtype" --roofline true)
  run "seed-default b1 T32 $dtype" seed-default --batch 1 --img_tokens 64 --txt_tokens 32 "${common[@]}"
  run "seed-default b8 T32 $dtype" seed-default --batch 8 --img_tokens 64 --txt_tokens 32 "${common[@]}"
  run "sd3-medium 4 layers 32x32 b1 T77 $dtype" sd3-medium-4l --batch 1 --latent 16,32,32 --txt_tokens 77 "${common[@]}"
  run "sd3-medium 4 layers 32x32 b4 T77 $dtype" sd3-medium-4l --batch 4 --latent 16,32,32 --txt_tokens 77 "${common[@]}"
done
# SD3-medium at its production 1024x1024 (128x128 latent, 4096 image tokens), where attention
# is a third of the f32 forward: bf16 over f32 there depends on bf16 attention.
big_iters=$(( iters < 3 ? iters : 3 ))
for dtype in f32 bf16; do
  run_iters=$big_iters run "sd3-medium 4 layers 128x128 b1 T77 $dtype" sd3-medium-4l --batch 1 --latent 16,128,128 \
    --txt_tokens 77 --threads 2 --dtype "$dtype"
done
# Batching, seed-default f32: each iteration runs a batch-1 forward right before the batch-8
# one (--baseline_batch), so that the VM's drift hits both alike; five such runs, each
# round's ratio and their median.
for round in 1 2 3 4 5; do
  run "batching round $round" seed-default --batch 8 --baseline_batch 1 --img_tokens 64 --txt_tokens 32 --threads 2
done

# Issue 4's ratios from the rows above.
python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, text = line.rstrip("\n").split("\t")
    rows[label] = json.loads(text)
ms = lambda label: rows[label]["median_ms"]
print("\nforward / oneDNN matmuls alone (target <= 1.15):")
for label, row in rows.items():
    if "forward_over_standalone_matmuls" in row:
        print(f"  {label:40s} {row['forward_over_standalone_matmuls']:.3f}")
print("bf16 speed-up over f32 (target >= 1.7):")
for label in rows:
    if label.endswith(" bf16"):
        print(f"  {label[:-5]:40s} {ms(label[:-5] + ' f32') / ms(label):.2f}x")
print("two threads over one, seed-default f32 (target >= 1.8):")
for b in (1, 8):
    scaling = [ms(f"seed-default b{b} T32 threads=1 round {r}") / ms(f"seed-default b{b} T32 threads=2 round {r}")
               for r in (1, 2, 3)]
    print(f"  b{b} rounds " + ", ".join(f"{x:.3f}" for x in scaling) + f"; median {statistics.median(scaling):.3f}")
ratios = [rows[f"batching round {r}"]["throughput_over_baseline"] for r in range(1, 6)]
print("batching, seed-default f32, b8 over b1 samples/s (target >= 1.2): rounds "
      + ", ".join(f"{r:.3f}" for r in ratios) + f"; median {statistics.median(ratios):.3f}")
PY

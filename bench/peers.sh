#!/usr/bin/env bash
# Our engine against ONNX Runtime (CPU provider) and PyTorch eager on the same random-weight
# models, inputs and thread count, in one run (issue 4's four configurations). Not part of CI.
#   bench/peers.sh [iters] [threads]
# Needs: Debian's python3-torch and an OpenBLAS (libopenblas0-openmp) for PyTorch, node + npm
# for onnxruntime-node (installed into bench/peers/node_modules from its lock file).
# For each configuration it: exports the model to ONNX from the PyTorch module
# (bench/peers/mmdit_peers.py, written from MODEL_SPEC), times PyTorch eager, times ONNX
# Runtime (bench/peers/run_onnxruntime.mjs), times `mmdit bench` in f32 and bf16, checks
# that the three implementations' outputs agree, and prints the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
iters="${1:-10}"
threads="${2:-2}"
models="${MMDIT_BENCH_MODELS:-/tmp/mmdit-bench-models}"
work="${MMDIT_PEERS_WORK:-/tmp/mmdit-peers}"
mmdit=./build/bin/mmdit
python=/usr/bin/python3  # Debian's, where python3-torch lives
[ -x "$mmdit" ] || ./scripts/build.sh

"$python" -c 'import torch' 2>/dev/null || { echo "peers.sh: needs python3-torch (apt-get install python3-torch)" >&2; exit 1; }
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 || true)
case "$blas" in
  *openblas*) ;;
  *) echo "peers.sh: libblas.so.3 is $blas; install libopenblas0-openmp so PyTorch is not on reference BLAS" >&2; exit 1 ;;
esac
(cd bench/peers && [ -d node_modules/onnxruntime-node ] || npm ci --ignore-scripts --no-audit --no-fund >/dev/null)

init() {  # init NAME ARGS...
  local name=$1; shift
  [ -f "$models/$name/model.safetensors" ] || "$mmdit" init --out "$models/$name" --seed 0 "$@" >/dev/null
}
init seed-default --preset seed-default
init sd3-medium-4l --preset sd3-medium --depth 4

field() { "$python" -c "import json,sys; print(json.loads(sys.stdin.read())['$1'])"; }

printf '%-32s %9s %9s %9s %9s %8s %8s %8s %9s\n' configuration torch_ms ort_ms ours_f32 ours_bf16 \
  f32/ort f32/torch bf16/best "max_relL2"
run() {  # run LABEL MODEL BATCH IMAGE_FLAGS...
  local label=$1 model=$2 batch=$3; shift 3
  local dir="$work/${label// /_}"
  local shape_flags=("$@")
  # PyTorch at its best: OpenBLAS's own kernel choice (this environment pins OPENBLAS_* to
  # AVX2 for other work) and malloc keeping large blocks instead of unmapping them each step.
  local torch_json
  torch_json=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=268435456 \
    OMP_NUM_THREADS="$threads" "$python" bench/peers/mmdit_peers.py prepare --model "$models/$model" \
    --batch "$batch" "${shape_flags[@]}" --work "$dir" --iters "$iters" --threads "$threads" 2>/dev/null | tail -1)
  local ort_json
  ort_json=$(cd bench/peers && node run_onnxruntime.mjs "$dir" "$iters" "$threads")
  local f32_json bf16_json
  f32_json=$("$mmdit" bench --model "$models/$model" --batch "$batch" "${shape_flags[@]}" --iters "$iters" \
    --threads "$threads" --dtype f32)
  bf16_json=$("$mmdit" bench --model "$models/$model" --batch "$batch" "${shape_flags[@]}" --iters "$iters" \
    --threads "$threads" --dtype bf16)
  "$mmdit" forward --model "$models/$model" --threads "$threads" --img_latent "$dir/img_latent.npy" \
    --txt_embed "$dir/txt_embed.npy" --timestep "$dir/timestep.npy" --pooled_text "$dir/pooled_text.npy" \
    --out "$dir/ours_out.npy"
  local errors
  errors=$("$python" bench/peers/mmdit_peers.py compare --work "$dir")
  rm -f "$dir/model.onnx"  # up to 2 GB each
  local t o f b
  t=$(field median_ms <<<"$torch_json"); o=$(field median_ms <<<"$ort_json")
  f=$(field median_ms <<<"$f32_json"); b=$(field median_ms <<<"$bf16_json")
  "$python" - "$label" "$t" "$o" "$f" "$b" "$errors" <<'EOF'
import json, sys
label, t, o, f, b, errors = sys.argv[1], *map(float, sys.argv[2:6]), json.loads(sys.argv[6])
print(f"{label:32s} {t:9.1f} {o:9.1f} {f:9.1f} {b:9.1f} {o / f:7.2f}x {t / f:7.2f}x {min(t, o) / b:7.2f}x"
      f" {max(errors.values()):9.1e}")
EOF
}
# The ratio columns are speedups: peer ms / our ms (higher is better for us). bf16/best is
# the faster peer's f32 time over our bf16 time. max_relL2 is the larger relative L2 distance
# from PyTorch's output of ONNX Runtime's and of our f32 engine's, on the same inputs.
run "seed-default b1 T32" seed-default 1 --img_tokens 64 --txt_tokens 32
run "seed-default b8 T32" seed-default 8 --img_tokens 64 --txt_tokens 32
run "sd3-medium 4 layers 32x32 b1 T77" sd3-medium-4l 1 --latent 16,32,32 --txt_tokens 77
run "sd3-medium 4 layers 32x32 b4 T77" sd3-medium-4l 4 --latent 16,32,32 --txt_tokens 77

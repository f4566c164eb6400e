#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs the engine on the built-in default model.
# (The gRPC server arrives with the service issue; until then this runs `mmdit` directly.)
#   MMDIT_MODEL_DIR  model directory (default: models/seed-default, created with random weights)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
model_dir="${MMDIT_MODEL_DIR:-models/seed-default}"
if [ ! -f "$model_dir/config.json" ]; then
  echo "serve: creating the built-in default model (seed-default, RANDOM weights) in $model_dir"
  ./build/bin/mmdit init --out "$model_dir" --preset seed-default --seed 0
fi
./build/bin/mmdit inspect --model "$model_dir"
echo "serve: one forward pass, batch 1, 64 image tokens, 32 text tokens:"
./build/bin/mmdit bench --model "$model_dir" --batch 1 --img_tokens 64 --txt_tokens 32 --iters 3 --warmup 1

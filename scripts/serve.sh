#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and starts mmdit-server on port 50051 (metrics on 9090).
# Without --model it serves the built-in default model, models/digits: the small MMDiT this
# project trained on handwritten digits (docs/training.md), with prompts like "7" or "a seven"
# (mmdit-client generate --prompt 7 --out seven.png). Extra arguments go to the server
# (see `build/bin/mmdit-server --help`); every flag can also come from MMDIT_<FLAG>.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
exec ./build/bin/mmdit-server "$@"

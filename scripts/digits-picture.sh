#!/usr/bin/env bash
# Regenerates docs/digits.png, the README's picture: the default model (models/digits) served on
# a free loopback port, and one Generate call per digit "0".."9" (seed 1, the server's default
# 28 steps and guidance 7), side by side, each pixel 8 x 8. Needs a build (scripts/build.sh).
#   scripts/digits-picture.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/digits.png}"
log=$(mktemp)
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
build/bin/mmdit-server --model models/digits --host 127.0.0.1 --port 0 --metrics_port -1 >"$log" 2>&1 &
server=$!
for _ in $(seq 1 100); do grep -q "SERVING:" "$log" && break; sleep 0.1; done
port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\) .*/\1/p' "$log" | head -n 1)
[ -n "$port" ] || { cat "$log"; exit 1; }
build/bin/mmdit-client generate --target "127.0.0.1:$port" --grid 10 --seed 1 --png_scale 8 --out "$out"
echo "wrote $out"

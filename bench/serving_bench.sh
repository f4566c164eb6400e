#!/usr/bin/env bash
# Serving overhead and the gain from batching on seed-default (not part of CI):
# mmdit-server on loopback under `mmdit-client bench` at concurrency 1, 4 and 16, against the
# engine alone (`mmdit bench`) at the batch sizes the server formed. Prints a Markdown table.
#   bench/serving_bench.sh [requests_per_level]
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-64}"
models="${MMDIT_BENCH_MODELS:-/tmp/mmdit-bench-models}"
bin=./build/bin
[ -x "$bin/mmdit-server" ] || ./scripts/build.sh
[ -f "$models/seed-default/model.safetensors" ] || "$bin/mmdit" init --out "$models/seed-default" --preset seed-default --seed 0

log=$(mktemp)
"$bin/mmdit-server" --model "$models/seed-default" --host 127.0.0.1 --port 0 --metrics_port -1 \
  --max_batch_samples 8 --max_queue_delay_us 5000 --warmup 8x64/32,1x64/32 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
until grep -q "SERVING:" "$log"; do sleep 0.2; kill -0 $server || { cat "$log"; exit 1; }; done
port=$(grep -o 'listening on [^ ]*' "$log" | grep -o '[0-9]*$')

field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])$2)" "$1"; }
echo "| concurrency | served samples/s | p50 ms | p99 ms | mean batch | engine alone at that batch, samples/s | served / engine |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for concurrency in 1 4 16; do
  served=$("$bin/mmdit-client" bench --target "127.0.0.1:$port" --concurrency $concurrency --requests "$requests" \
    --img_tokens 64 --txt_tokens 32 --json | tail -n 1)
  rate=$(field "$served" "['throughput_samples_per_s']")
  batch=$(field "$served" "['mean_batch_samples']")
  engine_batch=$(python3 -c "print(max(1, round($batch)))")
  alone=$("$bin/mmdit" bench --model "$models/seed-default" --batch "$engine_batch" --img_tokens 64 --txt_tokens 32 \
    --iters 10 --warmup 2)
  alone_rate=$(python3 -c "import json; r=json.loads('$alone'); print(r['batch'] * 1000 / r['median_ms'])")
  printf '| %s | %.1f | %.1f | %.1f | %.2f | %.1f (batch %s) | %.2f |\n' "$concurrency" "$rate" \
    "$(field "$served" "['latency_ms']['p50']")" "$(field "$served" "['latency_ms']['p99']")" "$batch" \
    "$alone_rate" "$engine_batch" "$(python3 -c "print($rate / $alone_rate)")"
done

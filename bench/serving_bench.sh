#!/usr/bin/env bash
# Serving overhead and the gain from batching on seed-default (not part of CI):
# mmdit-server on loopback under `mmdit-client bench` at concurrency 1, 4 and 16, against the
# engine alone (`mmdit bench`) at the batch sizes the server formed, in alternating rounds (this
# VM's speed drifts by 10-20 % over minutes, so a single served run against a single engine run
# says little). Prints a Markdown table of medians over rounds.
#   bench/serving_bench.sh [requests_per_level [rounds]]
# At concurrency 1 the last column is the serving overhead proper: the client's mean latency
# minus the server's mean pass time for the same calls (queueing, transfer, decode, encode).
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-64}"
rounds="${2:-3}"
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

echo "| concurrency | served samples/s | p50 ms | p99 ms | mean batch | engine alone at that batch, samples/s | served / engine | overhead ms per call |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for concurrency in 1 4 16; do
  rows=$(mktemp)
  for round in $(seq "$rounds"); do
    served=$("$bin/mmdit-client" bench --target "127.0.0.1:$port" --concurrency $concurrency --requests "$requests" \
      --img_tokens 64 --txt_tokens 32 --json | tail -n 1)
    batch=$(python3 -c "import json,sys; print(max(1, round(json.loads(sys.argv[1])['mean_batch_samples'])))" "$served")
    alone=$("$bin/mmdit" bench --model "$models/seed-default" --batch "$batch" --img_tokens 64 --txt_tokens 32 \
      --iters 20 --warmup 2)
    printf '%s\t%s\n' "$served" "$alone" >> "$rows"
  done
  python3 - "$rows" "$concurrency" <<'PY'
import json, statistics, sys
pairs = [tuple(json.loads(x) for x in line.rstrip("\n").split("\t")) for line in open(sys.argv[1])]
concurrency = int(sys.argv[2])
med = statistics.median
served = [s["throughput_samples_per_s"] for s, _ in pairs]
# Both sides as rates over all their passes (1 / mean time), not one as a median.
alone = [a["batch"] * 1000 / a["mean_ms"] for _, a in pairs]
ratio = med(s / a for s, a in zip(served, alone))
# Mean latency at concurrency 1 is 1/throughput; the server's own share is its queue plus pass time.
overhead = (f"{med(1000 / s['throughput_rps'] - (s['server_compute_us_mean'] + s['server_queue_us_mean']) / 1000 for s, _ in pairs):.1f}"
            if concurrency == 1 else "")
batches = sorted({a["batch"] for _, a in pairs})
print(f"| {concurrency} | {med(served):.1f} | {med(s['latency_ms']['p50'] for s, _ in pairs):.1f} "
      f"| {med(s['latency_ms']['p99'] for s, _ in pairs):.1f} | {med(s['mean_batch_samples'] for s, _ in pairs):.2f} "
      f"| {med(alone):.1f} (batch {'/'.join(map(str, batches))}) | {ratio:.2f} | {overhead} |")
PY
  rm -f "$rows"
done

#!/usr/bin/env bash
# Soak: mmdit-server (the sd3_tiny golden model, a small queue) under open-loop traffic above
# its capacity for SECONDS: valid, malformed and cancelled Denoise and Generate calls, and
# bodies that are not messages (bench/soak_driver.cc). Prints the server's resident memory
# over time, the calls by kind and code as the client saw them, the p50/p99 of accepted calls,
# and checks that no call was lost or answered twice: every call the client sent was answered
# once, and the server counted (grpc_server_handled_total) each call it saw once (a Denoise the
# client cancels at once may never reach it).
#   bench/soak.sh [SECONDS [RATE]]     (600 s, 400 calls/s)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
rate="${2:-400}"
bin=./build/bin
[ -x "$bin/mmdit-server" ] && [ -x "$bin/soak_driver" ] || ./scripts/build.sh
log=$(mktemp)
"$bin/mmdit-server" --model tests/data/golden/sd3_tiny --host 127.0.0.1 --port 0 --metrics_port 0 \
  --max_queue_size 64 --max_running_generations 8 --max_batch_samples 16 --warmup 1x4x16x16/9 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
until grep -q "SERVING:" "$log"; do sleep 0.2; kill -0 $server || { cat "$log"; exit 1; }; done
port=$(grep -o 'listening on [^ ]*' "$log" | grep -o '[0-9]*$')
metrics_port=$(grep -o 'metrics on :[0-9]*' "$log" | grep -o '[0-9]*$')
out=$(mktemp)
"$bin/soak_driver" "127.0.0.1:$port" "$server" "$seconds" "$rate" $((seconds / 20 > 0 ? seconds / 20 : 1)) | tee "$out"
curl -s "localhost:$metrics_port/metrics" > "$out.metrics"
python3 - "$out" "$out.metrics" <<'PY'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
report = json.loads(lines[-1])
curve = [tuple(map(float, l.split())) for l in lines[1:-1]]
handled = 0
for line in open(sys.argv[2]):
    if line.startswith("grpc_server_handled_total{") and ('grpc_method="Denoise"' in line or 'grpc_method="Generate"' in line):
        handled += int(line.rsplit(" ", 1)[1])
rss = [c[1] for c in curve]
print(f"\nresident MB: start {rss[0]:.1f}, min {min(rss):.1f}, max {max(rss):.1f}, end {rss[-1]:.1f}")
print("calls by kind and code (client):")
for kind, codes in sorted(report["calls"].items()):
    print(f"  {kind}: " + ", ".join(f"{c}={n}" for c, n in sorted(codes.items())))
print("accepted calls, ms p50 / p99: " + ", ".join(
    f"{k} {report['ok_p50_ms'][k]:.0f} / {v:.0f}" for k, v in sorted(report["ok_p99_ms"].items())))
answered = sum(sum(c.values()) for c in report["calls"].values())
print(f"client: sent {report['sent']}, answered {answered} (callbacks {report['answered']}), "
      f"skipped at the client's in-flight limit {report['skipped_at_client_limit']}; server counted {handled}")
# A Denoise the client cancels at once may never reach the server: only those may be missing
# from the server's count, and the server may never count more calls than were sent.
unseen_allowed = report["calls"].get("denoise_cancelled", {}).get("CANCELLED", 0)
ok = report["sent"] == answered == report["answered"] and report["sent"] - unseen_allowed <= handled <= report["sent"]
print(f"server counted {handled} of {report['sent']} (at most {unseen_allowed} cancelled before arriving)")
print("no call lost or answered twice" if ok else "MISMATCH: calls lost or counted twice")
sys.exit(0 if ok else 1)
PY
rm -f "$out" "$out.metrics"

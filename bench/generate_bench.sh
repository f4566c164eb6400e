#!/usr/bin/env bash
# Server-side sampling (Generate) against client-driven sampling (`--via denoise`: the client's
# FlowMatchSampler calling Denoise once per step, [negative, positive] rows) on the same
# workload (not part of CI). For each model, mmdit-server on a free loopback port, then
# `mmdit-client bench --generate` at 8 callers and at 1, the two ways side by side in alternating
# rounds (the VM's speed drifts over minutes). Prints a Markdown table of medians over rounds.
# A second table sets a lone caller's Generate of the mix's first shape against the engine's own
# time for the same forward passes (`mmdit bench` at that shape, CFG rows as the batch, times the
# step count), again in alternating rounds.
#   bench/generate_bench.sh
# The defaults (few steps, small latents) take about 5 minutes on 2 cores. Environment:
#   MMDIT_BENCH_MODELS       where the random-weight models live (/tmp/mmdit-bench-models;
#                            seed-default is 1 GB in fp32, written once)
#   GENBENCH_MODELS          which to run: "seed sd3"
#   GENBENCH_SD3_DEPTH       joint blocks of the sd3-medium-geometry model (2)
#   GENBENCH_SEED_MIX        seed-default's mix ("1@64/32;1@32/32"), token form
#   GENBENCH_SD3_MIX         sd3-medium's mix ("1@16x32x32/77;1@16x16x16/77"); entries may end in
#                            :STEPS (mmdit-client's --mix syntax)
#   GENBENCH_STEPS (4)  GENBENCH_GUIDANCE (7: CFG, 2 rows a step)  GENBENCH_ROUNDS (3)
#   GENBENCH_CONCURRENCY (8)  GENBENCH_REQUESTS (24: images per way per round at that concurrency)
#   GENBENCH_REQUESTS_C1 (4: images per way per round at concurrency 1)
#   GENBENCH_WAIT_FOR_BATCH  1: the Denoise calls ask to wait for company (--wait_for_batch)
#   GENBENCH_DTYPE           compute dtype of the server and of the lone engine runs (f32)
#   GENBENCH_SERVER_FLAGS    extra mmdit-server flags
set -euo pipefail
cd "$(dirname "$0")/.."
models="${MMDIT_BENCH_MODELS:-/tmp/mmdit-bench-models}"
which_models="${GENBENCH_MODELS:-seed sd3}"
sd3_depth="${GENBENCH_SD3_DEPTH:-2}"
steps="${GENBENCH_STEPS:-4}"
guidance="${GENBENCH_GUIDANCE:-7}"
rounds="${GENBENCH_ROUNDS:-3}"
callers="${GENBENCH_CONCURRENCY:-8}"
requests="${GENBENCH_REQUESTS:-24}"
requests_c1="${GENBENCH_REQUESTS_C1:-4}"
denoise_flags=()
[ "${GENBENCH_WAIT_FOR_BATCH:-0}" = 1 ] && denoise_flags=(--wait_for_batch)
dtype="${GENBENCH_DTYPE:-f32}"
read -r -a server_flags <<< "${GENBENCH_SERVER_FLAGS:-}"
bin=./build/bin
[ -x "$bin/mmdit-server" ] && [ -x "$bin/mmdit-client" ] || ./scripts/build.sh

init() {  # init NAME ARGS...
  local name=$1; shift
  [ -f "$models/$name/model.safetensors" ] || "$bin/mmdit" init --out "$models/$name" --seed 0 "$@" >/dev/null
}

results=$(mktemp)
lone_results=$(mktemp)
log=$(mktemp)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -f "$results" "$lone_results" "$log"' EXIT

# serve MODEL_DIR WARMUP: starts mmdit-server on a free port, sets $server and $port.
serve() {
  # Passes of up to 2 rows per caller, so that every caller's step can share one pass.
  "$bin/mmdit-server" --model "$1" --host 127.0.0.1 --port 0 --metrics_port -1 \
    --max_batch_samples $((2 * callers)) --max_running_generations "$callers" --warmup "$2" \
    --dtype "$dtype" "${server_flags[@]}" >"$log" 2>&1 &
  server=$!
  until grep -q "SERVING:" "$log"; do sleep 0.2; kill -0 "$server" || { cat "$log"; exit 1; }; done
  port=$(grep -o 'listening on [^ ]*' "$log" | grep -o '[0-9]*$')
}

# bench LABEL VIA CONCURRENCY REQUESTS MIX [FLAGS...]: one `bench --generate` run, its JSON kept.
bench() {
  local label=$1 via=$2 concurrency=$3 n=$4 mix=$5 json; shift 5
  local extra=()
  [ "$via" = denoise ] && extra=("${denoise_flags[@]}")
  json=$("$bin/mmdit-client" bench --generate --via "$via" --target "127.0.0.1:$port" --concurrency "$concurrency" \
    --requests "$n" --mix "$mix" --steps "$steps" --guidance "$guidance" "${extra[@]}" "$@" --json | tail -n 1)
  printf '%s\t%s\t%s\n' "$label" "$concurrency" "$json" >> "$results"
  echo "  $label c=$concurrency via $via: $json" >&2
}

run_model() {  # run_model LABEL MODEL_DIR MIX WARMUP
  local label=$1 dir=$2 mix=$3
  serve "$dir" "$4"
  echo "$label: server on port $port" >&2
  for via in generate denoise; do  # untimed: every shape and pass size once
    "$bin/mmdit-client" bench --generate --via "$via" --target "127.0.0.1:$port" --concurrency "$callers" \
      --requests "$callers" --mix "$mix" --steps 2 --guidance "$guidance" >/dev/null
  done
  for concurrency in "$callers" 1; do
    local n=$requests
    [ "$concurrency" = 1 ] && n=$requests_c1
    for round in $(seq "$rounds"); do
      # Alternate which way goes first.
      if [ $((round % 2)) = 1 ]; then order="generate denoise"; else order="denoise generate"; fi
      for via in $order; do bench "$label" "$via" "$concurrency" "$n" "$mix"; done
    done
  done
  lone "$label" "$dir" "${mix%%;*}"
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=
}

# lone LABEL MODEL_DIR MIX_ENTRY: a lone caller's Generate of one shape against the engine alone.
lone() {
  local label=$1 dir=$2 entry=${3#*@} shape tokens entry_steps=$steps rows=1 generated alone
  [[ $entry == *:* ]] && { entry_steps=${entry##*:}; entry=${entry%%:*}; }
  shape=${entry%%/*}
  tokens=${entry#*/}
  local shape_flags=(--img_tokens "$shape")
  [[ $shape == *x* ]] && shape_flags=(--latent "${shape//x/,}")
  python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > 1 else 1)" "$guidance" && rows=2
  for round in $(seq "$rounds"); do
    generated=$("$bin/mmdit-client" bench --generate --target "127.0.0.1:$port" --concurrency 1 \
      --requests "$requests_c1" --mix "1@$entry" --steps "$entry_steps" --guidance "$guidance" --json | tail -n 1)
    alone=$("$bin/mmdit" bench --model "$dir" --batch "$rows" "${shape_flags[@]}" --txt_tokens "$tokens" \
      --iters $((requests_c1 * entry_steps)) --warmup 2 --dtype "$dtype")
    printf '%s\t%s\t%s\t%s\n' "$label" "1@$entry" "$entry_steps" "$generated"$'\t'"$alone" >> "$lone_results"
    echo "  $label lone Generate: $generated; engine: $alone" >&2
  done
}

for model in $which_models; do
  case $model in
    seed)
      init seed-default --preset seed-default
      run_model "seed-default" "$models/seed-default" "${GENBENCH_SEED_MIX:-1@64/32;1@32/32}" \
        "$((2 * callers))x64/32,2x32/32"
      ;;
    sd3)
      init "sd3-medium-${sd3_depth}l" --preset sd3-medium --depth "$sd3_depth"
      run_model "sd3-medium ${sd3_depth} layers" "$models/sd3-medium-${sd3_depth}l" \
        "${GENBENCH_SD3_MIX:-1@16x32x32/77;1@16x16x16/77}" "$((2 * callers))x16x32x32/77,2x16x16x16/77"
      ;;
    *) echo "unknown model '$model' (seed, sd3)" >&2; exit 2 ;;
  esac
done

echo
echo "$steps steps (unless the mix says otherwise), guidance $guidance, medians of $rounds rounds." \
  "G: server-side Generate; D: the client's sampler, one Denoise per step."
python3 - "$results" <<'PY'
import json, statistics, sys
runs = {}  # (model, concurrency) -> via -> [report per round]
for line in open(sys.argv[1]):
    model, concurrency, text = line.rstrip("\n").split("\t")
    report = json.loads(text)
    runs.setdefault((model, int(concurrency)), {}).setdefault(report["via"], []).append(report)
med = lambda reports, f: statistics.median(f(r) for r in reports)
print("| model | callers | images/s G / D | G / D (median of rounds) | ttfs p50 ms G / D | e2e p50 ms G / D "
      "| e2e p99 ms G / D | rows per pass G / D | errors G / D |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for (model, concurrency), ways in runs.items():
    g, d = ways["generate"], ways["denoise"]
    ratio = statistics.median(a["images_per_s"] / b["images_per_s"] if b["images_per_s"] else float("nan")
                              for a, b in zip(g, d))
    pair = lambda f, fmt: f"{med(g, f):{fmt}} / {med(d, f):{fmt}}"
    errors = lambda reports: sum(sum(r["errors"].values()) for r in reports)
    print(f"| {model} | {concurrency} | {pair(lambda r: r['images_per_s'], '.2f')} | {ratio:.2f} "
          f"| {pair(lambda r: r['ttfs_ms']['p50'], '.0f')} | {pair(lambda r: r['latency_ms']['p50'], '.0f')} "
          f"| {pair(lambda r: r['latency_ms']['p99'], '.0f')} | {pair(lambda r: r['mean_batch_samples'], '.2f')} "
          f"| {errors(g)} / {errors(d)} |")
PY

echo
echo "A lone caller: Generate's end-to-end time per image against the engine's own time for its passes" \
  "(mean pass time at that batch x steps), medians of $rounds rounds."
python3 - "$lone_results" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    model, shape, steps, generated, alone = line.rstrip("\n").split("\t")
    runs.setdefault((model, shape, int(steps)), []).append((json.loads(generated), json.loads(alone)))
print("| model | shape | steps | rows per pass | Generate ms per image | engine ms for its passes | engine / Generate |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for (model, shape, steps), pairs in runs.items():
    med = statistics.median
    generate_ms = [1000 / g["images_per_s"] for g, _ in pairs]
    engine_ms = [a["mean_ms"] * steps for _, a in pairs]
    ratio = med(e / g for e, g in zip(engine_ms, generate_ms))
    print(f"| {model} | {shape} | {steps} | {pairs[0][1]['batch']} | {med(generate_ms):.0f} | {med(engine_ms):.0f} "
          f"| {ratio:.3f} |")
PY

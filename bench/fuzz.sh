#!/usr/bin/env bash
# The libFuzzer targets in fuzz/ (the safetensors parser, the .npy reader, config.json, and
# Denoise/Generate request decoding, reflection's answers), built with clang under ASan + UBSan in build-fuzz/, each
# seeded from the golden files and run until the given number of executions or seconds. A
# finding stops its target with a non-zero exit and leaves the input in build-fuzz/artifacts/.
#   bench/fuzz.sh               1000000 executions per target (about 10 minutes on 2 cores)
#   bench/fuzz.sh --runs N      N executions per target
#   bench/fuzz.sh --seconds S   S seconds per target (.ci/run uses this)
# Prints, per target, the executions done and the corpus size.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=(-runs=1000000)
case "${1:-}" in
  --runs) limit=(-runs="$2") ;;
  --seconds) limit=(-max_total_time="$2") ;;
  "") ;;
  *) echo "usage: bench/fuzz.sh [--runs N | --seconds S]" >&2; exit 2 ;;
esac
build=build-fuzz
targets=(safetensors_fuzz npy_fuzz model_config_fuzz request_fuzz)
command -v clang++ >/dev/null || { echo "bench/fuzz.sh: needs clang (Debian: clang, libclang-rt-14-dev)" >&2; exit 1; }
cmake -S . -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMMDIT_FUZZ=ON >/dev/null
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}" fuzz_seeds >/dev/null

corpus=$build/corpus
mkdir -p "$build/artifacts"
for target in "${targets[@]}"; do mkdir -p "$corpus/$target"; done
golden=tests/data/golden
for case_dir in "$golden"/*/; do
  name=$(basename "$case_dir")
  cp "$case_dir/config.json" "$corpus/model_config_fuzz/$name.json"
  for npy in "$case_dir"/*.npy; do cp "$npy" "$corpus/npy_fuzz/${name}_$(basename "$npy")"; done
done
"$build/bin/fuzz_seeds" "$corpus/request_fuzz" "$corpus/safetensors_fuzz"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export OMP_NUM_THREADS=1
printf '| target | executions | seconds | corpus files |\n| --- | --- | --- | --- |\n'
for target in "${targets[@]}"; do
  log=$build/$target.log
  if ! "$build/bin/$target" "${limit[@]}" -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 \
      -artifact_prefix="$build/artifacts/$target-" "$corpus/$target" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "bench/fuzz.sh: $target found a problem (input in $build/artifacts/)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  seconds=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*')
  printf '| %s | %s | %s | %s |\n' "$target" "$runs" "${seconds:-?}" "$(ls "$corpus/$target" | wc -l)"
done

#!/usr/bin/env bash
# The sanitizer stage of the test suite (scripts/test.sh runs it after the release tests):
# the core and server tests under ASan + UBSan, then each libFuzzer target for a few seconds.
# Both use one clang build in build-fuzz/ (the one bench/fuzz.sh uses), which targets AVX-512
# (docs/hardening.md says why). On a CPU without AVX-512, or without clang, the tests run in a
# GCC ASan + UBSan build in build-asan/ instead, and the fuzzers are reported as not run.
#   scripts/sanitize.sh [fuzz_seconds]     (15)
set -euo pipefail
cd "$(dirname "$0")/.."
fuzz_seconds="${1:-15}"
tests=(npy_test tensor_test safetensors_test model_config_test weights_test layers_test linear_test
       engine_golden_test engine_reference_test engine_skip_layers_test sampler_test text_encoder_test image_test
       request_codec_test metrics_test step_scheduler_test server_test inference_test generate_test tls_test
       server_process_test)
fuzzers=(safetensors_fuzz npy_fuzz model_config_fuzz request_fuzz)
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$PWD/tests/sanitizers/lsan.supp"
export OMP_NUM_THREADS=2

if command -v clang++ >/dev/null && grep -qw avx512f /proc/cpuinfo; then
  build=build-fuzz fuzz=1
  cmake -S . -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMMDIT_FUZZ=ON >/dev/null
  cmake --build "$build" -j"$(nproc)" --target "${tests[@]}" mmdit-server "${fuzzers[@]}" fuzz_seeds >/dev/null
else
  build=build-asan fuzz=0
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMMDIT_SANITIZE=address,undefined >/dev/null
  cmake --build "$build" -j"$(nproc)" --target "${tests[@]}" mmdit-server >/dev/null
fi

failed=()
for test in "${tests[@]}"; do
  outcome=passed
  if ! "$build/bin/$test" --gtest_brief=1 >"$build/$test.asan.log" 2>&1; then
    tail -n 60 "$build/$test.asan.log" >&2
    failed+=("$test")
    outcome=FAILED
  fi
  echo "sanitize: $test: $(grep -o '[0-9]* tests\? from [0-9]* test suites\? ran' "$build/$test.asan.log" | head -1), $outcome"
done
[ ${#failed[@]} -eq 0 ] || { echo "sanitize: ASan/UBSan failures in ${failed[*]}" >&2; exit 1; }

if [ "$fuzz" = 1 ]; then
  bench/fuzz.sh --seconds "$fuzz_seconds"
else
  echo "sanitize: the fuzzers did NOT run (they need clang and an AVX-512 CPU); run bench/fuzz.sh where they can" >&2
fi

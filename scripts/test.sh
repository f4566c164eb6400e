#!/usr/bin/env bash
# The whole test suite from a fresh Debian 12 machine: install packages, build, run ctest,
# then the sanitizer stage (scripts/sanitize.sh: core and server tests under ASan + UBSan, and
# each fuzzer briefly).
#   scripts/test.sh            Release build in build/, then scripts/sanitize.sh
#   scripts/test.sh --release  the release tests only
#   scripts/test.sh --asan     ASan + UBSan build in build-asan/ (run before resolving memory work)
#   scripts/test.sh --tsan     TSan build in build-tsan/, the threaded tests (server, client, batcher)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
filter=()
case "${1:-}" in
  --asan)
    export MMDIT_BUILD_DIR=build-asan MMDIT_BUILD_TYPE=RelWithDebInfo
    ./scripts/build.sh -DMMDIT_SANITIZE=address,undefined ;;
  --tsan)
    export MMDIT_BUILD_DIR=build-tsan MMDIT_BUILD_TYPE=RelWithDebInfo
    ./scripts/build.sh -DMMDIT_SANITIZE=thread
    export TSAN_OPTIONS="halt_on_error=1 suppressions=$PWD/tests/sanitizers/tsan.supp"
    filter=(-R "StepPolicy|StepScheduler|DenoiserServer|InferenceService|Generate|Tls|ServerProcess|RunLoad|ParseMix|MmditClientTool|RequestCodec|Histogram|ServerMetrics") ;;
  ""|--release) ./scripts/build.sh ;;
  *) echo "usage: scripts/test.sh [--release|--asan|--tsan]" >&2; exit 2 ;;
esac
(cd "${MMDIT_BUILD_DIR:-build}" && ctest --output-on-failure -j"$(nproc)" "${filter[@]}")
if [ -z "${1:-}" ]; then ./scripts/sanitize.sh; fi

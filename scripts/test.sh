#!/usr/bin/env bash
# The whole test suite from a fresh Debian 12 machine: install packages, build, run ctest.
#   scripts/test.sh            Release build in build/
#   scripts/test.sh --asan     ASan + UBSan build in build-asan/ (run before resolving memory work)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
if [ "${1:-}" = "--asan" ]; then
  export MMDIT_BUILD_DIR=build-asan MMDIT_BUILD_TYPE=RelWithDebInfo
  ./scripts/build.sh -DMMDIT_SANITIZE=address,undefined
else
  ./scripts/build.sh
fi
cd "${MMDIT_BUILD_DIR:-build}"
ctest --output-on-failure -j"$(nproc)"

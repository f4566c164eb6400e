#!/usr/bin/env bash
# Configures and builds mmdit-serve (Release) into build/; binaries land in build/bin/.
# Extra arguments go to CMake's configure step, e.g. -DMMDIT_SANITIZE=address,undefined.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${MMDIT_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE="${MMDIT_BUILD_TYPE:-Release}" "$@" >/dev/null
cmake --build "$build_dir" -j"$(nproc)"

#!/usr/bin/env bash
# Installs exactly the Debian 12 packages mmdit-serve needs to build, test and run.
# Idempotent: prints nothing and touches nothing when every package is already present.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libdnnl-dev            # oneDNN 2.6: matrix products
  ocl-icd-opencl-dev opencl-headers  # required by Debian's dnnl CMake config (GPU runtime: OpenCL)
  libabsl-dev            # absl::Status / StatusOr, flags, strings
  nlohmann-json3-dev     # config.json, safetensors headers
  libspdlog-dev          # logging
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc  # the service
  openssl                # tests generate TLS certificates
  libgtest-dev libgmock-dev  # tests
  libbenchmark-dev       # bench/
)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

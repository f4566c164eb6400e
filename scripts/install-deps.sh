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
  libcpp-httplib-dev     # the metrics and probe HTTP port
  libspdlog-dev          # logging
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc  # the service
  openssl                # tests generate TLS certificates
  libgtest-dev libgmock-dev  # tests
  libbenchmark-dev       # bench/
  clang libclang-rt-14-dev  # the sanitizer stage and the fuzzers (scripts/sanitize.sh)
  python3-grpcio python3-protobuf python3-numpy python3-pytest  # the Python client and its tests
  python3-torch          # RemoteTransformer's torch path in tests/python; training/ (the digits model)
  libopenblas0-pthread   # an optimized BLAS for python3-torch (Debian's default, netlib, is ~30x slower)
  python3-sklearn        # the digits (training data) and the acceptance test's classifier
  libpng-dev             # mmdit-client's PNG output
)

# Tools the deployment checks use, from Debian only where the machine has none already (a
# machine may carry newer builds from other apt sources, which Debian's would conflict with).
command -v kubectl >/dev/null || packages+=(kubernetes-client)
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Kubernetes schema validator (npm: kubernetes-models ships the API schemas), pinned by
# tests/deploy/package-lock.json; reinstalled only when the lock changes. (Absent in the
# Docker build stage's first layer, which copies this script alone.)
deploy_checks="$(dirname "$0")/../tests/deploy"
stamp="$deploy_checks/node_modules/.installed-from-package-lock.json"
if [ -f "$deploy_checks/package-lock.json" ] && ! cmp -s "$deploy_checks/package-lock.json" "$stamp" 2>/dev/null; then
  echo "install-deps: npm ci in tests/deploy"
  (cd "$deploy_checks" && npm ci --no-audit --no-fund --silent >/dev/null)
  cp "$deploy_checks/package-lock.json" "$stamp"
fi

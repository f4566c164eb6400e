#!/usr/bin/env bash
# One source of truth for the build: the Dockerfile's build stage must run the README's
# install script and build command, and the README must still name them.
#   dockerfile_test.sh DOCKERFILE README
set -euo pipefail
dockerfile=$1 readme=$2
build_stage=$(awk '/^FROM .* AS build/ {on=1} /^FROM .* AS runtime/ {on=0} on' "$dockerfile")
status=0
for command in ./scripts/install-deps.sh ./scripts/build.sh; do
  grep -Eq "^RUN .*${command//./\\.}" <<<"$build_stage" || { echo "build stage does not run $command"; status=1; }
done
grep -q '^FROM debian:bookworm AS build' "$dockerfile" || { echo "build stage is not Debian 12 (bookworm)"; status=1; }
grep -q '^FROM debian:bookworm-slim AS runtime' "$dockerfile" || { echo "runtime stage is not bookworm-slim"; status=1; }
# The README's test and serve commands go through the same two scripts.
grep -q '^./scripts/test.sh' "$readme" && grep -q '^./scripts/serve.sh' "$readme" || { echo "README set-up commands changed"; status=1; }
grep -q 'install-deps.sh' scripts/test.sh && grep -q 'build.sh' scripts/test.sh || { echo "scripts/test.sh no longer uses install-deps.sh and build.sh"; status=1; }
grep -q '^USER ' "$dockerfile" && ! grep -q '^USER root' "$dockerfile" || { echo "the image must run as a non-root user"; status=1; }
sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$dockerfile" | grep -q '^HEALTHCHECK .*mmdit-client.*health' || { echo "HEALTHCHECK must run mmdit-client health"; status=1; }
[ "$status" -eq 0 ] && echo "Dockerfile build stage uses the README's install script and build command"
exit "$status"

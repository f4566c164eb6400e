#!/usr/bin/env bash
# Manual smoke test of the container recipe without a container engine (not part of CI):
# make a fresh Debian 12 root with debootstrap, run the Dockerfile's build steps in it
# (scripts/install-deps.sh, scripts/build.sh, the built-in model), start mmdit-server there on
# loopback, and call it from inside with mmdit-client. Needs root and Debian's mirror.
#   sudo scripts/debootstrap-smoke.sh [ROOT_DIR]      (default /var/tmp/mmdit-smoke-root)
# The root is kept for inspection; delete it when done.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/var/tmp/mmdit-smoke-root}
mirror=${MMDIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [ ! -x "$root/usr/bin/apt-get" ]; then
  log "debootstrap bookworm into $root"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 \
    || { tail -20 "$root.debootstrap.log"; exit 1; }
fi
mounted=()
cleanup() { for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
for fs in proc sys dev; do
  mountpoint -q "$root/$fs" || { mount --bind "/$fs" "$root/$fs" && mounted+=("$root/$fs"); }
done
cp /etc/resolv.conf "$root/etc/resolv.conf"

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root bash -c "$1"; }
# The Dockerfile's order: the install script alone first (its own layer), then the sources.
rm -rf "$root/src" && mkdir -p "$root/src/scripts"
cp scripts/install-deps.sh "$root/src/scripts/"
log "build stage: scripts/install-deps.sh"
in_root "cd /src && ./scripts/install-deps.sh"
log "copying the committed sources (git archive HEAD) to $root/src"
git archive HEAD | tar -x -C "$root/src"
log "build stage: scripts/build.sh"
in_root "cd /src && ./scripts/build.sh >/tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }"
log "runtime stage: the built-in default model (COPY models/digits /models/digits)"
in_root "mkdir -p /models && cp -r /src/models/digits /models/digits"

log "start-up: mmdit-server on 127.0.0.1:50051 as the image runs it (WORKDIR /, built-in model)"
in_root "cd / && (/src/build/bin/mmdit-server --host 127.0.0.1 --port 50051 --metrics_port 9090 >/tmp/server.log 2>&1 &) \
  && for i in \$(seq 1 120); do grep -q SERVING: /tmp/server.log && break; sleep 1; done; cat /tmp/server.log"
log "calls from inside the root"
in_root "/src/build/bin/mmdit-client health --target 127.0.0.1:50051 \
  && /src/build/bin/mmdit-client info --target 127.0.0.1:50051 | head -12 \
  && /src/build/bin/mmdit-client bench --target 127.0.0.1:50051 --concurrency 4 --requests 16 --latent 1,8,8 --txt_tokens 4 \
  && /src/build/bin/mmdit-client generate --target 127.0.0.1:50051 --prompt 7 --seed 1 --out /tmp/seven.png"
log "SIGTERM: drain and exit"
in_root "pkill -TERM -x mmdit-server; for i in \$(seq 1 40); do pgrep -x mmdit-server >/dev/null || break; sleep 0.5; done; tail -3 /tmp/server.log"
log "done"

#!/usr/bin/env bash
# The Dockerfile's runtime stage must install every Debian package whose shared libraries the
# shipped binaries load: resolve `ldd` of each binary to packages with dpkg and check each is
# in the runtime stage's apt-get list. Adding a dependency without updating the image fails.
#   runtime_libraries_test.sh DOCKERFILE BINARY...
set -euo pipefail
dockerfile=$1; shift

# The runtime stage's packages: the apt-get install continuation lines after "AS runtime".
listed=$(awk '/^FROM .* AS runtime/ {runtime=1} runtime && /apt-get install/ {grab=1; next}
              grab && /^ *&&/ {grab=0} grab {gsub(/\\/, ""); for (i = 1; i <= NF; ++i) print $i}' "$dockerfile" | sort -u)
[ -n "$listed" ] || { echo "no runtime package list found in $dockerfile"; exit 1; }

# Which package owns a library path; merged /usr means dpkg may know it under /lib or /usr/lib.
owner() {
  local path=$1 candidate
  for candidate in "$path" "$(realpath "$path")" "${path/#\/usr\/lib/\/lib}" "${path/#\/lib/\/usr\/lib}" \
                   "$(realpath "$path" | sed 's#^/usr/lib#/lib#')"; do
    if pkg=$(dpkg -S "$candidate" 2>/dev/null | head -n 1 | cut -d: -f1) && [ -n "$pkg" ]; then
      echo "$pkg"
      return 0
    fi
  done
  return 1
}

missing=0
needed=""
for binary in "$@"; do
  [ -x "$binary" ] || { echo "not an executable: $binary"; exit 1; }
  while read -r library path; do
    if [ "$path" = "not" ]; then echo "$binary: $library not found by ldd"; missing=1; continue; fi
    pkg=$(owner "$path") || { echo "$binary: no Debian package owns $path"; missing=1; continue; }
    needed+="$pkg"$'\n'
  done < <(ldd "$binary" | awk '/=>/ {print $1, $3}')
done
for pkg in $(echo "$needed" | sort -u); do
  if ! grep -qx "$pkg" <<<"$listed"; then
    echo "the runtime stage of $dockerfile lacks $pkg (needed by the binaries)"
    missing=1
  fi
done
[ "$missing" -eq 0 ] && echo "runtime stage provides all $(echo "$needed" | sort -u | grep -c .) packages the binaries load"
exit "$missing"

#!/usr/bin/env bash
# Builds the two images the e2e Kubernetes cluster runs, as OCI archives, with
# no container engine and no registry (umoci, as images/build does):
#
#   pause.oci.tar  the pod sandbox: e2e/kube/pause.c, linked statically
#   app.oci.tar    /bin/busybox (Debian busybox-static, every applet linked in
#                  /bin) and /usr/local/bin/weft-testapp with the shared
#                  libraries it loads
#
# Both archives carry the reference name given by --tag; import them with
# `ctr -n k8s.io images import --base-name <repository> <archive>`.
#
# Usage: e2e/kube/build-images.sh --out DIR --testapp PATH [--tag TAG]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=
testapp=
tag=1
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --testapp) testapp=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    *) echo "build-images: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $out && -n $testapp ]] || { echo "build-images: --out and --testapp are required" >&2; exit 2; }
[[ -x $testapp ]] || { echo "build-images: $testapp is not an executable" >&2; exit 1; }
[[ -x /bin/busybox ]] || { echo "build-images: /bin/busybox is missing (apt-get install busybox-static)" >&2; exit 1; }
for tool in umoci gcc strip; do
  command -v $tool >/dev/null || { echo "build-images: $tool is missing" >&2; exit 1; }
done
[[ $(id -u) -eq 0 ]] || { echo "build-images: run as root (umoci unpacks file ownership)" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# new <name>: an empty image; prints the root filesystem to fill.
new() {
  local layout=$work/$1/oci bundle=$work/$1/bundle
  mkdir -p "$work/$1"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci unpack --image "$layout:$tag" "$bundle" >/dev/null
  echo "$bundle/rootfs"
}

# finish <name> <umoci config arguments>...: repacks and writes <out>/<name>.oci.tar.
finish() {
  local name=$1 layout=$work/$1/oci bundle=$work/$1/bundle
  shift
  umoci repack --image "$layout:$tag" "$bundle"
  umoci config --image "$layout:$tag" --os linux --architecture amd64 \
    --config.label "org.opencontainers.image.title=weft-e2e-$name" "$@"
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$out/$name.oci.tar.tmp" .
  mv "$out/$name.oci.tar.tmp" "$out/$name.oci.tar"
}

# The sandbox image.
rootfs=$(new pause)
gcc -static -O2 -Wall -Wextra -o "$work/pause.bin" "$here/pause.c"
install -D -m 0755 "$work/pause.bin" "$rootfs/pause"
finish pause --config.entrypoint /pause --config.user 65535:65535

# The workload image.
rootfs=$(new app)
install -D -m 0755 /bin/busybox "$rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [[ $applet == busybox ]] || ln -sf busybox "$rootfs/bin/$applet"
done
mkdir -p "$rootfs/usr/local/bin" "$rootfs/lib/x86_64-linux-gnu" "$rootfs/lib64"
# weft-testapp without its debug information (the debug build is large).
strip -o "$rootfs/usr/local/bin/weft-testapp" "$testapp"
chmod 0755 "$rootfs/usr/local/bin/weft-testapp"
if ldd "$testapp" 2>/dev/null | grep -q 'not found'; then
  echo "build-images: $testapp needs a library this machine lacks" >&2
  exit 1
fi
while read -r lib; do
  case $lib in
    */ld-linux*) install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib" ;;
    /*) install -D -m 0644 "$(readlink -f "$lib")" "$rootfs/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
  esac
done < <(ldd "$testapp" 2>/dev/null | awk '/=>/ {print $3; next} /^\t\// {print $1}')
mkdir -p "$rootfs/etc"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
install -d -m 1777 "$rootfs/tmp"
finish app --config.cmd /bin/sh --config.env PATH=/usr/local/bin:/bin
echo "$out"

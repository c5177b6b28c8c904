#!/usr/bin/env bash
# Builds a real kube-apiserver (v1.20.2, from Debian bookworm's `kubernetes`
# source package, with Debian's Go 1.19) once and caches it outside the
# checkout. Prints the binary's path. Reruns are instant.
#
#   WEFT_KUBE_CACHE  cache directory (default: ~/.cache/weft/kube)
set -euo pipefail

cache="${WEFT_KUBE_CACHE:-$HOME/.cache/weft/kube}"
bin="$cache/v1.20.2/kube-apiserver"
mkdir -p "$cache"
# Tests call this concurrently: one builds, the others wait and reuse.
exec 9>"$cache/.lock"
flock 9
# etcd is needed to run the API server, built or cached.
if ! command -v etcd >/dev/null; then
  echo "build-apiserver: installing etcd-server" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi

need=()
[[ -x /usr/lib/go-1.19/bin/go ]] || need+=(golang-1.19-go)
command -v rsync >/dev/null || need+=(rsync)
command -v make >/dev/null || need+=(make)
[[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]] || need+=(golang-github-modern-go-reflect2-dev)
command -v dpkg-source >/dev/null || need+=(dpkg-dev)
if ((${#need[@]})); then
  echo "build-apiserver: installing ${need[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work="$cache/build"
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial" "$work/src"

# A private APT configuration with a deb-src line: /etc/apt stays untouched.
cat >"$work/apt/sources.list" <<SRC
deb-src http://deb.debian.org/debian bookworm main
SRC
cat >"$work/apt/apt.conf" <<CONF
Dir::Etc::SourceList "$work/apt/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$work/apt/lists";
Dir::Cache "$work/apt";
CONF
export APT_CONFIG="$work/apt/apt.conf"
echo "build-apiserver: fetching the kubernetes source package" >&2
apt-get update -qq >&2
(cd "$work/src" && apt-get source --download-only -qq kubernetes >&2)
orig=$(ls "$work/src"/kubernetes_*.orig.tar.* | head -n1)
tar -xf "$orig" -C "$work/src"
tree=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes*' | head -n1)

# The vendored reflect2 v1.0.1 crashes with Go >= 1.18; Debian ships 1.0.2.
vend="$tree/vendor/github.com/modern-go/reflect2"
find "$vend" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) -delete
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$vend/"
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$vend/" 2>/dev/null || true
find "$vend" -maxdepth 1 -name '*_test.go' -delete

echo "build-apiserver: building kube-apiserver (several minutes)" >&2
export PATH="/usr/lib/go-1.19/bin:$PATH"
export GOFLAGS=-mod=vendor GOCACHE="$work/gocache" GOPATH="$work/gopath"
# Run from `cargo test` under `make test`, this script inherits OUT_DIR (cargo sets
# it for a package with a build script), which kubernetes' Makefile takes as its
# output directory, and the outer make's flags: build as if started by hand.
unset OUT_DIR MAKEFLAGS MFLAGS MAKELEVEL
(cd "$tree" && make WHAT=cmd/kube-apiserver >&2)
mkdir -p "$(dirname "$bin")"
install -m 0755 "$tree/_output/bin/kube-apiserver" "$bin.tmp"
mv "$bin.tmp" "$bin"
rm -rf "$work"
echo "$bin"

#!/usr/bin/env bash
# Builds the Kubernetes v1.20.2 server binaries (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy) from Debian
# bookworm's `kubernetes` source package with Debian's Go 1.19, in one `make`
# invocation, and caches them outside the checkout. Also installs the Debian
# packages a node needs at run time (etcd-server, containerd, runc, conntrack,
# busybox-static, containernetworking-plugins, bpftool) and puts a v1.20 kubectl (Debian
# `kubernetes-client`) into the cache.
#
# Prints the cache directory that holds the binaries. Reruns are instant.
#
#   WEFT_KUBE_CACHE  cache directory (default: ~/.cache/weft/kube); binaries go
#                    to $WEFT_KUBE_CACHE/v1.20.2/
#
# How long a fresh build takes: see e2e/kube/README.md.
#
# kubectl: this machine kind may already have an unrelated /usr/bin/kubectl (the
# Google Cloud SDK's, v1.32) that Debian's kubernetes-client would collide with
# (dpkg refuses to overwrite another package's file). So the .deb is downloaded
# with apt-get and only its kubectl is unpacked into the cache; /usr/bin is left
# alone.
set -euo pipefail

version=v1.20.2
cache="${WEFT_KUBE_CACHE:-$HOME/.cache/weft/kube}"
out="$cache/$version"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
mkdir -p "$cache"
# Tests call this concurrently: one builds, the others wait and reuse.
exec 9>"$cache/.lock"
flock 9

log() { echo "build-kube: $*" >&2; }

apt_install() {
  log "installing $*"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Run-time packages (needed whether the binaries are built or cached).
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
command -v conntrack >/dev/null || need+=(conntrack)
[[ -x /bin/busybox ]] || need+=(busybox-static)
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] || need+=(containernetworking-plugins)
command -v umoci >/dev/null || need+=(umoci)
command -v iptables >/dev/null || need+=(iptables)
# Lists the eBPF programs weft's node agents attach to a node's cgroup (what
# KubeCluster::weft_node_state reports after helm uninstall).
command -v bpftool >/dev/null || need+=(bpftool)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
if ((${#need[@]})); then
  apt_install "${need[@]}"
fi

# kubectl v1.20 from Debian's kubernetes-client, unpacked into the cache.
if [[ ! -x "$out/kubectl" ]]; then
  log "fetching kubectl (Debian kubernetes-client)"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq kubernetes-client >&2 2>/dev/null) || {
    apt-get update -qq >&2
    (cd "$tmp" && apt-get download -qq kubernetes-client >&2)
  }
  dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$tmp/root"
  mkdir -p "$out"
  install -m 0755 "$tmp/root/usr/bin/kubectl" "$out/kubectl.tmp"
  mv "$out/kubectl.tmp" "$out/kubectl"
  rm -rf "$tmp"
fi

missing=()
for b in "${bins[@]}"; do
  [[ -x "$out/$b" ]] || missing+=("$b")
done
if ((${#missing[@]} == 0)); then
  echo "$out"
  exit 0
fi

need=()
[[ -x /usr/lib/go-1.19/bin/go ]] || need+=(golang-1.19-go)
command -v rsync >/dev/null || need+=(rsync)
command -v make >/dev/null || need+=(make)
[[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]] || need+=(golang-github-modern-go-reflect2-dev)
command -v dpkg-source >/dev/null || need+=(dpkg-dev)
if ((${#need[@]})); then
  apt_install "${need[@]}"
fi

start=$(date +%s)
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
log "fetching the kubernetes source package"
(
  export APT_CONFIG="$work/apt/apt.conf"
  apt-get update -qq >&2
  cd "$work/src" && apt-get source --download-only -qq kubernetes >&2
)
orig=$(ls "$work/src"/kubernetes_*.orig.tar.* | head -n1)
tar -xf "$orig" -C "$work/src"
tree=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes*' | head -n1)

# The vendored reflect2 v1.0.1 crashes with Go >= 1.18; Debian ships 1.0.2.
vend="$tree/vendor/github.com/modern-go/reflect2"
find "$vend" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) -delete
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$vend/"
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$vend/" 2>/dev/null || true
find "$vend" -maxdepth 1 -name '*_test.go' -delete

what=$(printf 'cmd/%s ' "${bins[@]}")
log "building ${bins[*]} (6 to 11 minutes on 2 cores)"
export PATH="/usr/lib/go-1.19/bin:$PATH"
export GOFLAGS=-mod=vendor GOCACHE="$work/gocache" GOPATH="$work/gopath"
# Run from `cargo test` under `make test`, this script inherits OUT_DIR (cargo sets
# it for a package with a build script), which kubernetes' Makefile takes as its
# output directory, and the outer make's flags: build as if started by hand.
unset OUT_DIR MAKEFLAGS MFLAGS MAKELEVEL
(cd "$tree" && nice -n 10 make WHAT="${what% }" >&2)
mkdir -p "$out"
for b in "${bins[@]}"; do
  install -m 0755 "$tree/_output/bin/$b" "$out/$b.tmp"
  mv "$out/$b.tmp" "$out/$b"
done
rm -rf "$work"
log "built ${bins[*]} in $(($(date +%s) - start)) s"
echo "$out"

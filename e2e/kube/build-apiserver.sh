#!/usr/bin/env bash
# Prints the path of a real kube-apiserver (v1.20.2, from Debian bookworm's
# `kubernetes` source package, with Debian's Go 1.19), built once and cached
# outside the checkout. Kept for the API-server-only tests (kubeapi.rs): it
# delegates to build-kube.sh, which builds all five server binaries in one make
# and installs the node run-time packages (see there). Reruns are instant.
#
#   WEFT_KUBE_CACHE  cache directory (default: ~/.cache/weft/kube)
set -euo pipefail

dir=$("$(dirname "$0")/build-kube.sh")
echo "$dir/kube-apiserver"

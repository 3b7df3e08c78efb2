#!/bin/bash
# Install the Debian 12 packages shardswitch needs, and only those missing.
#
#   scripts/install-deps.sh            everything the tests need (make test)
#   scripts/install-deps.sh --runtime  only what running shardswitch needs (make run)
#
# Idempotent: each package is checked with dpkg-query first; when nothing is
# missing nothing else happens (no apt-get update, no root needed).  Otherwise
# runs `apt-get update` once and `apt-get install` for the missing packages,
# as root or through sudo.  Prints what it checks and does.
set -euo pipefail

RUNTIME_PACKAGES=(python3-venv python3-dev gcc libc6-dev libseccomp2 libatomic1)
TEST_PACKAGES=(
    python3-venv python3-dev gcc libc6-dev
    qemu-system-x86 linux-image-cloud-amd64 busybox-static iperf3
    dpdk-dev dnsmasq-base cpio kmod iproute2 procps libseccomp2 libatomic1 systemd tcpdump
    libvirt-daemon-system libvirt-clients
)

usage() {
    echo "usage: $0 [--runtime]" >&2
    echo "  --runtime  install only what running shardswitch needs (${RUNTIME_PACKAGES[*]})" >&2
}

packages=("${TEST_PACKAGES[@]}")
case "${1:-}" in
    "") ;;
    --runtime) packages=("${RUNTIME_PACKAGES[@]}") ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 2 ;;
esac
if [ "$#" -gt 1 ]; then
    usage
    exit 2
fi

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps: dpkg-query not found; this script supports Debian 12 only" >&2
    exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
    if is_installed "$pkg"; then
        echo "install-deps: $pkg: installed"
    else
        echo "install-deps: $pkg: missing"
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: nothing to install"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
fi

run() {
    echo "install-deps: running: $*"
    "$@"
}

run "${as_root[@]}" apt-get update
run "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"

still_missing=()
for pkg in "${missing[@]}"; do
    is_installed "$pkg" || still_missing+=("$pkg")
done
if [ "${#still_missing[@]}" -ne 0 ]; then
    echo "install-deps: still not installed: ${still_missing[*]}" >&2
    exit 1
fi
echo "install-deps: installed ${missing[*]}"

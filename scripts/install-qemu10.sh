#!/usr/bin/env bash
# QEMU 10 (needed for vhost-user device-state migration) from Debian 12's bookworm-backports, unpacked into
# a prefix of its own beside Debian's QEMU 7.2, which stays the system's and the tests' default.
#
#   scripts/install-qemu10.sh [PREFIX]      (default: .cache/qemu10 in the repository)
#
# Only the .debs are fetched (through a private apt configuration: the system's sources are not changed) and
# unpacked with dpkg -x; the libraries they need are bookworm's own, installed with qemu-system-x86 7.2 by
# scripts/install-deps.sh.  Run the result as
#   PREFIX/usr/bin/qemu-system-x86_64 -L PREFIX/usr/share/qemu -L PREFIX/usr/share/seabios ...
# Idempotent: a prefix whose QEMU already reports 10.x is left alone.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$here/.cache/qemu10}
binary=$prefix/root/usr/bin/qemu-system-x86_64

if [[ -x $binary ]] && "$binary" --version 2>/dev/null | grep -q "version 10\."; then
    echo "QEMU 10 already in $prefix"
    exit 0
fi

apt_dir=$prefix/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$prefix/debs"
cat > "$apt_dir/sources.list" <<SOURCES
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-backports main
SOURCES
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1
          -o APT::Sandbox::User=root)
echo "fetching QEMU 10 from bookworm-backports into $prefix"
apt-get "${apt_opts[@]}" -qq update
cd "$prefix/debs"
apt-get "${apt_opts[@]}" -qq download qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
    qemu-system-data/bookworm-backports seabios/bookworm-backports ipxe-qemu
rm -rf "$prefix/root"
for deb in "$prefix"/debs/*.deb; do
    dpkg -x "$deb" "$prefix/root"
done
"$binary" --version | head -1

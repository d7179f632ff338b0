#!/bin/sh
# Build the VMI attack modules for one kernel release.
#
#   tests/vmi-attacks/build.sh KVER OUTDIR
#
# KVER is a kernel release such as 6.1.0-56-cloud-amd64; its headers must be installed at
# /usr/src/linux-headers-KVER (Debian: apt-get install linux-headers-KVER). The sources are
# copied to a temporary directory and built there, so this directory gets no build litter;
# the .ko files land in OUTDIR (created if missing). Never load them on the host.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 KVER OUTDIR" >&2
    exit 2
fi
kver=$1
outdir=$2
kdir=/usr/src/linux-headers-$kver
src=$(cd "$(dirname "$0")" && pwd)
modules="benign hide_pid hook_syscall patch_text hide_module"

if [ ! -f "$kdir/Makefile" ]; then
    echo "$0: no kernel headers at $kdir: apt-get install linux-headers-$kver" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vmi-attacks.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
cp "$src"/Kbuild "$src"/*.c "$src"/*.h "$work"/

make -C "$kdir" M="$work" -j"$(nproc 2>/dev/null || echo 1)" modules

mkdir -p "$outdir"
for m in $modules; do
    cp "$work/$m.ko" "$outdir/$m.ko"
    # The vermagic string from the .modinfo section (what modinfo -F vermagic prints; objcopy
    # is part of binutils, which the kernel build needs anyway).
    vermagic=$(objcopy -O binary --only-section=.modinfo "$outdir/$m.ko" /dev/stdout |
        tr '\0' '\n' | sed -n 's/^vermagic=//p')
    case "$vermagic" in
    "$kver "*) echo "$m.ko: vermagic=$vermagic" ;;
    *) echo "$0: $m.ko has vermagic '$vermagic', not for $kver" >&2; exit 1 ;;
    esac
done
echo "built $(echo "$modules" | wc -w) modules for $kver in $outdir"

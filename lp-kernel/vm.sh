#!/usr/bin/env bash
# Boots the pinned Debian kernel under QEMU (TCG; KVM hangs on these machines) with a busybox
# initramfs holding INIT as /init and the given modules in /lib/lp/; the serial console goes to
# LOG. Exit status: QEMU's, or 124 when the VM did not finish within VM_TIMEOUT seconds.
# Usage: vm.sh INIT LOG MODULE.ko...      (env: VM_TIMEOUT, VM_APPEND, VM_SMP, VM_FILES, VM_ACCEL)
#
# VM_ACCEL defaults to single-threaded TCG (the vCPUs take turns on one host thread). With
# multi-threaded TCG (`VM_ACCEL=tcg`) the guest's code patching (ftrace's text_poke_bp) raced
# QEMU's invalidation of translated code on the other vCPU's thread: both vCPUs in soft
# lockups, a reader of a patched function on one and stop_machine's stopper on the other (the
# section 8 reader race, session 14's CI probe; session 1 saw the same with a kthread loop).
# The guest's own ordering is the same either way: stop_machine, IPIs and preemption still
# interleave the vCPUs, and the suite took the same guest time (~24 s).
set -euo pipefail
init=$1 log=$2
shift 2
KVER=6.1.0-50-cloud-amd64
here=$(cd "$(dirname "$0")" && pwd)
rootfs=$(mktemp -d "$here/build/rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,proc,sys,dev,tmp,lib/lp}
cp /bin/busybox "$rootfs/bin/busybox"
cp "$@" "$rootfs/lib/lp/"
cp "$init" "$rootfs/init"
# VM_FILES: host files copied to the same path inside (a dynamically linked program and the
# libraries `ldd` lists for it, for instance).
for f in ${VM_FILES:-}; do
  mkdir -p "$rootfs$(dirname "$f")"
  cp -L "$f" "$rootfs$f"
done
chmod +x "$rootfs/init"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1) >"$rootfs.cpio.gz"
set +e
timeout "${VM_TIMEOUT:-300}" qemu-system-x86_64 -accel "${VM_ACCEL:-tcg,thread=single}" -cpu max -smp "${VM_SMP:-2}" -m 512 \
  -nographic -no-reboot -kernel "/boot/vmlinuz-$KVER" -initrd "$rootfs.cpio.gz" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3 ${VM_APPEND:-}" </dev/null >"$log" 2>&1
rc=$?
rm -f "$rootfs.cpio.gz"
exit $rc

#!/usr/bin/env bash
# lp-kernel's test: builds lpcore.ko (C shim + lp-core in Rust) and the test modules against the
# pinned Debian 6.1 kernel's headers, boots that kernel under QEMU (TCG) with a busybox
# initramfs whose /init (tests/vm-init.sh) runs every scenario, and reads the verdicts from the
# serial console. Fails if any verdict is FAIL, if the VM does not finish, or if too few ran.
# Usage: bash lp-kernel/test.sh        (scripts/test.sh calls it; works on a fresh machine)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
KVER=6.1.0-50-cloud-amd64
out=$here/build
export VM_TIMEOUT=${VM_TIMEOUT:-300}

# Prerequisites: the apt packages (kernel image + headers, qemu, busybox, cpio) and the pinned nightly
# Rust (scripts/nightly.sh) with the standard library's source (build-std).
bash "$root/scripts/install-deps.sh"
. "$root/scripts/nightly.sh"
ensure_nightly

# The Rust half's interface to C, on the host (unit tests; the kernel build comes next).
(cd "$here/rust" && CARGO_TARGET_DIR="$out/rust-host" cargo "+$LP_NIGHTLY" test -q)
bash "$here/build.sh"

# The example patch (examples/kernel-cmdline), built the way a user builds one: with
# `livepatch kernel pack`, or with the kbuild template while the CLI lacks the subcommand.
example=$root/examples/kernel-cmdline/redact_cmdline.c
mkdir -p "$out/examples"
rm -f "$out/examples/lp_redact.ko"
cli=${LP_CLI:-${CARGO_TARGET_DIR:-$root/target}/debug/livepatch}
(cd "$root" && cargo build -q -p lp-userspace --bin livepatch) || true
if [ -x "$cli" ] && "$cli" kernel pack --help >/dev/null 2>&1; then
  "$cli" kernel pack "$example" --name lp_redact -o "$out/examples/lp_redact.ko" \
    --kdir "/usr/src/linux-headers-$KVER"
else
  echo "lp-kernel/test.sh: 'livepatch kernel pack' not available; building the example with lp-kernel/template"
  cp "$example" "$out/examples/lp_redact.c"
  cp "$here/template/Makefile" "$out/examples/Makefile"
  make -s -C "$out/examples" PATCH=lp_redact KDIR="/usr/src/linux-headers-$KVER" \
    LP_INCLUDE="$here/include"
fi

# A patch module built against another kernel build: its recorded CRC of module_layout (the
# __versions entry modversions checks) changed. The kernel itself must refuse it before any of
# its code runs.
python3 - "$out/tests/p_cmdline.ko" "$out/tests/p_bad_crc.ko" <<'PY'
import sys
ko = bytearray(open(sys.argv[1], "rb").read())
at = ko.index(b"module_layout\0")  # first in __versions: {u64 crc; char name[56]}
ko[at - 8] ^= 0xff  # the low byte of the CRC stored just before the name
open(sys.argv[2], "wb").write(ko)
PY

# The CLI itself goes into the VM for `livepatch kernel status` (with the shared libraries it
# links), when it has the subcommand.
vm_files=
if [ -x "$cli" ] && "$cli" kernel status --help >/dev/null 2>&1; then
  vm_files="$cli $(ldd "$cli" | grep -o '/[^ ]*' | tr '\n' ' ')"
  cli_checks=1
else
  echo "lp-kernel/test.sh: 'livepatch kernel status' not available; the VM reads sysfs only"
  cli_checks=0
fi

log=$out/vm.log
echo "lp-kernel/test.sh: booting $KVER under QEMU (TCG), log in $log"
set +e
VM_FILES="$vm_files" VM_APPEND="lp_demo_secret=hunter2 lp_cli=${vm_files%% *}" bash "$here/vm.sh" "$here/tests/vm-init.sh" "$log" \
  "$out"/core/lpcore.ko "$out"/tests/*.ko "$out/examples/lp_redact.ko"
qemu_rc=$?
set -e
tr -d '\r' <"$log" | grep -E '^LP(TEST|STATUS|DMESG|BENCH)' || true

if [ "$qemu_rc" = 124 ]; then
  echo "lp-kernel/test.sh: FAIL: the VM did not finish within ${VM_TIMEOUT}s" >&2
  tr -d '\r' <"$log" | tail -30 >&2
  exit 1
fi
done_line=$(tr -d '\r' <"$log" | grep -E '^LPTEST DONE' || true)
if [ -z "$done_line" ]; then
  echo "lp-kernel/test.sh: FAIL: the VM stopped before the end of the scenarios (qemu exit $qemu_rc); last lines:" >&2
  tr -d '\r' <"$log" | tail -30 >&2
  exit 1
fi
npass=$(echo "$done_line" | sed -n 's/.*pass=\([0-9]*\).*/\1/p')
nfail=$(tr -d '\r' <"$log" | grep -c 'LPTEST FAIL' || true)
# The scenario script has this many checks; fewer passes means some were silently skipped.
MIN_PASS=$((88 + 6 * cli_checks))
if [ "$nfail" != 0 ] || [ "$npass" -lt "$MIN_PASS" ]; then
  echo "lp-kernel/test.sh: FAIL: $nfail failed, $npass passed (want 0 failed, >= $MIN_PASS passed)" >&2
  exit 1
fi
echo "lp-kernel/test.sh: all $npass kernel checks passed"

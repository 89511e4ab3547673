#!/usr/bin/env bash
# Builds lpcore.ko (C shim + lp-core as a Rust staticlib), the test target modules and the test
# patch modules into lp-kernel/build/. Needs: the pinned nightly (scripts/nightly.sh) with rust-src, the 6.1 headers package.
# Usage: bash lp-kernel/build.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
KVER=${KVER:-6.1.0-50-cloud-amd64}
KDIR=${KDIR:-/usr/src/linux-headers-$KVER}
out=$here/build
mkdir -p "$out"
. "$here/../scripts/nightly.sh"

# 1. Rust: lp-core + the FFI layer (returns and indirect calls through the kernel's
# __x86_return_thunk / __x86_indirect_thunk_*, like the C of this RETHUNK+RETPOLINE kernel) for x86_64-unknown-none, built with a core (and alloc) that
# is compiled with the same flags (the prebuilt one leaves GOTPCREL relocations, which the 6.1
# module loader rejects).
# LP_RUST_SRC: build the crate from another checkout (e.g. a snapshot of a committed lp-core).
(
  cd "${LP_RUST_SRC:-$here/rust}"
  RUSTFLAGS="-C relocation-model=static -C code-model=kernel -Z plt=yes -Z function-return=thunk-extern -Z retpoline-external-thunk" \
    CARGO_TARGET_DIR="$out/rust" \
    cargo "+$LP_NIGHTLY" build --release --quiet \
    -Z build-std=core,alloc,compiler_builtins -Z build-std-features=compiler-builtins-mem \
    --target x86_64-unknown-none
)
lib=$out/rust/x86_64-unknown-none/release/liblp_kernel_rs.a

# 2. Keep only what the exported lp_rs_* functions need.
mkdir -p "$out/core"
syms=$(nm -g --defined-only "$lib" 2>/dev/null | awk '$2=="T" && $3 ~ /^lp_rs_/ {print "-u " $3}' | sort -u)
ld -r --gc-sections $syms -o "$out/core/lp_rust.o_shipped" "$lib"
bad=$(readelf -r "$out/core/lp_rust.o_shipped" | awk '/R_X86_64_/ {print $3}' | sort -u |
  grep -vE '^R_X86_64_(64|32S|32|PC32|PLT32)$' || true)
if [ -n "$bad" ]; then
  echo "build.sh: lp_rust.o has relocations the module loader rejects: $bad" >&2
  exit 1
fi
# kbuild wants a .cmd file for every object it links.
echo "cmd_$out/core/lp_rust.o := cp lp_rust.o_shipped lp_rust.o" > "$out/core/.lp_rust.o.cmd"

# 3. The C shim and the modules, built out of a copy so the source tree stays clean.
cp "$here"/core/*.c "$here"/core/*.h "$here"/core/Kbuild "$out/core/"
cp "$here/include/livepatch.h" "$out/core/"
make -s -C "$KDIR" M="$out/core" modules 2>&1 | grep -v "Skipping BTF generation" || true
[ "${PIPESTATUS[0]}" = 0 ] || { echo "build.sh: building lpcore.ko failed" >&2; exit 1; }

# Test and benchmark modules.
for dir in tests bench; do
  mkdir -p "$out/$dir"
  cp "$here/$dir"/*.c "$here/$dir"/Kbuild "$here/include/livepatch.h" "$out/$dir/"
  make -s -C "$KDIR" M="$out/$dir" modules 2>&1 | grep -v "Skipping BTF generation" || true
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "build.sh: building $dir failed" >&2; exit 1; }
done
echo "build.sh: built $(ls "$out"/core/*.ko "$out"/tests/*.ko "$out"/bench/*.ko | wc -l) modules in $out"

#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, then runs every part.
# Usage: bash scripts/test.sh            (CI calls this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

section() { printf '\n==== %s ====\n' "$*"; }

section "install prerequisites"
bash scripts/install-deps.sh

section "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

section "lp-core for the kernel target (no_std)"
cargo build -p lp-core --target x86_64-unknown-none

section "unit, property, end-to-end and doc tests (workspace)"
cargo test --workspace

for part in fuzz lp-kernel lp-py examples; do
  if [ -x "$part/test.sh" ]; then
    section "$part"
    bash "$part/test.sh"
  fi
done
section "all tests passed"

#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, then runs every part.
# Usage: bash scripts/test.sh            (CI calls this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

section() { printf '\n==== %s ====\n' "$*"; }

section "install prerequisites"
bash scripts/install-deps.sh

# Every stage runs even when an earlier one failed, so that one run reports every failure; the
# script fails at the end if any stage did.
failed=()
stage() {
  local name=$1
  shift
  section "$name"
  if ! "$@"; then
    failed+=("$name")
    printf '\n!!!! stage failed: %s\n' "$name"
  fi
}

stage "format" cargo fmt --all -- --check
stage "lint" cargo clippy --workspace --all-targets -- -D warnings
stage "lp-core for the kernel target (no_std)" cargo build -p lp-core --target x86_64-unknown-none
stage "unit, property, end-to-end and doc tests (workspace)" cargo test --workspace --no-fail-fast

for part in fuzz lp-kernel lp-py examples; do
  if [ -x "$part/test.sh" ]; then
    stage "$part" bash "$part/test.sh"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  section "FAILED stages: ${failed[*]}"
  exit 1
fi
section "all tests passed"

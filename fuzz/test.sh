#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 30) on top of the
# committed corpus in fuzz/corpus/<target>. Needs nightly and cargo-fuzz (installed here).
set -euo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-30}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target"
  echo "fuzzing $target for ${secs}s"
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3
done

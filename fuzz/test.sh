#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 30), starting from the
# committed seed corpus in fuzz/corpus/<target>. New inputs go to a scratch directory, so a run
# never changes the committed corpus. Needs the pinned nightly (scripts/nightly.sh) and cargo-fuzz (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-30}
. ../scripts/nightly.sh
ensure_nightly
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo "+$LP_NIGHTLY" fuzz list); do
  mkdir -p "corpus/$target" "$scratch/$target"
  echo "fuzzing $target for ${secs}s"
  # The first corpus directory receives new inputs; the committed one is only read.
  cargo "+$LP_NIGHTLY" fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3
done

# The one nightly Rust toolchain the project uses: cargo-fuzz and the kernel module's
# `-Z build-std` need nightly. Pinned to a date so that a new nightly cannot break the build.
# Sourced (not run) by fuzz/test.sh and lp-kernel/{build,test}.sh.
LP_NIGHTLY=nightly-2026-05-20

# Installs the pinned nightly with rust-src when it is missing (a fresh machine).
ensure_nightly() {
  rustup run "$LP_NIGHTLY" rustc --version >/dev/null 2>&1 ||
    rustup toolchain install "$LP_NIGHTLY" --profile minimal --component rust-src
  rustup component list --toolchain "$LP_NIGHTLY" --installed | grep -q '^rust-src' ||
    rustup component add rust-src --toolchain "$LP_NIGHTLY"
}

//! Shared helpers for livepatch's benchmarks (see README for how to run them).

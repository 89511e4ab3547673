//! Python bindings for livepatch: the native module `livepatch._livepatch`.
//!
//! Built by maturin with the `python` feature (see `pyproject.toml`); the pure-Python package in
//! `python/livepatch` wraps it. The bindings only convert: every decision comes from `lp-core`
//! and every operation on a process from `lp-userspace`. Without the feature this crate is empty,
//! so the workspace builds and tests without a Python interpreter.
#[cfg(feature = "python")]
mod python;

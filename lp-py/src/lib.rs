//! Python bindings for livepatch; built by maturin with the `python` feature.

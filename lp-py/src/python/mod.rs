//! The `livepatch._livepatch` extension module: one file per concept it exposes.

// pyo3 0.22's `#[pyfunction]` expansion converts `PyResult` into itself; newer clippy flags that
// inside the macro output, not in our code.
#![allow(clippy::useless_conversion)]

mod convert;
mod core;
mod errors;
mod patch;
mod process;

use pyo3::prelude::*;

/// The native half of `import livepatch`. Scripts use the `livepatch` package, not this module.
#[pymodule]
fn _livepatch(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    core::register(m)?;
    patch::register(m)?;
    process::register(m)?;
    Ok(())
}

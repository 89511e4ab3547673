//! Errors as Python exceptions, and the guard that keeps Rust panics out of the interpreter.
//!
//! The exception classes live in the pure-Python module `livepatch._errors` (a class there may
//! subclass both `livepatch.Error` and a builtin such as `PermissionError`, which pyo3's
//! `create_exception!` cannot express). This side only picks the class by name.
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// An exception of class `class` (a name in `livepatch._errors`) carrying the CLI's one-line
/// message. Falls back to `RuntimeError` only if the Python half is missing (a broken install).
pub(crate) fn raise(py: Python<'_>, class: &str, message: String) -> PyErr {
    let built = py
        .import_bound("livepatch._errors")
        .and_then(|module| module.getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)));
    match built {
        Ok(value) => PyErr::from_value_bound(value),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// Runs `work` and turns a panic into `livepatch.InternalError` instead of letting it unwind
/// into the interpreter. Safe to call with or without the GIL held; the error is built later.
pub(crate) fn guarded<T>(work: impl FnOnce() -> T) -> Result<T, Panic> {
    catch_unwind(AssertUnwindSafe(work)).map_err(|payload| {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Panic(text)
    })
}

/// A panic caught by [`guarded`]; becomes `livepatch.InternalError`.
pub(crate) struct Panic(String);

impl Panic {
    pub(crate) fn into_pyerr(self, py: Python<'_>) -> PyErr {
        raise(
            py,
            "InternalError",
            format!("internal error (please report): {}", self.0),
        )
    }
}

/// `_livepatch._panic_for_test()`: panics inside the guard, so the tests can check that a Rust
/// panic surfaces as `livepatch.InternalError` and the interpreter keeps running.
#[pyfunction]
#[pyo3(name = "_panic_for_test")]
fn panic_for_test(py: Python<'_>) -> PyResult<()> {
    guarded(|| panic!("deliberate panic to test the guard")).map_err(|p| p.into_pyerr(py))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(panic_for_test, m)?)?;
    Ok(())
}

//! `livepatch.Patch`: a patch file, as `lp_userspace::patchfile` reads and writes it.
use std::path::PathBuf;

use lp_userspace::pack::{self, Replacement};
use lp_userspace::patchfile::{FunctionPatch, Patch, PatchFileError};
use lp_userspace::Error;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::{guarded, raise};
use super::process::class_of;

/// A live patch for one target module: the new code and the functions it replaces.
///
/// Load one with `Patch.load(path)` or make one with `livepatch.pack(...)`.
#[pyclass(module = "livepatch", name = "Patch", frozen)]
pub(crate) struct PyPatch(pub(crate) Patch);

/// One function a patch replaces.
#[pyclass(module = "livepatch", name = "Function", frozen)]
pub(crate) struct PyFunction(FunctionPatch);

#[pymethods]
impl PyFunction {
    /// The old function in the target (`name`, `name@file.c` or `name,N`).
    #[getter]
    fn old_name(&self) -> &str {
        &self.0.old_name
    }
    /// Its address in the target file (before the module's load bias).
    #[getter]
    fn old_vaddr(&self) -> u64 {
        self.0.old_vaddr
    }
    /// Its size in bytes.
    #[getter]
    fn old_size(&self) -> u64 {
        self.0.old_size
    }
    /// The bytes it must have in memory before the patch is applied.
    #[getter]
    fn old_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new_bound(py, &self.0.old_bytes)
    }
    /// The replacement's symbol in the patch object.
    #[getter]
    fn new_name(&self) -> &str {
        &self.0.new_name
    }
    fn __repr__(&self) -> String {
        format!(
            "Function(old_name={:?}, new_name={:?}, old_vaddr={:#x}, old_size={})",
            self.0.old_name, self.0.new_name, self.0.old_vaddr, self.0.old_size
        )
    }
}

#[pymethods]
impl PyPatch {
    /// Reads a patch file. Raises `PatchFormatError` for a truncated, corrupted or unknown file.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        // The CLI's loader: a format error names the file, in the same words.
        match py.allow_threads(|| guarded(|| lp_userspace::cli::load_patch(&path))) {
            Ok(Ok(patch)) => Ok(PyPatch(patch)),
            Ok(Err(e)) => Err(raise(py, class_of(e.kind()), e.to_string())),
            Err(panic) => Err(panic.into_pyerr(py)),
        }
    }
    /// Parses the bytes of a patch file.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        into_py_result(py, guarded(|| Patch::from_bytes(data))).map(PyPatch)
    }
    /// Writes the patch file to `path`.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let saved = py.allow_threads(|| guarded(|| self.0.save(&path)));
        into_py_result(py, saved)
    }
    /// The bytes of the patch file.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new_bound(py, &self.0.to_bytes())
    }
    /// The patch id: a hash of its content (equal content, equal id).
    #[getter]
    fn id(&self) -> &str {
        &self.0.id
    }
    /// The target module's file name (`app`, `libfoo.so.1`).
    #[getter]
    fn target_name(&self) -> &str {
        &self.0.target_name
    }
    /// The target module's GNU build-id, in hex.
    #[getter]
    fn target_build_id(&self) -> String {
        self.0.target_build_id_hex()
    }
    /// The functions the patch replaces.
    #[getter]
    fn functions(&self) -> Vec<PyFunction> {
        self.0.functions.iter().cloned().map(PyFunction).collect()
    }
    /// The relocatable object holding the new code.
    #[getter]
    fn object<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new_bound(py, &self.0.object)
    }
    fn __eq__(&self, other: &Self) -> bool {
        self.0 == other.0
    }
    /// Patches hash by id (equal content, equal id), so they can key dicts and sets.
    fn __hash__(&self) -> u64 {
        u64::from_str_radix(self.0.id.get(..16).unwrap_or(&self.0.id), 16).unwrap_or(0)
    }
    fn __repr__(&self) -> String {
        let names: Vec<&str> = self
            .0
            .functions
            .iter()
            .map(|f| f.old_name.as_str())
            .collect();
        format!(
            "Patch(id={:?}, target_name={:?}, target_build_id={:?}, functions={:?})",
            self.0.id,
            self.0.target_name,
            self.0.target_build_id_hex(),
            names
        )
    }
}

/// The Python result of a patch file operation: errors classed as the CLI classes them.
fn into_py_result<T>(
    py: Python<'_>,
    r: Result<Result<T, PatchFileError>, super::errors::Panic>,
) -> PyResult<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let e = Error::from(e);
            Err(raise(py, class_of(e.kind()), e.to_string()))
        }
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

/// Packs a patch for `target` (an executable or shared library) from the new functions in
/// `object` (`gcc -c -fPIC`), writes it to `out` unless `out` is `None`, and returns it.
/// `replace` holds `OLD[=NEW]` specifications, as the CLI's `--replace`.
#[pyfunction]
#[pyo3(signature = (target, object, out, replace = Vec::new()))]
fn pack_patch(
    py: Python<'_>,
    target: PathBuf,
    object: PathBuf,
    out: Option<PathBuf>,
    replace: Vec<String>,
) -> PyResult<PyPatch> {
    let made = py.allow_threads(|| {
        guarded(|| -> Result<Patch, Error> {
            let replace = replace
                .iter()
                .map(|r| r.parse::<Replacement>())
                .collect::<Result<Vec<_>, _>>()?;
            let patch = pack::pack(&target, &object, &replace)?;
            if let Some(out) = &out {
                patch.save(out)?;
            }
            Ok(patch)
        })
    });
    match made {
        Ok(Ok(patch)) => Ok(PyPatch(patch)),
        Ok(Err(e)) => Err(raise(py, class_of(e.kind()), e.to_string())),
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPatch>()?;
    m.add_class::<PyFunction>()?;
    m.add_function(wrap_pyfunction!(pack_patch, m)?)?;
    Ok(())
}

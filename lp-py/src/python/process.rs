//! apply / revert / status on running processes: `lp_userspace`'s library functions, called with
//! the GIL released (stop mode may retry for the whole timeout), errors mapped by their kind.
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use lp_userspace::apply::{self, ApplyOptions, Mode};
use lp_userspace::maps::{self, MapsError};
use lp_userspace::{revert, status, Error, ErrorKind};
use pyo3::prelude::*;

use super::convert::to_py;
use super::errors::{guarded, raise, Panic};
use super::patch::PyPatch;

/// The exception class (in `livepatch._errors`) for an error of this kind.
pub(crate) fn class_of(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Busy => "BusyError",
        ErrorKind::Mismatch => "MismatchError",
        ErrorKind::Permission => "AccessError",
        ErrorKind::ProcessGone => "ProcessGoneError",
        ErrorKind::PatchFormat => "PatchFormatError",
        ErrorKind::NotElf => "InputError",
        ErrorKind::AlreadyApplied => "AlreadyAppliedError",
        ErrorKind::NotFound => "NotFoundError",
        ErrorKind::NotTop => "NotTopError",
        ErrorKind::Unsupported => "RefusedError",
        ErrorKind::Io => "IoError",
        ErrorKind::Other => "Error",
    }
}

/// Held by every apply and revert of this Python process. With the GIL released, script threads
/// may patch in parallel; lp-userspace reads a target's state before it attaches, so two changes
/// of one target at once could each record over the other. One at a time keeps the in-target
/// state exact; other Python threads (and status, pack) still run meanwhile.
static CHANGING: Mutex<()> = Mutex::new(());

fn one_change_at_a_time() -> MutexGuard<'static, ()> {
    // A panic while held was caught by `guarded` and reported; the lock protects no data.
    CHANGING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The Python result of an lp-userspace call made under [`guarded`].
fn finish<T>(py: Python<'_>, r: Result<Result<T, Error>, Panic>) -> PyResult<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(raise(py, class_of(e.kind()), e.to_string())),
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

fn parse_mode(py: Python<'_>, mode: &str) -> PyResult<Mode> {
    match mode {
        "stop" => Ok(Mode::Stop),
        "nonstop" => Ok(Mode::Nonstop),
        other => Err(raise(
            py,
            "InputError",
            format!("unknown mode `{other}` (expected \"stop\" or \"nonstop\")"),
        )),
    }
}

fn parse_timeout(py: Python<'_>, seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        raise(
            py,
            "InputError",
            format!("bad timeout {seconds}: expected a number of seconds >= 0"),
        )
    })
}

/// Applies `patch` to process `pid`; returns what the CLI reports (a dict).
#[pyfunction]
#[pyo3(signature = (pid, patch, mode = "stop", timeout = 5.0))]
fn apply_patch(
    py: Python<'_>,
    pid: i32,
    patch: &PyPatch,
    mode: &str,
    timeout: f64,
) -> PyResult<PyObject> {
    let opts = ApplyOptions {
        mode: parse_mode(py, mode)?,
        timeout: parse_timeout(py, timeout)?,
    };
    let patch = &patch.0;
    let done = py.allow_threads(|| {
        let _changing = one_change_at_a_time();
        guarded(|| apply::apply(pid, patch, opts))
    });
    to_py(py, serde_json::to_value(finish(py, done)?))
}

/// Reverts patch `patch_id` (an id or a unique prefix; the newest when `None`) of process `pid`.
#[pyfunction]
#[pyo3(signature = (pid, patch_id = None, mode = "stop", timeout = 5.0))]
fn revert_patch(
    py: Python<'_>,
    pid: i32,
    patch_id: Option<String>,
    mode: &str,
    timeout: f64,
) -> PyResult<PyObject> {
    let mode = parse_mode(py, mode)?;
    let timeout = parse_timeout(py, timeout)?;
    let done = py.allow_threads(|| {
        let _changing = one_change_at_a_time();
        guarded(|| revert::revert(pid, patch_id.as_deref(), mode, timeout))
    });
    to_py(py, serde_json::to_value(finish(py, done)?))
}

/// The patches applied to `pid`, or to every process with livepatch state: the records of
/// `livepatch status --json`.
#[pyfunction]
#[pyo3(signature = (pid = None))]
fn status_of(py: Python<'_>, pid: Option<i32>) -> PyResult<PyObject> {
    let done = py.allow_threads(|| guarded(|| status::status(pid)));
    to_py(py, serde_json::to_value(finish(py, done)?))
}

/// The exception class for an I/O error on a file the caller named.
fn io_class(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "AccessError",
        _ => "IoError",
    }
}

/// The pids of the processes that map the file at `path` (by device and inode).
#[pyfunction]
fn processes_mapping(py: Python<'_>, path: PathBuf) -> PyResult<Vec<i32>> {
    match py.allow_threads(|| guarded(|| maps::processes_mapping(&path))) {
        Ok(Ok(pids)) => Ok(pids),
        Ok(Err(e)) => {
            let class = match &e {
                MapsError::Stat { source, .. } | MapsError::Io { source, .. } => io_class(source),
                MapsError::Malformed { .. } => "Error",
            };
            Err(raise(py, class, e.to_string()))
        }
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(apply_patch, m)?)?;
    m.add_function(wrap_pyfunction!(revert_patch, m)?)?;
    m.add_function(wrap_pyfunction!(status_of, m)?)?;
    m.add_function(wrap_pyfunction!(processes_mapping, m)?)?;
    Ok(())
}

//! `livepatch.core`: lp-core's site validation and write planning, read-only, for scripts that
//! inspect a binary. Nothing here touches a process; it converts lp-core's values.
use lp_core::clobber::{self, Regs, SYSV_CALLER_SAVED};
use lp_core::jump::{ABS_JUMP_LEN, REL32_JUMP_LEN};
use lp_core::plan::{self, Step, WritePlan};
use lp_core::site::{self, Site};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyList};

use super::errors::{guarded, raise};

/// A validated patch site (`lp_core::site::Site`): where the redirect goes and what it displaces.
#[pyclass(module = "livepatch.core", name = "Site", frozen)]
pub(crate) struct PySite(Site);

#[pymethods]
impl PySite {
    /// The function's first byte (its symbol address).
    #[getter]
    fn entry(&self) -> u64 {
        self.0.entry
    }
    /// Where the redirect is written: the entry, or just after its `endbr64`.
    #[getter]
    fn patch_addr(&self) -> u64 {
        self.0.patch_addr
    }
    /// Offset of the patch address from the entry (0, or 4 after `endbr64`).
    #[getter]
    fn patch_offset(&self) -> usize {
        self.0.patch_offset()
    }
    /// Bytes of the whole instructions the redirect covers.
    #[getter]
    fn displaced_len(&self) -> usize {
        self.0.displaced_len
    }
    /// Number of instructions the redirect covers.
    #[getter]
    fn displaced_count(&self) -> usize {
        self.0.displaced_count
    }
    /// The original bytes of the displaced instructions.
    #[getter]
    fn displaced<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new_bound(py, self.0.displaced())
    }
    /// The first original instruction after the displaced ones (where a trampoline returns).
    #[getter]
    fn resume_addr(&self) -> u64 {
        self.0.resume_addr()
    }
    /// The jump length the site was validated for.
    #[getter]
    fn jump_len(&self) -> usize {
        self.0.jump_len
    }
    /// The entry starts with `endbr64` (kept intact; the redirect follows it).
    #[getter]
    fn endbr64(&self) -> bool {
        self.0.endbr64
    }
    /// Bytes of NOP padding right at the patch address.
    #[getter]
    fn entry_nops(&self) -> usize {
        self.0.entry_nops
    }
    /// Branches in the function that target the patch address itself.
    #[getter]
    fn branches_to_patch_addr(&self) -> usize {
        self.0.branches_to_patch_addr
    }
    /// Displaced instructions that are RIP-relative (re-encoded in a trampoline).
    #[getter]
    fn relative_in_displaced(&self) -> usize {
        self.0.relative_in_displaced
    }
    /// The function contains indirect jumps, whose targets cannot be checked from its bytes.
    #[getter]
    fn indirect_branches(&self) -> bool {
        self.0.indirect_branches
    }
    fn __repr__(&self) -> String {
        format!(
            "Site(entry={:#x}, patch_addr={:#x}, displaced_len={}, endbr64={})",
            self.0.entry,
            self.0.patch_addr,
            self.0.displaced_len,
            if self.0.endbr64 { "True" } else { "False" }
        )
    }
}

/// One step of a write plan: `kind` is `"write"` (store `data` at `addr`) or `"sync"`
/// (serialise every thread that may execute the site before going on).
#[pyclass(module = "livepatch.core", name = "Step", frozen)]
pub(crate) struct PyStep(Step);

#[pymethods]
impl PyStep {
    /// `"write"` or `"sync"`.
    #[getter]
    fn kind(&self) -> &'static str {
        match self.0 {
            Step::Write { .. } => "write",
            Step::Sync => "sync",
        }
    }
    /// The first byte written, or `None` for a sync.
    #[getter]
    fn addr(&self) -> Option<u64> {
        self.0.data().map(|(addr, _)| addr)
    }
    /// The bytes written, or `None` for a sync.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.0.data().map(|(_, data)| PyBytes::new_bound(py, data))
    }
    fn __eq__(&self, other: &Self) -> bool {
        self.0 == other.0
    }
    fn __repr__(&self) -> String {
        match self.0.data() {
            Some((addr, data)) => format!("Step.write({addr:#x}, {})", hex(data)),
            None => "Step.sync()".to_string(),
        }
    }
}

/// The ordered steps that rewrite `expected` into `result` at `addr` (int3 → sync → tail → sync
/// → first byte → sync). Iterating over a plan, or `len()`, goes through its steps.
#[pyclass(module = "livepatch.core", name = "WritePlan", frozen)]
pub(crate) struct PyWritePlan(WritePlan);

#[pymethods]
impl PyWritePlan {
    /// The steps in order.
    #[getter]
    fn steps(&self) -> Vec<PyStep> {
        self.0.steps().iter().copied().map(PyStep).collect()
    }
    /// Address of the first byte the plan covers.
    #[getter]
    fn addr(&self) -> u64 {
        self.0.addr()
    }
    /// What must be at `addr` before the first step (anything else: refuse).
    #[getter]
    fn expected<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new_bound(py, self.0.expected())
    }
    /// What is at `addr` after the last step.
    #[getter]
    fn result<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new_bound(py, self.0.result())
    }
    fn __len__(&self) -> usize {
        self.0.steps().len()
    }
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyIterator>> {
        let steps = self.steps().into_iter().map(|s| s.into_py(py));
        PyList::new_bound(py, steps).as_any().iter()
    }
    fn __repr__(&self) -> String {
        format!(
            "WritePlan(addr={:#x}, expected={}, result={}, steps={})",
            self.0.addr(),
            hex(self.0.expected()),
            hex(self.0.result()),
            self.0.steps().len()
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Validates the patch site of the function whose bytes `code` (its whole symbol size, as in
/// memory) start at `address`, for a redirect of `jump_len` bytes. Raises `livepatch.SiteError`
/// with lp-core's reason when the entry cannot take a redirect.
#[pyfunction]
#[pyo3(signature = (code, address, jump_len = REL32_JUMP_LEN))]
#[pyo3(text_signature = "(code, address, jump_len=5)")]
fn validate_site(py: Python<'_>, code: &[u8], address: u64, jump_len: usize) -> PyResult<PySite> {
    match guarded(|| site::validate_site(code, address, jump_len)) {
        Ok(Ok(site)) => Ok(PySite(site)),
        Ok(Err(e)) => Err(raise(py, "SiteError", e.to_string())),
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

/// The write plan redirecting `site` to `target`; `current` is what is at `site.patch_addr` now
/// (its original bytes, or a redirect of an earlier patch when stacking).
#[pyfunction]
fn plan_apply(py: Python<'_>, site: &PySite, current: &[u8], target: u64) -> PyResult<PyWritePlan> {
    planned(py, || plan::plan_apply(&site.0, current, target))
}

/// The write plan rewriting `current` (the bytes now at `addr`) into `new` (1..=16 bytes each).
#[pyfunction]
fn plan_write(py: Python<'_>, addr: u64, current: &[u8], new: &[u8]) -> PyResult<PyWritePlan> {
    planned(py, || plan::plan_write(addr, current, new))
}

/// The plan that takes an applied plan back: the same protocol, from its result to its expected.
#[pyfunction]
fn plan_revert(py: Python<'_>, applied: &PyWritePlan) -> PyResult<PyWritePlan> {
    planned(py, || Ok(plan::plan_revert(&applied.0)))
}

fn planned(
    py: Python<'_>,
    make: impl FnOnce() -> Result<WritePlan, plan::PlanError>,
) -> PyResult<PyWritePlan> {
    match guarded(make) {
        Ok(Ok(plan)) => Ok(PyWritePlan(plan)),
        Ok(Err(e)) => Err(raise(py, "PlanError", e.to_string())),
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

/// Lower-case register names (`"rax"`, `"flags"`, `"xmm0"`, `"x87"`...) of a register set.
fn register_names(regs: Regs) -> Vec<String> {
    regs.iter_names()
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect()
}

/// The registers the function whose bytes `code` start at `address` may leave changed for its
/// caller (following its own control flow; a call elsewhere counts as every caller-saved
/// register). Raises `livepatch.SiteError` when the bytes cannot be decoded.
#[pyfunction]
fn clobbered_registers(py: Python<'_>, code: &[u8], address: u64) -> PyResult<Vec<String>> {
    match guarded(|| clobber::clobbered_registers(code, address)) {
        Ok(Ok(regs)) => Ok(register_names(regs)),
        Ok(Err(e)) => Err(raise(py, "SiteError", e.to_string())),
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

/// The registers the function's own reachable instructions write, calls' effects left out: a
/// lower bound of what gcc's `-fipa-ra` assumed the function clobbers.
#[pyfunction]
fn written_registers(py: Python<'_>, code: &[u8], address: u64) -> PyResult<Vec<String>> {
    match guarded(|| clobber::written_registers(code, address)) {
        Ok(Ok(regs)) => Ok(register_names(regs)),
        Ok(Err(e)) => Err(raise(py, "SiteError", e.to_string())),
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

/// The caller-saved registers a thunk around the replacement must save and restore so that
/// callers of the old function compiled with `-fipa-ra` keep what they rely on.
#[pyfunction]
fn registers_to_preserve(
    py: Python<'_>,
    old_code: &[u8],
    old_address: u64,
    new_code: &[u8],
    new_address: u64,
) -> PyResult<Vec<String>> {
    let computed =
        guarded(|| clobber::registers_to_preserve(old_code, old_address, new_code, new_address));
    match computed {
        Ok(Ok(regs)) => Ok(register_names(regs)),
        Ok(Err(e)) => Err(raise(py, "SiteError", e.to_string())),
        Err(panic) => Err(panic.into_pyerr(py)),
    }
}

/// The registers a SysV x86-64 callee may change without restoring them.
#[pyfunction]
fn sysv_caller_saved() -> Vec<String> {
    register_names(SYSV_CALLER_SAVED)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("REL32_JUMP_LEN", REL32_JUMP_LEN)?;
    m.add("ABS_JUMP_LEN", ABS_JUMP_LEN)?;
    m.add_class::<PySite>()?;
    m.add_class::<PyStep>()?;
    m.add_class::<PyWritePlan>()?;
    m.add_function(wrap_pyfunction!(validate_site, m)?)?;
    m.add_function(wrap_pyfunction!(plan_apply, m)?)?;
    m.add_function(wrap_pyfunction!(plan_write, m)?)?;
    m.add_function(wrap_pyfunction!(plan_revert, m)?)?;
    m.add_function(wrap_pyfunction!(clobbered_registers, m)?)?;
    m.add_function(wrap_pyfunction!(written_registers, m)?)?;
    m.add_function(wrap_pyfunction!(registers_to_preserve, m)?)?;
    m.add_function(wrap_pyfunction!(sysv_caller_saved, m)?)?;
    Ok(())
}

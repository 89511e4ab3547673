//! What debuggers, profilers and the C++ runtime need to know about patch code, registered
//! after an apply and withdrawn by the revert.
//!
//! - **C++ exceptions**: the unwinder of libgcc only finds frames of code it has CFI for. The
//!   patch image's relocated `.eh_frame` is registered inside the target with libgcc_s's
//!   `__register_frame` (a remote call), so an exception thrown by, or through, a new function
//!   still reaches its handler. Targets without libgcc_s (plain C) have no unwinder to tell and
//!   are skipped. Revert calls `__deregister_frame` before the patch memory is freed.
//! - **perf**: `/tmp/perf-PID.map` gets one line per new function ([`crate::perf_map`]).
//! - **gdb**: the patch object is saved as `/tmp/livepatch-PID-ID.o` and the `add-symbol-file`
//!   command placing its sections where they were linked is appended to
//!   `/tmp/livepatch-PID.gdb`: `gdb -p PID -x /tmp/livepatch-PID.gdb` names the new functions.
//!   The command is part of the state (`livepatch status` shows it); the perf and gdb files
//!   are written while the switch runs ([`write_names`]).
//! - **trampolines, thunks and dispatches** (code livepatch generates around the patch) get a
//!   generated `.eh_frame` too ([`crate::thunk_cfi`], [`trampoline_cfi`]), registered the same
//!   way, and names ([`stub_names`]): a perf map line each (`livepatch dispatch F`,
//!   `livepatch trampoline F`, `livepatch thunk F`), and, for gdb, a symbol file of their own
//!   (`/tmp/livepatch-PID-ID-stubs.o`, [`stub_object`], with their `.eh_frame` so that gdb
//!   unwinds through them) whose `add-symbol-file` command is a second line in the script.
//! - **stack checks**: the image's `.eh_frame` location is kept in the in-target state
//!   ([`DebugRecord`]), so a later stop-mode check unwinds threads inside patch code with its
//!   CFI ([`add_patch_cfi`]) instead of scanning their stacks conservatively.
//!
//! None of this decides whether a patch is live: a failure here is reported as a warning and
//! the patch stays applied (or reverted).

mod stale_files;
pub mod stub_names;
pub mod stub_object;
mod trampoline_cfi;

pub use trampoline_cfi::{trampoline_frame, ModuleCfi};

use crate::apply::Error;
use crate::link::{LinkedImage, Protection};
use crate::patchfile::Patch;
use crate::perf_map::open_own;
use crate::process::Tracee;
use crate::state::{AppliedFunction, AppliedPatch};
use crate::thunk_cfi::FrameCfi;
use crate::unwind::{CfiSource, Unwinder};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// How long a remote `__register_frame`/`__deregister_frame` may take (it waits for
/// libgcc's object lock, held only briefly by a thread that is unwinding).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What an apply registered for a patch; kept in the in-target state with the patch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DebugRecord {
    /// Runtime address of the image's `.eh_frame` (zero-terminated); 0 when it has none.
    pub eh_frame: u64,
    /// Its length in bytes, terminator included.
    pub eh_frame_len: u64,
    /// Code the `.eh_frame` describes: `[text_start, text_end)`.
    pub text_start: u64,
    /// End of that code.
    pub text_end: u64,
    /// An `int3` byte in the image's code pages, past its code: where remote calls return.
    pub trap: u64,
    /// `__register_frame` was called in the target (revert must deregister).
    pub frame_registered: bool,
    /// Runtime address of the `.eh_frame` written for the register-preserving thunks and the
    /// trampolines (after them in the patch memory, or in the image's spare code bytes; see
    /// [`crate::thunk_cfi`]); 0 when there is none. (The field names predate trampoline CFI.)
    #[serde(default)]
    pub thunk_eh_frame: u64,
    /// Its length in bytes, terminator included.
    #[serde(default)]
    pub thunk_eh_frame_len: u64,
    /// The thunks and trampolines it describes: `[thunks_start, thunks_end)`.
    #[serde(default)]
    pub thunks_start: u64,
    /// End of the thunks and trampolines.
    #[serde(default)]
    pub thunks_end: u64,
    /// `__register_frame` was called for the thunks' and trampolines' `.eh_frame`.
    #[serde(default)]
    pub thunk_frame_registered: bool,
    /// The gdb command naming the new functions (its object file is saved beside it).
    pub gdb_command: String,
    /// The gdb command naming the trampolines, thunks and dispatches (its symbol file,
    /// [`stub_object`], is saved beside the patch's); empty when there are none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gdb_stubs_command: String,
    /// Those pieces of code, as the apply built them ([`GeneratedCode`]), for [`write_names`].
    /// Not kept in the state: a revert removes their names by the patch's id.
    #[serde(skip)]
    pub stubs: Vec<stub_names::StubSymbol>,
    /// The bytes of their `.eh_frame` (at `thunk_eh_frame`), for the same file. Not kept in
    /// the state either.
    #[serde(skip)]
    pub stubs_eh_frame: Vec<u8>,
}

impl DebugRecord {
    /// The generated code's `.eh_frame` (address and bytes), when one was written.
    fn stubs_cfi(&self) -> stub_object::EhFrame<'_> {
        (self.thunk_eh_frame != 0 && !self.stubs_eh_frame.is_empty())
            .then_some((self.thunk_eh_frame, &self.stubs_eh_frame[..]))
    }
}

/// The object file saved for gdb.
pub fn gdb_object_path(pid: i32, id: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/livepatch-{pid}-{id}.o"))
}

/// The symbol file saved for gdb naming the trampolines, thunks and dispatches of patch `id`.
pub fn gdb_stubs_object_path(pid: i32, id: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/livepatch-{pid}-{id}-stubs.o"))
}

/// The gdb script holding the `add-symbol-file` commands of every applied patch.
pub fn gdb_script_path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/tmp/livepatch-{pid}.gdb"))
}

fn warn(what: &str) {
    eprintln!("livepatch: warning: {what}");
}

/// The CFI of `function`'s trampoline (`code`, built for `site` at `at`), from the original
/// function's CFI in `cfi`. A trampoline whose CFI cannot be reproduced is left out with a
/// warning (unwinding through it then stops there, as before trampolines had CFI).
pub fn function_trampoline_frame(
    cfi: &ModuleCfi<'_>,
    function: &str,
    site: &lp_core::site::Site,
    at: u64,
    code: &[u8],
) -> Option<FrameCfi> {
    match trampoline_frame(cfi, site, at, code) {
        Ok(frame) => Some(frame),
        Err(e) => {
            warn(&format!(
                "no unwind information for the trampoline of {function}: {e}"
            ));
            None
        }
    }
}

/// The code an apply generated around a patch (trampolines, register-preserving thunks,
/// dispatches, its callers' trampolines), described as it was built: nothing of it is read
/// back from the target.
#[derive(Debug, Default)]
pub struct GeneratedCode {
    /// Its CFI, in the order the `.eh_frame` written for it lists them: the functions'
    /// trampolines, then the dispatches and the callers' trampolines, then the thunks.
    pub frames: Vec<FrameCfi>,
    /// Why a thunk has no CFI (its bytes are not a thunk's shape): then none of the generated
    /// code gets an `.eh_frame`.
    pub unframed: Option<String>,
    /// Its names for perf and gdb.
    pub stubs: Vec<stub_names::StubSymbol>,
}

/// Before the switch, once the patch code is written (nothing runs it yet): registers the
/// patch (`image`, as written at its load address; the code generated around it in
/// `generated`; the patch memory ends at `code_end`) with the C++
/// runtime of the process (found among its `mappings`, read earlier by the apply). Registration must precede the switch: the first call of a new function may throw.
/// The record goes into the in-target state with the patch, with the gdb command that
/// [`write_names`] makes work; [`undo`] withdraws it when the switch fails.
///
/// Errors only when the target has libgcc's unwinder and it could not be told about the new
/// code (an exception through it would terminate the process): the apply is then refused.
#[allow(clippy::too_many_arguments)]
pub fn before_switch(
    t: &mut Tracee,
    mappings: &[crate::maps::Mapping],
    patch: &Patch,
    functions: &[AppliedFunction],
    image: &LinkedImage,
    generated: GeneratedCode,
    code_end: u64,
) -> Result<DebugRecord, Error> {
    let pid = t.pid();
    let mut record = describe(image);
    let GeneratedCode {
        frames,
        unframed,
        stubs,
    } = generated;
    let thunk_cfi = match unframed {
        Some(e) => Err(e),
        None => write_stub_cfi(t, functions, frames, code_end, &mut record),
    };
    if let Some(register) = unwinder_function(pid, mappings, "__register_frame") {
        register_frames(t, image, &mut record, register, thunk_cfi).map_err(|e| {
            Error::Other(format!(
                "cannot register the patch's unwind information in process {pid} (a C++ exception through the new code would terminate it): {e}"
            ))
        })?;
    } else if let Err(e) = thunk_cfi {
        warn(&format!(
            "no unwind information for the register-preserving thunks and trampolines: {e}"
        ));
    }
    record.gdb_command =
        crate::perf_map::gdb_add_symbol_file(&gdb_object_path(pid, &patch.id), image);
    record.stubs = stubs;
    record.gdb_stubs_command = stub_object::gdb_command(
        &gdb_stubs_object_path(pid, &patch.id),
        &record.stubs,
        record.stubs_cfi(),
    )
    .unwrap_or_default();
    // Only on request: formatting the record takes longer than the phases the trace times.
    if std::env::var_os("LIVEPATCH_TRACE").is_some_and(|v| v == "debug") {
        eprintln!("livepatch: trace: debug info {record:x?}");
    }
    Ok(record)
}

/// Names the new functions and the generated code around them for perf (`/tmp/perf-PID.map`)
/// and saves the objects and the gdb commands [`before_switch`] recorded. Not needed before the switch: apply writes them while
/// the switch runs, on another thread, and waits for them before it detaches (so no other
/// livepatch can revert meanwhile) or undoes a failed switch. Files that cannot be written
/// give warnings; the patch stays.
pub fn write_names(pid: i32, patch: &Patch, image: &LinkedImage, record: &DebugRecord) {
    let stubs = stub_names::perf_lines(&record.stubs, &patch.id);
    if let Err(e) = crate::perf_map::record_with(pid, &image.symbol_list, &stubs, &patch.id) {
        warn(&format!(
            "cannot write {}: {e}",
            crate::perf_map::path(pid).display()
        ));
    }
    if let Err(e) = save_gdb_commands(pid, patch, record) {
        warn(&format!(
            "cannot save the gdb symbol file (`livepatch status` shows a command that will not work): {e}"
        ));
    }
}

/// Registers the image's `.eh_frame` and the thunks' with `__register_frame` at `register`.
/// On failure nothing stays registered.
fn register_frames(
    t: &mut Tracee,
    image: &LinkedImage,
    r: &mut DebugRecord,
    register: u64,
    thunk_cfi: Result<(), String>,
) -> Result<(), String> {
    if r.eh_frame == 0 {
        return Ok(()); // compiled without unwind tables: nothing to tell
    }
    thunk_cfi.map_err(|e| format!("register-preserving thunks: {e}"))?;
    if r.trap == 0 {
        return Err("no spare byte in the patch's code pages for the call's return trap".into());
    }
    let written = t.mem().read_vec(r.eh_frame, r.eh_frame_len as usize);
    if written.ok().as_deref() != image.eh_frame_bytes() {
        return Err("the unwind information in memory differs from the linked image".into());
    }
    remote_call(t, "__register_frame", register, r, r.eh_frame)?;
    r.frame_registered = true;
    if r.thunk_eh_frame != 0 {
        if let Err(e) = remote_call(t, "__register_frame", register, r, r.thunk_eh_frame) {
            if !undo_frames(t, r) {
                return Err(format!("{e}; and the patch's own could not be withdrawn"));
            }
            return Err(e);
        }
        r.thunk_frame_registered = true;
    }
    Ok(())
}

/// Where the image's CFI, code and spare code byte are.
fn describe(image: &LinkedImage) -> DebugRecord {
    let text_start = image.text_ranges.iter().map(|r| r.start).min().unwrap_or(0);
    let text_end = image.text_ranges.iter().map(|r| r.end).max().unwrap_or(0);
    // The last byte of the last code page, when no code reaches it: padding of ours.
    let trap = image
        .regions
        .iter()
        .filter(|r| r.prot == Protection::ReadExec)
        .map(|r| image.load_addr + r.offset + r.len - 1)
        .max()
        .filter(|&last| last >= text_end)
        .unwrap_or(0);
    let (eh_frame, eh_frame_len) = image
        .eh_frame
        .as_ref()
        .map_or((0, 0), |r| (r.start, r.end - r.start));
    DebugRecord {
        eh_frame,
        eh_frame_len,
        text_start,
        text_end,
        trap,
        gdb_command: String::new(),
        ..DebugRecord::default()
    }
}

/// Writes the `.eh_frame` of the generated code (`frames`: its trampolines, thunks and
/// dispatches) after the last of them and of every trampoline of `functions` in the patch
/// memory (which ends at `code_end`) or, when that is full, into the image's spare code bytes
/// (between its code and the trap byte).
fn write_stub_cfi(
    t: &mut Tracee,
    functions: &[AppliedFunction],
    frames: Vec<FrameCfi>,
    code_end: u64,
    r: &mut DebugRecord,
) -> Result<(), String> {
    if frames.is_empty() {
        return Ok(());
    }
    let stubs_start = frames.iter().map(|f| f.start).min().unwrap_or(0);
    let stubs_end = frames.iter().map(|f| f.start + f.len).max().unwrap_or(0);
    // Trampolines without CFI (a tail call's, or one whose original CFI could not be
    // re-emitted) lie among the others: the .eh_frame goes after them too, or it overwrites
    // one (review session 5, #7: a trapping thread sent there died of SIGSEGV). Their length
    // is not recorded; no trampoline is longer than MAX_TRAMPOLINE_LEN.
    let unframed_end = functions
        .iter()
        .flat_map(|f| {
            std::iter::once(f.trampoline).chain(f.call_sites.iter().map(|c| c.trampoline))
        })
        .filter(|&at| at != 0 && !frames.iter().any(|fr| fr.start == at))
        .map(|at| at + lp_core::trampoline::MAX_TRAMPOLINE_LEN as u64)
        .max()
        .unwrap_or(0);
    let after_stubs = stubs_end.max(unframed_end).next_multiple_of(8);
    let len = crate::thunk_cfi::eh_frame(&frames, after_stubs).len() as u64;
    let at = if after_stubs + len <= code_end {
        after_stubs
    } else {
        let at = r.text_end.next_multiple_of(8);
        if r.trap == 0 || at + len > r.trap {
            return Err("not enough spare bytes in the patch memory".into());
        }
        at
    };
    let bytes = crate::thunk_cfi::eh_frame(&frames, at);
    t.mem().write(at, &bytes).map_err(|e| e.to_string())?;
    r.stubs_eh_frame = bytes.clone();
    r.thunk_eh_frame = at;
    r.thunk_eh_frame_len = bytes.len() as u64;
    r.thunks_start = stubs_start;
    r.thunks_end = stubs_end;
    Ok(())
}

/// Saves the patch object (and the stubs' symbol file) and appends their `add-symbol-file`
/// commands (in `record`) to the gdb script.
fn save_gdb_commands(pid: i32, patch: &Patch, record: &DebugRecord) -> std::io::Result<()> {
    use std::io::Write;
    // Files of ours only: a gdb script planted by another user would run its `shell` lines as
    // whoever loads it (see `open_own`).
    open_own(&gdb_object_path(pid, &patch.id), false, None)?
        .0
        .write_all(&patch.object)?;
    let mut cmds = format!("{}\n", record.gdb_command);
    if let Some(stubs) = stub_object::build(&record.stubs, record.stubs_cfi()) {
        open_own(&gdb_stubs_object_path(pid, &patch.id), false, None)?
            .0
            .write_all(&stubs)?;
        cmds.push_str(&format!("{}\n", record.gdb_stubs_command));
    }
    // The script is named by pid, and pids are reused: one left by a dead process that had the
    // same pid (its header names another start time) is started afresh, not appended to.
    let header = gdb_script_header(pid);
    let path = gdb_script_path(pid);
    let current = std::fs::read_to_string(&path).is_ok_and(|t| t.starts_with(&header));
    let (mut script, fresh) = open_own(&path, current, None)?;
    if fresh || !current {
        script.write_all(header.as_bytes())?;
    }
    // One write: the script never holds one command of a patch without the other.
    script.write_all(cmds.as_bytes())?;
    Ok(())
}

/// Removes the gdb files in /tmp of processes that are gone (see [`stale_files`]): nothing
/// else does once a patched process exits without a revert. Returns how many went.
///
/// Only one call in [`SWEEP_EVERY`] sweeps ([`sweeps_now`]): the sweep reads the whole of
/// /tmp, whose entries are mostly not ours (perf of fresh applies on a machine with ~1,200
/// files there: ~5% of their CPU time in ext4's readdir, on the warm-up thread but beside the
/// tracer and the target on two CPUs), while a leftover costs only disk space.
pub(crate) fn remove_stale_files() -> usize {
    let call = SWEEP_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if !sweeps_now(std::process::id(), call) {
        return 0;
    }
    stale_files::sweep(std::path::Path::new("/tmp"))
}

/// One call in this many sweeps /tmp (see [`remove_stale_files`]).
const SWEEP_EVERY: u64 = 8;

/// Calls of [`remove_stale_files`] in this process so far.
static SWEEP_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether call number `call` (from 0) of [`remove_stale_files`] in process `pid` sweeps.
///
/// Both the pid and the count choose (review session 5, #5): the CLI makes one call per
/// process, so its pid picks one invocation in eight, as before (a sweep on every process's
/// first call would make every CLI apply pay the readdir); a long-lived caller of the library
/// (lp-py, a management daemon) keeps one pid and sweeps on every eighth call after a start
/// its pid sets (within its first eight), where a choice by pid alone swept on every call in
/// one process of eight and never in the others.
fn sweeps_now(pid: u32, call: u64) -> bool {
    (u64::from(pid) + call).is_multiple_of(SWEEP_EVERY)
}

/// The first line of process `pid`'s gdb script: a gdb comment naming the process by pid and
/// start time (field 22 of /proc/PID/stat), which together identify it.
fn gdb_script_header(pid: i32) -> String {
    let start = crate::perf_map::start_ticks(pid).map_or(String::new(), |t| t.to_string());
    format!("# livepatch: symbols of process {pid} started at {start}\n")
}

/// The address of `name` exported by the target's libgcc_s (or by the executable, when it
/// carries libgcc statically), among the process's `mappings`. `None`: the target has no
/// C++-style unwinder to inform.
fn unwinder_function(pid: i32, mappings: &[crate::maps::Mapping], name: &str) -> Option<u64> {
    let modules = crate::maps::modules(mappings);
    let file_name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let mut candidates: Vec<_> = modules
        .iter()
        .filter(|m| file_name(&m.path).starts_with("libgcc_s"))
        .collect();
    candidates.extend(modules.first());
    for m in candidates {
        // Through the module cache, exported symbols first: no full parse of libgcc_s.
        let Ok(elf) = crate::apply::open_module(&m.open_path(pid)) else {
            continue;
        };
        let sym = elf.exported(name).or_else(|| elf.global(name).cloned());
        let (Some(sym), Some(bias)) = (sym, m.load_bias(&elf)) else {
            continue;
        };
        if sym.value != 0 {
            return Some(bias + sym.value);
        }
    }
    None
}

fn remote_call(
    t: &mut Tracee,
    what: &str,
    func: u64,
    r: &DebugRecord,
    eh_frame: u64,
) -> Result<(), String> {
    t.mem()
        .write(r.trap, &[0xcc])
        .map_err(|e| format!("cannot place the return trap: {e}"))?;
    t.call_function(what, func, &[eh_frame], r.trap, CALL_TIMEOUT)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// During a revert, once no thread runs the patch any more and before its memory is freed
/// (when `free`): withdraws what [`before_switch`] registered. Returns whether the memory may
/// be freed: not while libgcc still holds a registration that could not be withdrawn.
pub fn on_revert(t: &mut Tracee, patch: &AppliedPatch, free: bool) -> bool {
    if free {
        undo(t, &patch.id, patch.debug.as_ref())
    } else {
        // The memory stays mapped (a thread may still run it): so does its registration.
        forget_names(t.pid(), &patch.id);
        false
    }
}

/// Withdraws everything [`before_switch`] registered for patch `id` (a failed switch, or a
/// revert). Returns whether the patch memory may be freed.
pub fn undo(t: &mut Tracee, id: &str, debug: Option<&DebugRecord>) -> bool {
    forget_names(t.pid(), id);
    match debug {
        Some(r) => undo_frames(t, r),
        None => true,
    }
}

/// Deregisters what [`register_frames`] registered; false when libgcc could not be told.
fn undo_frames(t: &mut Tracee, r: &DebugRecord) -> bool {
    let mut frames = Vec::new();
    if r.frame_registered {
        frames.push(r.eh_frame);
    }
    if r.thunk_frame_registered {
        frames.push(r.thunk_eh_frame);
    }
    if frames.is_empty() {
        return true;
    }
    let mappings = crate::maps::read(t.pid()).unwrap_or_default();
    let Some(func) = unwinder_function(t.pid(), &mappings, "__deregister_frame") else {
        warn("libgcc_s is gone: the patch's unwind information stays registered, memory kept");
        return false;
    };
    for eh_frame in frames {
        if let Err(e) = remote_call(t, "__deregister_frame", func, r, eh_frame) {
            warn(&format!(
                "{e}; the patch's unwind information stays registered, its memory is kept"
            ));
            return false;
        }
    }
    true
}

fn forget_names(pid: i32, id: &str) {
    if let Err(e) = crate::perf_map::forget(pid, id) {
        warn(&format!(
            "cannot update {}: {e}",
            crate::perf_map::path(pid).display()
        ));
    }
    forget_gdb_command(pid, id);
}

fn forget_gdb_command(pid: i32, id: &str) {
    let objects = [gdb_object_path(pid, id), gdb_stubs_object_path(pid, id)];
    for o in &objects {
        let _ = std::fs::remove_file(o);
    }
    let script = gdb_script_path(pid);
    let Ok(text) = std::fs::read_to_string(&script) else {
        return;
    };
    let needles = objects.map(|o| format!("add-symbol-file {} ", o.display()));
    let kept: String = text
        .lines()
        .filter(|l| !needles.iter().any(|n| l.starts_with(n)))
        .map(|l| format!("{l}\n"))
        .collect();
    let _ = if !kept.lines().any(|l| l.starts_with("add-symbol-file ")) {
        std::fs::remove_file(&script)
    } else {
        use std::io::Write;
        open_own(&script, false, None).and_then(|(mut f, _)| f.write_all(kept.as_bytes()))
    };
}

/// Adds the CFI of every patch applied to `pid` (read back from the target's memory) to an
/// unwinder, so that threads inside patch code are unwound precisely.
pub fn add_patch_cfi(pid: i32, unwinder: &mut Unwinder) {
    let Ok(state) = crate::state::read(pid) else {
        return;
    };
    let Ok(mem) = crate::process::Memory::open(pid) else {
        return;
    };
    add_state_cfi(&state, &mem, unwinder);
}

/// [`add_patch_cfi`] for the patches of `state`, read already, their CFI read through `mem`.
pub fn add_state_cfi(
    state: &crate::state::State,
    mem: &crate::process::Memory,
    unwinder: &mut Unwinder,
) {
    for p in &state.patches {
        let Some(r) = &p.debug else { continue };
        let name = format!("patch {}", &p.id[..p.id.len().min(12)]);
        let parts = [
            (r.eh_frame, r.eh_frame_len, r.text_start, r.text_end, ""),
            (
                r.thunk_eh_frame,
                r.thunk_eh_frame_len,
                r.thunks_start,
                r.thunks_end,
                " thunks",
            ),
        ];
        for (eh_frame, len, start, end, what) in parts {
            if eh_frame == 0 || start >= end {
                continue;
            }
            let Ok(bytes) = mem.read_vec(eh_frame, len as usize) else {
                continue;
            };
            unwinder.add(CfiSource::from_eh_frame(
                &format!("{name}{what}"),
                start,
                end,
                eh_frame,
                bytes,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any process — a CLI invocation or a long-lived library caller — sweeps on exactly one
    /// call in every eight consecutive ones; a process's first call sweeps for one pid in
    /// eight (the CLI's rate).
    #[test]
    fn every_process_sweeps_once_in_eight_calls() {
        for pid in [1u32, 7, 8, 4_194_303, 123_457] {
            for start in [0u64, 1, 5, 1000] {
                let n = (start..start + SWEEP_EVERY)
                    .filter(|&c| sweeps_now(pid, c))
                    .count();
                assert_eq!(n, 1, "pid {pid}, calls {start}..");
            }
        }
        let first = (1..=8000u32).filter(|&pid| sweeps_now(pid, 0)).count();
        assert_eq!(first, 1000);
    }
}

//! `livepatch apply`: put a patch into a running process.
//!
//! Order matters, and is the whole safety story:
//! 1. read-only checks — the target module is mapped, its build-id is the patch's, every old
//!    function's bytes in memory are what the patch expects (or our own earlier redirect), so
//!    are the bytes of every direct caller to be retargeted ([`call_sites`]), the patch is not
//!    applied yet, lp-core accepts every site. Any failure: nothing was touched.
//! 2. preparation while every thread runs — patch memory mapped within ±2 GiB of the module
//!    and protected (remote mmap and mprotect; in nonstop mode made by the switch's sync agent,
//!    started first: `switch::Early`) while another thread links the object for that
//!    place against the target's symbols and builds the trampolines and register-preserving
//!    thunks; then everything written, the code pages to be patched pre-faulted (copy-on-write
//!    done now, not during the stop).
//! 3. the switch ([`switch`]) in stop or nonstop mode, recording the state in the target. The
//!    direct callers' branches are retargeted in the same switch as the entries.
//!
//! Any failure after step 2 began unmaps the patch memory: the target is left as it was.

mod call_sites;
mod dispatch;
mod error;
pub mod helper;
mod iced_tables;
mod modules;
mod stacks;
pub(crate) mod switch;
pub(crate) mod target;

pub use error::{Error, ErrorKind};
pub(crate) use modules::{open as open_module, unwinder, warm_instruction_tables, warm_up};
pub use switch::{Mode, SwitchStats};

use crate::debug_info::{self, stub_names::StubSymbol};
use crate::link::{Layout, Protection};
use crate::patchfile::Patch;
use crate::process::{prot, Tracee};
use crate::state::{AppliedFunction, AppliedPatch, StateMap};
use lp_core::consistency::CodeRange;
use lp_core::jump::REL32_JUMP_LEN;
use lp_core::plan::plan_apply;
use lp_core::site::{validate_site, Site};
use lp_core::trampoline::MAX_TRAMPOLINE_LEN;
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use switch::{BusyRange, SiteSwitch};

/// Options of an apply.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// Switch mode.
    pub mode: Mode,
    /// How long stop mode retries while a thread is busy in a switched function.
    pub timeout: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            mode: Mode::Stop,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A function as redirected by an apply.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedFunctionReport {
    /// The old function.
    pub name: String,
    /// Its entry.
    pub old: u64,
    /// The new function's entry.
    pub new: u64,
    /// Through a register-preserving thunk.
    pub thunk: bool,
    /// Direct callers retargeted at the new code (or its thunk).
    pub call_sites: usize,
}

/// What the CLI reports after a successful apply.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// The process.
    pub pid: i32,
    /// The patch id.
    pub id: String,
    /// The patched module.
    pub module: String,
    /// The mode used.
    pub mode: Mode,
    /// The redirected functions.
    pub functions: Vec<AppliedFunctionReport>,
    /// Figures of the switch.
    pub stats: SwitchStats,
    /// Wall time of the whole apply, microseconds.
    pub total_us: u64,
}

/// Bytes reserved per function for its trampoline, thunk and dispatch (each padded to 16).
const PER_FUNCTION_EXTRA: u64 =
    (MAX_TRAMPOLINE_LEN + crate::thunk::MAX_LEN + dispatch::DISPATCH_LEN + 3 * 15) as u64;
/// Nonstop mode: the dispatch flag's line at the start of the trampolines' area (a cache line
/// of its own: no instruction is fetched from the line the commit stores into).
const FLAG_LINE: u64 = 64;
const PAGE: u64 = 4096;

/// The instruction tables an apply in `mode` uses (see `iced_tables`).
fn tables_for(mode: Mode) -> iced_tables::Tables {
    match mode {
        Mode::Stop => iced_tables::Tables::All,
        // Nonstop mode's code assembler needs the encoder's tables too: built beforehand, they
        // are not built on the tracer before the window.
        Mode::Nonstop => iced_tables::Tables::Encoder,
    }
}

/// Applies `patch` to process `pid`.
///
/// Three threads work at once (four while the patch is planned, see `apply_here`): the tracer
/// (a thread of its own, which must exit when done, see
/// `with_tracer_thread_while`), the warm-up thread (modules opened for the stack check; housekeeping)
/// and the calling thread, which builds iced-x86's instruction tables meanwhile (about 1.5 ms
/// of CPU) instead of waiting idle for the tracer. The tracer sleeps until they are ready only
/// if it reaches its first decode or encode before (`iced_tables`). Each thread allocating
/// much has a malloc arena of its own (see main.rs): with one shared arena the tracer waited
/// for the arena lock while the tables were built (strace: ~15 waits of 0.1-0.6 ms).
pub fn apply(pid: i32, patch: &Patch, opts: ApplyOptions) -> Result<Applied, Error> {
    let warm = modules::warm_up_modules(pid);
    let tables = iced_tables::claim();
    crate::process::with_tracer_thread_while(
        || apply_here(pid, patch, opts, warm, &mut |_| {}),
        || {
            if tables {
                iced_tables::build_claimed(tables_for(opts.mode));
            }
        },
    )
}

/// Builds iced-x86's instruction tables for an apply in `mode` on the calling thread (waiting,
/// asleep, if another thread builds them), for a caller that knows an apply is coming before
/// it knows its target and patch: a command line whose main thread builds them while another
/// thread parses the arguments, loads the patch and applies it with [`apply_then_exit`].
pub fn build_instruction_tables(mode: Mode) {
    iced_tables::need(tables_for(mode));
}

/// [`apply`] for a caller that ends its process as soon as the apply is over (the command
/// line): the calling thread is the tracer, and `end` is given the outcome — a success right
/// after the target's threads were let go, before anything built for the apply is freed; a
/// failure once the target is as it was — and must end the process.
///
/// The end of the process detaches every thread the calling thread still traces, before its
/// parent sees it end, as the exit of [`apply`]'s tracer thread does; so no thread is started
/// for the tracer, and none of what [`apply`] does after the switch for a caller that goes on
/// happens (freeing the apply's memory, the tracer thread's exit, join and reap: ~0.2-0.4 ms
/// while the target's threads, just resumed, compete for the CPUs). The instruction tables
/// are built meanwhile by another thread: the caller's ([`build_instruction_tables`]), or one
/// started here when nobody builds them. A caller with a thread to spare opens a
/// [`helper::Helper`] on it first: the warm-up and the gdb and perf files then need no thread
/// of their own either.
pub fn apply_then_exit(
    pid: i32,
    patch: &Patch,
    opts: ApplyOptions,
    end: impl FnOnce(&Result<Applied, Error>) -> std::convert::Infallible,
) -> ! {
    let warm = modules::warm_up_modules(pid);
    iced_tables::build_on_new_thread(tables_for(opts.mode));
    let mut end = Some(end);
    let mut report = |r: &Result<Applied, Error>| {
        if let Some(end) = end.take() {
            match end(r) {}
        }
    };
    let r = apply_here(pid, patch, opts, warm, &mut report);
    report(&r);
    unreachable!("`end` ends the process")
}

/// [`apply`] on the calling thread, which must exit afterwards (see `with_tracer_thread`);
/// `report` is given a success before the locals are freed.
fn apply_here(
    pid: i32,
    patch: &Patch,
    opts: ApplyOptions,
    warm: modules::WarmUp,
    report: &mut dyn FnMut(&Result<Applied, Error>),
) -> Result<Applied, Error> {
    let t0 = Instant::now();
    // The tracer gets a CPU as soon as it wakes (see `process/realtime.rs`).
    let realtime = crate::process::realtime::RealTime::beside(pid);
    let trace = std::env::var_os("LIVEPATCH_TRACE").is_some();
    if trace {
        eprintln!("livepatch: trace: tracer real-time: {}", realtime.raised());
    }
    let phase = |what: &str| {
        if trace {
            eprintln!(
                "livepatch: trace: {what} at {} us",
                t0.elapsed().as_micros()
            );
        }
    };
    // The look for the thread nonstop mode borrows runs meanwhile (see `BorrowLook`).
    let look = (opts.mode == Mode::Nonstop).then(|| crate::process::BorrowLook::start(pid));
    // 1. Read-only checks.
    // The one read of /proc/PID/maps for this apply (it costs tens of microseconds of the
    // target's kernel time, and more for processes with many mappings). Mappings change while
    // the threads run; each use copes with a stale one: see `map_near` and `before_switch`.
    let target = target::locate(pid, patch)?;
    warm.mappings(&target.mappings, &target.elf);
    phase("located");
    // Attach first: ptrace admits one tracer, so from here on no other livepatch changes this
    // process, and the state and bytes read below stay true until we write. (Seizing does not
    // stop or change anything.)
    // Nonstop mode traces one thread only (borrowed for system calls): the others never stop.
    // An agent a killed nonstop switch left behind may still hold a write of its program.
    let left_to_its_tool = switch::quiet_orphaned_agent(pid, Some(&target.mappings))?;
    crate::process::stop_point::reached("orphan-looked");
    // A look, in nonstop mode only: one thread is borrowed; stop mode attaches every thread.
    let mut t = match look {
        Some(look) => Tracee::attach_one_looked(look)?,
        None => Tracee::attach(pid)?,
    };
    t.release_on_drop();
    if left_to_its_tool {
        // Its tool may have been killed since: looked at again (review 11, L3).
        switch::quiet_orphaned_agent(pid, Some(&target.mappings))?;
    }
    phase("attached");
    match opts.mode {
        // The threads the handler may run in are checked in the switch's first look, taken
        // while the sync agent maps the patch memory (see `switch::Early::refusal`).
        Mode::Nonstop => t.check_seccomp_handler_threads_later()?,
        Mode::Stop => t.check_seccomp(false)?,
    }
    let existing = crate::state::read_with(pid, t.mem())?;
    // A livepatch killed in the middle of a switch: its patch comes out first (state.rs).
    let existing = crate::revert::finish_unfinished(&mut t, existing, opts.timeout)?;
    phase("state read");
    if existing.patches.iter().any(|p| p.id == patch.id) {
        return Err(Error::AlreadyApplied {
            id: patch.id.clone(),
            pid,
        });
    }
    // Every old function and caller read at once, in a read per cluster of nearby ranges.
    let code = target::CodeSnapshot::read(t.mem(), code_ranges(&target, patch, &existing));
    target::verify_bytes(pid, t.mem(), &code, &target, patch, &existing)?;
    phase("bytes verified");
    let callers = call_sites::verify(pid, t.mem(), &code, &target, patch, &existing)?;
    phase("callers verified");
    // What needs no instruction tables first: the calling thread is still building them.
    let layout = Layout::of(&patch.object)
        .map_err(|e| Error::Unsupported(format!("patch {}: {e}", patch.id)))?;
    phase("object laid out");
    let symbol_mem = t.mem().try_clone()?;
    let resolver = target::Resolver::new(pid, &target, &symbol_mem)?;
    // The module's CFI reads only its file: before the wait for the tables too (fastcli4).
    let module_cfi = debug_info::ModuleCfi::new(&target.elf, target.bias);
    phase("symbols ready");
    // The first decode: wait (asleep) for the calling thread's tables if it is not done.
    iced_tables::need(iced_tables::Tables::Decoder);
    phase("decoder tables ready");
    let mut sites: Vec<Site> = Vec::new();
    for f in &patch.functions {
        let old = target.bias + f.old_vaddr;
        let site = validate_site(&f.old_bytes, old, REL32_JUMP_LEN)
            .map_err(|e| Error::Unsupported(format!("function {}: {e}", f.old_name)))?;
        sites.push(site);
    }
    phase("checks and symbols done");

    // 2. Preparation; threads keep running.
    let image_len = layout.size().div_ceil(PAGE) * PAGE;
    let site_count = callers.iter().map(Vec::len).sum::<usize>() as u64;
    let extra_len = (FLAG_LINE
        + PER_FUNCTION_EXTRA * patch.functions.len() as u64
        + call_sites::PER_SITE_EXTRA * site_count)
        .div_ceil(PAGE)
        * PAGE;
    let total_len = image_len + extra_len;
    // The patch is linked and planned for the place `map_near` will choose (from the mappings
    // `locate` read) on a thread of its own, while this one maps the memory there and sets its
    // protections: remote system calls, for which it mostly waits on the target's borrowed
    // thread (and a first apply's state mapping too). Should the place be taken meanwhile
    // (the kernel refuses to replace a mapping), the plan is made again for the next one.
    let plan_at = |at: u64| -> Result<Prepared, Error> {
        // Trampolines and thunks encode instructions.
        iced_tables::need(iced_tables::Tables::All);
        plan(
            &phase,
            &symbol_mem,
            patch,
            &layout,
            &resolver,
            &sites,
            at,
            extra_len,
            &existing,
            &callers,
            &code,
            module_cfi.as_ref(),
            opts.mode,
        )
    };
    let plan_at = &plan_at;
    let guess = crate::maps::find_free_near(
        &target.mappings,
        target.module.start(),
        target.module.end(),
        total_len,
    );
    // Nonstop mode sets up its switch's area and sync agent first (`switch::Early`), meanwhile
    // too: the agent then makes the preparation's remote calls (a request and its answer
    // each, where a call through ptrace is two stops of the borrowed thread) and the switch's.
    let mut prefaulted = BTreeSet::new();
    let (mapped, planned) = std::thread::scope(|s| {
        let planner = guess.and_then(|at| {
            // It begins real-time, to run at once (see `HelperStartsRealTime`), and goes on
            // under the default policy at nice -20.
            let _starts = crate::process::realtime::HelperStartsRealTime::during();
            std::thread::Builder::new()
                .name("livepatch-plan".into())
                .spawn_scoped(s, move || {
                    crate::process::realtime::favour_helper();
                    (at, plan_at(at))
                })
                .ok()
        });
        let early = match opts.mode {
            Mode::Nonstop => {
                // The area's code is assembled (unless kept from an earlier switch): asleep
                // until the encoder's tables are built rather than spinning in iced beside
                // their builder (see `iced_tables`).
                iced_tables::need(iced_tables::Tables::Encoder);
                let early = switch::Early::start(&mut t, opts.timeout).map(Some);
                phase("switch's agent started");
                early
            }
            Mode::Stop => Ok(None),
        };
        let mapped = early.and_then(|mut early| {
            match map_patch_memory(
                &phase,
                &mut t,
                early.as_mut(),
                &target,
                total_len,
                extra_len,
                &layout,
            ) {
                Ok((statemap, code_addr)) => {
                    // A thread whose seccomp filters stop the handler's calls, or keeping
                    // SIGTRAP blocked, seen by the switch's first look while the memory was
                    // mapped: refused now, as the preparation's own refusals (the area this
                    // apply made goes too), before the sites are pre-faulted.
                    match early.as_mut().and_then(switch::Early::refusal) {
                        None => Ok((statemap, code_addr, early)),
                        Some(e) => {
                            let _ = t.munmap(code_addr, total_len);
                            statemap.remove_if_created(&mut t);
                            if let Some(early) = early {
                                early.abandon(&mut t);
                            }
                            Err(e)
                        }
                    }
                }
                Err(e) => {
                    if let Some(early) = early {
                        early.abandon(&mut t);
                    }
                    Err(e)
                }
            }
        });
        // While the planner works on (it usually ends after the mapping): the pages of the
        // sites, entries and call sites, pre-faulted (see `prefault`). A failure only leaves
        // them to `install`.
        if mapped.is_ok() {
            let entries = sites.iter().map(|s| (s.patch_addr, s.displaced_len));
            let calls = callers.iter().flatten().map(|c| (c.addr, c.current.len()));
            let _ = prefault(&symbol_mem, entries.chain(calls), &mut prefaulted);
        }
        let planned = planner.map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        (mapped, planned)
    });
    // From here on, a failure that returns drops `early` before `t` (declared after it): its
    // agent is told to exit and waited for while the borrowed thread is still held.
    let (statemap, code_addr, early) = mapped?;
    let prepared = match planned {
        Some((at, planned)) if at == code_addr => planned,
        _ => plan_at(code_addr),
    }
    .and_then(|p| install(&mut t, &p, code_addr, extra_len, &mut prefaulted).map(|()| p));
    let Prepared {
        image,
        switches,
        mut busy,
        functions,
        generated,
        flag,
        mut then,
        extra: _,
    } = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = t.munmap(code_addr, total_len);
            statemap.remove_if_created(&mut t);
            if let Some(early) = early {
                early.abandon(&mut t);
            }
            return Err(e);
        }
    };

    // gcc moves unlikely paths of a function into NAME.cold, entered by a jump: a thread
    // there has no return address in NAME, so those parts count as the function too. (Each
    // look for them scans every symbol of the module: not at all when it has none.)
    let has_cold_parts = target
        .elf
        .symbols()
        .iter()
        .any(|s| s.name.contains(".cold"));
    for f in patch.functions.iter().filter(|_| has_cold_parts) {
        if let Ok(sym) = target.elf.lookup(&f.old_name) {
            for cold in target.elf.cold_parts(sym) {
                let start = target.bias + cold.value;
                busy.push(BusyRange {
                    range: CodeRange::new(start, start + cold.size.max(1)),
                    name: f.old_name.clone(),
                });
            }
        }
    }
    phase("code written");
    let debug = match debug_info::before_switch(
        &mut t,
        &target.mappings,
        patch,
        &functions,
        &image,
        generated,
        // The trampolines' and thunks' area ends where the image begins.
        image.load_addr,
    ) {
        Ok(d) => d,
        Err(e) => {
            let _ = t.munmap(code_addr, total_len);
            statemap.remove_if_created(&mut t);
            if let Some(early) = early {
                early.abandon(&mut t);
            }
            return Err(e);
        }
    };
    phase("unwind information registered");
    // 3. The switch.
    let record = AppliedPatch {
        id: patch.id.clone(),
        applied_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        module: target.module.path.clone(),
        build_id: patch.target_build_id_hex(),
        mode: opts.mode.to_string(),
        code_addr,
        code_len: total_len,
        functions: functions.clone(),
        debug: Some(debug.clone()),
        flag,
    };
    let mut new_state = existing.clone();
    new_state.patches.push(record);
    // Write-ahead (state.rs): from the first byte written until the commit, the state holds the
    // record marked "applying", so that a livepatch killed in between leaves no redirect that
    // no state records. Staged now; the switch publishes it (one small write) right before it
    // writes.
    // The state the commit stores is serialized now (which also checks that it fits): the
    // commit only writes it, in stop mode while every thread is stopped.
    let staged = match statemap.encode(&new_state).and_then(|done| {
        let marked = statemap.encode_marked(
            &new_state,
            &done,
            &patch.id,
            crate::state::Operation::Applying,
        )?;
        statemap
            .stage_encoded(t.mem(), &marked)
            .map(|staged| (staged, done))
    }) {
        Ok(s) => s,
        Err(e) => {
            debug_info::undo(&mut t, &patch.id, Some(&debug));
            let _ = t.munmap(code_addr, total_len);
            statemap.remove_if_created(&mut t);
            if let Some(early) = early {
                early.abandon(&mut t);
            }
            return Err(e.into());
        }
    };
    phase("state staged");
    let (staged, done) = staged;
    let mut begin = |m: &crate::process::Memory| -> Result<(), Error> {
        statemap.publish(m, &staged)?;
        Ok(())
    };
    let mut commit = |m: &crate::process::Memory| -> Result<(), Error> {
        statemap.store_encoded(m, &done)?;
        Ok(())
    };
    // The perf map line and the gdb files are written by another thread while the switch runs
    // (the helper, see `helper`, or one of their own): nothing needs them before (the gdb
    // command is in the state record already), and this thread waits for them before it
    // detaches or undoes anything, so no other livepatch can revert in between and a failed
    // switch removes what was written.
    let names = {
        let (patch, image, debug) = (patch.clone(), image.clone(), debug.clone());
        let (written, finished) = std::sync::mpsc::sync_channel::<()>(1);
        helper::run_or_spawn("livepatch-names", move || {
            debug_info::write_names(pid, &patch, &image, &debug);
            let _ = written.send(());
        })
        .map(|()| finished)
    };
    // Stop mode's stack check unwinds with the mappings read after attaching and the state
    // read then (which only this process changes until it detaches): not read again.
    let primed = (opts.mode == Mode::Stop)
        .then(|| modules::prime_unwinder(pid, t.mem(), &existing))
        .flatten();
    let switched = switch::run(
        &mut t,
        opts.mode,
        &switches,
        &busy,
        opts.timeout,
        flag.map(|addr| switch::Flag {
            addr,
            set: true,
            then: std::mem::take(&mut then),
        }),
        &mut begin,
        &mut commit,
        early,
    );
    drop(primed);
    match names {
        // Written, or the job panicked (its sender dropped): either way, done.
        Ok(finished) => {
            let _ = finished.recv();
        }
        Err(_) => debug_info::write_names(pid, patch, &image, &debug),
    }
    let stats = match switched {
        Ok(s) => s,
        Err(e) => {
            // Nothing redirects into the patch memory: give it back. (Unless the switch is
            // unfinished: then its mark stays published, for the next invocation to finish.)
            if !matches!(
                e,
                Error::Process(crate::process::ProcessError::Exited(_)) | Error::Unfinished(_)
            ) {
                // Nonstop mode: threads that trapped meanwhile were sent through trampolines in
                // the patch memory; each must be seen outside it (and not returning into it)
                // before it goes, or it stays mapped (seen as a revert sees them: through
                // /proc, a thread stopped only when it cannot be seen so).
                let area = [CodeRange::new(code_addr, code_addr + total_len)];
                let nobody_inside = opts.mode == Mode::Stop
                    || switch::wait_threads_outside_unstopped(&mut t, &area, opts.timeout)
                        .unwrap_or(false);
                if debug_info::undo(&mut t, &patch.id, Some(&debug)) && nobody_inside {
                    let _ = t.stop_any().and_then(|_| t.munmap(code_addr, total_len));
                }
                // The switch undid its writes: the state is as it was, without the mark.
                let _ = statemap.store(t.mem(), &existing);
                statemap.remove_if_created(&mut t);
            }
            return Err(e);
        }
    };
    phase("switched");
    t.release()?;
    phase("detached");
    let applied = Ok(Applied {
        pid,
        id: patch.id.clone(),
        module: target.module.path.clone(),
        mode: opts.mode,
        functions: functions
            .iter()
            .map(|f| AppliedFunctionReport {
                name: f.name.clone(),
                old: f.old,
                new: f.new,
                thunk: f.via != f.new,
                call_sites: f.direct_callers(),
            })
            .collect(),
        stats,
        total_us: t0.elapsed().as_micros() as u64,
    });
    // Before this function's locals are freed (see `apply_then`).
    report(&applied);
    applied
}

/// The state's mapping (created by a first apply) and `len` bytes of patch memory within reach
/// of the target module, `extra_len` bytes of trampolines and thunks first, then the image
/// laid out by `layout`, both protected as they end (remote `mprotect`s): the code is written
/// afterwards through /proc/PID/mem, which writes into pages of any protection. On failure,
/// nothing of this stays (but what a sync agent stuck in a call of ours may still make: the
/// error then says so, see `switch::Early`). Nonstop mode's agent (`early`) makes the calls
/// when there is one.
fn map_patch_memory(
    phase: &dyn Fn(&str),
    t: &mut Tracee,
    mut early: Option<&mut switch::Early>,
    target: &target::LoadedTarget,
    len: u64,
    extra_len: u64,
    layout: &Layout,
) -> Result<(StateMap, u64), Error> {
    let statemap = StateMap::open_or_create(t)?;
    phase("state mapped");
    let protections = |at: u64| protections(at, extra_len, layout);
    let (code_addr, set) = match map_near(t, early.as_deref_mut(), target, len, &protections) {
        Ok(a) => a,
        Err(e) => {
            statemap.remove_if_created(t);
            return Err(e);
        }
    };
    phase("patch memory mapped");
    if let Err(e) = protect(t, early, &protections(code_addr)[set..]) {
        // A sync agent stuck in an mprotect of ours may still make it: the memory stays (a
        // leak) rather than be unmapped under a call that could then hit a mapping of the
        // program's made in its place.
        if !matches!(e, Error::Unfinished(_)) {
            let _ = t.munmap(code_addr, len);
        }
        statemap.remove_if_created(t);
        return Err(e);
    }
    phase("protections set");
    Ok((statemap, code_addr))
}

/// Sets `protections` ((address, length, protection) each, see [`protections`]): made by
/// nonstop mode's sync agent when there is one (`early`).
fn protect(
    t: &mut Tracee,
    mut early: Option<&mut switch::Early>,
    protections: &[(u64, u64, u64)],
) -> Result<(), Error> {
    for &(at, len, p) in protections {
        match early.as_deref_mut() {
            Some(e) => e.protect(t, at, len, p)?,
            None => t.mprotect(at, len, p)?,
        }
    }
    Ok(())
}

/// The final protections of patch memory at `code_addr` (address, length, protection):
/// trampolines/thunks r-x (the whole reserved area, `extra_len` bytes at `code_addr`), the
/// image's regions (after them) as the linker says; adjacent ranges with the same protection
/// in one call, and none for what the mapping already is (read-only).
fn protections(code_addr: u64, extra_len: u64, layout: &Layout) -> Vec<(u64, u64, u64)> {
    let image_addr = code_addr + extra_len;
    let mut ranges = vec![(code_addr, extra_len, prot::READ | prot::EXEC)];
    for r in layout.regions() {
        let p = match r.prot {
            Protection::ReadExec => prot::READ | prot::EXEC,
            Protection::Read => prot::READ,
            Protection::ReadWrite => prot::READ | prot::WRITE,
        };
        match ranges.last_mut() {
            Some((at, len, q)) if *q == p && *at + *len == image_addr + r.offset => *len += r.len,
            _ => ranges.push((image_addr + r.offset, r.len, p)),
        }
    }
    ranges.retain(|&(_, len, p)| len > 0 && p != prot::READ);
    ranges
}

/// Maps `len` bytes of read-write anonymous memory within reach of the target module, in a
/// gap of the mappings `locate` read. A mapping made since then may fill that gap: the kernel
/// then refuses (`MAP_FIXED_NOREPLACE`), and the place is chosen again from fresh mappings.
///
/// Nonstop mode's sync agent (`early`) sets the `protections` for the place chosen too, in the
/// same request: returns the address and how many of them are set (see `switch::Early`).
fn map_near(
    t: &mut Tracee,
    mut early: Option<&mut switch::Early>,
    target: &target::LoadedTarget,
    len: u64,
    protections: &dyn Fn(u64) -> Vec<(u64, u64, u64)>,
) -> Result<(u64, usize), Error> {
    match map_in_gap(
        t,
        early.as_deref_mut(),
        target,
        &target.mappings,
        len,
        protections,
    ) {
        Err(Error::Process(crate::process::ProcessError::RemoteSyscall { err, .. }))
            if err.raw_os_error() == Some(libc::EEXIST) =>
        {
            let fresh = crate::maps::read(t.pid())?;
            map_in_gap(t, early, target, &fresh, len, protections)
        }
        r => r,
    }
}

/// [`map_near`] in a gap of `mappings`: through nonstop mode's sync agent when there is one
/// (`early`, see `switch::Early::map_patch`: the same call).
fn map_in_gap(
    t: &mut Tracee,
    early: Option<&mut switch::Early>,
    target: &target::LoadedTarget,
    mappings: &[crate::maps::Mapping],
    len: u64,
    protections: &dyn Fn(u64) -> Vec<(u64, u64, u64)>,
) -> Result<(u64, usize), Error> {
    let lo = target.module.start();
    let hi = target.module.end();
    let addr = crate::maps::find_free_near(mappings, lo, hi, len).ok_or_else(|| {
        Error::Unsupported(format!(
            "no free address space within 2 GiB of {}",
            target.module.path
        ))
    })?;
    // Read-only: every write goes through /proc/PID/mem, which writes into a read-only private
    // mapping too; the protections `prepare` sets then need no call for read-only ranges, and
    // one for the code (one remote system call fewer than from read-write).
    let (got, set) = match early {
        Some(e) => e.map_patch(t, addr, len, &protections(addr))?,
        None => (
            t.mmap(
                addr,
                len,
                prot::READ,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_FIXED_NOREPLACE
                    | libc::MAP_POPULATE,
                -1,
                0,
            )?,
            0,
        ),
    };
    if got != addr {
        let _ = t.munmap(got, len);
        return Err(Error::Other(format!(
            "mmap placed patch memory at {got:#x} instead of {addr:#x}"
        )));
    }
    Ok((addr, set))
}

/// What [`prepare`] made of a patch, written into the patch memory.
struct Prepared {
    image: crate::link::LinkedImage,
    /// Every site's switch: the entries', then each function's callers'.
    switches: Vec<SiteSwitch>,
    busy: Vec<BusyRange>,
    functions: Vec<AppliedFunction>,
    /// The trampolines, thunks and dispatches: their CFI and names.
    generated: debug_info::GeneratedCode,
    /// Nonstop mode: the dispatch flag, and the callers' switches from their dispatches to
    /// the new code once it is set.
    flag: Option<u64>,
    then: Vec<SiteSwitch>,
    /// The bytes of the trampolines, thunks and dispatches (written at the patch memory's
    /// start, the image after them).
    extra: Vec<u8>,
}

/// The ranges of the target's code an apply of `patch` reads before it writes: each old
/// function, each caller's branch (the patch file's, and those a patch below retargeted).
fn code_ranges<'a>(
    target: &'a target::LoadedTarget,
    patch: &'a Patch,
    existing: &'a crate::state::State,
) -> impl Iterator<Item = (u64, usize)> + 'a {
    patch.functions.iter().flat_map(move |f| {
        let old = target.bias + f.old_vaddr;
        let below = target::top_redirect(existing, old)
            .into_iter()
            .flat_map(|b| &b.call_sites)
            .map(|c| (c.addr, c.written.len()));
        std::iter::once((old, f.old_bytes.len()))
            .chain(
                f.call_sites
                    .iter()
                    .map(move |c| (target.bias + c.vaddr, c.bytes.len())),
            )
            .chain(below)
    })
}

/// Links the patch code for patch memory at `code_addr` (`extra_len` bytes of trampolines
/// and thunks, then the image), builds what goes around it and plans every site, the
/// callers' (`callers`, per function, verified) included, from the bytes the checks read
/// (`code`, or `mem`; the switch reads them again before it writes); the CFI of the
/// trampolines from the module's (`cfi`). Nothing is written: see [`install`]. Runs on a
/// thread of its own while the tracer maps the memory (see `apply_here`).
#[allow(clippy::too_many_arguments)]
fn plan(
    phase: &(dyn Fn(&str) + Sync),
    mem: &crate::process::Memory,
    patch: &Patch,
    layout: &Layout,
    resolver: &target::Resolver<'_>,
    sites: &[Site],
    code_addr: u64,
    extra_len: u64,
    existing: &crate::state::State,
    callers: &[Vec<call_sites::Verified>],
    code: &target::CodeSnapshot,
    cfi: Option<&debug_info::ModuleCfi<'_>>,
    mode: Mode,
) -> Result<Prepared, Error> {
    let image_addr = code_addr + extra_len;
    let image = layout
        .link(image_addr, &|name| resolver.resolve(name))
        .map_err(|e| Error::Unsupported(format!("patch {}: {e}", patch.id)))?;
    phase("image linked");
    let mut extra = Vec::new();
    let mut then = Vec::new();
    let extra_addr = code_addr;
    // Nonstop mode: the sites lead to dispatches, committed by this flag (dispatch.rs).
    let flag = (mode == Mode::Nonstop).then(|| {
        extra.resize(FLAG_LINE as usize, 0);
        extra_addr
    });
    let mut switches = Vec::new();
    let mut busy = Vec::new();
    let mut functions = Vec::new();
    // The generated code's CFI, in the order of its `.eh_frame` (see GeneratedCode), and names.
    let mut trampoline_frames = Vec::new();
    let mut frames = Vec::new();
    let mut thunk_frames = Vec::new();
    let mut unframed = None;
    let mut stubs = Vec::new();
    // What a thunk must save depends on the vector registers the CPU gives the target.
    let vectors = crate::thunk::VectorState::of_system();
    for ((f, site), callers) in patch.functions.iter().zip(sites).zip(callers) {
        let new = image.symbol(&f.new_name).ok_or_else(|| {
            Error::Unsupported(format!(
                "patch {}: new function {} is not defined by its object",
                patch.id, f.new_name
            ))
        })?;
        // Trampoline: the original's displaced instructions, then a jump back past them.
        let tramp = extra_addr + extra.len() as u64;
        let tramp_code = build_trampoline(site, tramp)
            .map_err(|e| Error::Unsupported(format!("function {}: {e}", f.old_name)))?;
        if let Some(cfi) = cfi {
            trampoline_frames.extend(debug_info::function_trampoline_frame(
                cfi,
                &f.old_name,
                site,
                tramp,
                &tramp_code,
            ));
        }
        stubs.extend(StubSymbol::trampoline(
            &f.old_name,
            tramp,
            tramp_code.len() as u64,
        ));
        extra.extend_from_slice(&tramp_code);
        pad16(&mut extra);
        let new_size = image
            .symbol_list
            .iter()
            .find(|s| s.addr == new && s.function)
            .map(|s| s.size)
            .unwrap_or(0);
        // -fipa-ra: callers may keep values in registers the old function never writes.
        let via = match register_thunk(
            f,
            site,
            &image,
            new,
            new_size,
            extra_addr + extra.len() as u64,
            &vectors,
        )? {
            Some(thunk) => {
                let at = extra_addr + extra.len() as u64;
                match crate::thunk_cfi::decode(at, &thunk) {
                    Some(frame) => thunk_frames.push(frame.cfi()),
                    None => {
                        unframed.get_or_insert_with(|| {
                            format!("thunk of {} at {at:#x} not recognised", f.old_name)
                        });
                    }
                }
                stubs.extend(StubSymbol::thunk(&f.old_name, at, &thunk));
                extra.extend_from_slice(&thunk);
                pad16(&mut extra);
                at
            }
            None => new,
        };
        // Where the entry and the callers lead: the dispatch, or `via` itself.
        let dispatch = match flag {
            Some(flag) => {
                let at = extra_addr + extra.len() as u64;
                // Until the flag is set the dispatch runs what runs now: the version below
                // when this patch stacks on another (never the original it replaced, which
                // would come back for the windows of the switch, and of a revert once the
                // flag is cleared), else the original through its trampoline.
                let old = target::top_redirect(existing, site.entry).map_or(tramp, |p| p.reached());
                let code = dispatch::encode(at, flag, via, old).ok_or_else(|| {
                    Error::Other(format!(
                        "function {}: the dispatch is out of reach of its code",
                        f.old_name
                    ))
                })?;
                stubs.extend(StubSymbol::dispatch(&f.old_name, at, &code));
                extra.extend_from_slice(&code);
                pad16(&mut extra);
                // Entered as the function is (its return address on top, nothing pushed
                // since): the CIE's initial rules are its whole CFI. Listed, too, so that the
                // trampolines' .eh_frame is written behind it rather than over it.
                frames.push(crate::thunk_cfi::FrameCfi {
                    start: at,
                    len: dispatch::DISPATCH_LEN as u64,
                    program: Vec::new(),
                });
                Some(at)
            }
            None => None,
        };
        let reached = dispatch.unwrap_or(via);
        let current = code.read_vec(mem, site.patch_addr, site.displaced_len)?;
        let plan = plan_apply(site, &current, reached)
            .map_err(|e| Error::Unsupported(format!("function {}: {e}", f.old_name)))?;
        let below = target::top_redirect(existing, site.entry).map(|p| p.reached());
        switches.push(SiteSwitch {
            name: f.old_name.clone(),
            plan,
            top: reached,
            below,
            resume: tramp,
            reverting: false,
            call_site: false,
        });
        busy.push(BusyRange {
            range: CodeRange::new(site.entry, site.entry + f.old_size.max(1)),
            name: f.old_name.clone(),
        });
        // A version we stack on is replaced too: no thread may be in it either.
        if let Some(prev) = target::top_redirect(existing, site.entry) {
            busy.push(BusyRange {
                range: CodeRange::new(prev.new, prev.new + prev.new_size.max(1)),
                name: format!("{} (previous patch)", f.old_name),
            });
            // So is what leads into it: a thread there goes on into the version replaced
            // (review session 5, #3). A thunk's length is not recorded: its upper bound.
            if let Some(d) = prev.dispatch {
                busy.push(BusyRange {
                    range: CodeRange::new(d, d + dispatch::DISPATCH_LEN as u64),
                    name: format!("{} (previous patch's dispatch)", f.old_name),
                });
            }
            if prev.via != prev.new {
                // Its length from its code (an upper bound would cover the code after it:
                // review session 5, #8).
                let code = mem.read_vec(prev.via, crate::thunk::MAX_LEN)?;
                let len = crate::thunk_cfi::decode(prev.via, &code)
                    .map_or(crate::thunk::MAX_LEN as u64, |thunk| thunk.len);
                busy.push(BusyRange {
                    range: CodeRange::new(prev.via, prev.via + len),
                    name: format!("{} (previous patch's thunk)", f.old_name),
                });
            }
        }
        // Direct callers go straight to where the redirect leads. In nonstop mode that is the
        // dispatch until the commit, then the new code (the second plan, in `then`: a call
        // through the dispatch costs a flag test and a branch more); the state records the
        // end, the new code's branch.
        let mut call_sites = Vec::new();
        for c in callers {
            let at = extra_addr + extra.len() as u64;
            if let Some((p, code)) = call_sites::prepare(&f.old_name, c, reached, at, cfi)? {
                stubs.extend(StubSymbol::call_site_trampoline(
                    &f.old_name,
                    &c.caller,
                    at,
                    code.len() as u64,
                ));
                extra.extend_from_slice(&code);
                pad16(&mut extra);
                let mut record = p.record;
                if dispatch.is_some() && p.switch.plan.result() != p.switch.plan.expected() {
                    if let Ok(on) =
                        lp_core::call_site::plan_retarget(record.addr, &record.written, via)
                    {
                        record.written = on.result().to_vec();
                        then.push(SiteSwitch::call_site(p.switch.name.clone(), on, at));
                    }
                }
                switches.push(p.switch);
                call_sites.push(record);
                frames.extend(p.frame);
            }
        }
        functions.push(AppliedFunction {
            name: f.old_name.clone(),
            old: site.entry,
            new,
            new_size,
            via,
            patch_addr: site.patch_addr,
            saved: plan.expected().to_vec(),
            written: plan.result().to_vec(),
            trampoline: tramp,
            call_sites,
            dispatch,
        });
    }
    phase("sites planned");
    if extra.len() as u64 > extra_len {
        return Err(Error::Other(format!(
            "trampolines and thunks need {} bytes, {extra_len} were reserved",
            extra.len()
        )));
    }
    trampoline_frames.extend(frames);
    trampoline_frames.extend(thunk_frames);
    Ok(Prepared {
        image,
        switches,
        busy,
        functions,
        generated: debug_info::GeneratedCode {
            frames: trampoline_frames,
            unframed,
            stubs,
        },
        flag,
        then,
        extra,
    })
}

/// Writes what [`plan`] made into the patch memory at `code_addr` (mapped and protected by
/// `map_patch_memory`), then pre-faults the pages the switch will write.
/// Writes the patch's code, and pre-faults the pages of its switches that `prefaulted` (see
/// [`prefault`]) did not cover.
fn install(
    t: &mut Tracee,
    p: &Prepared,
    code_addr: u64,
    extra_len: u64,
    prefaulted: &mut BTreeSet<u64>,
) -> Result<(), Error> {
    t.mem().write(code_addr + extra_len, &p.image.bytes)?;
    if !p.extra.is_empty() {
        t.mem().write(code_addr, &p.extra)?;
    }
    let ranges = p.switches.iter().map(|s| (s.plan.addr(), s.plan.len()));
    prefault(t.mem(), ranges, prefaulted)?;
    Ok(())
}

/// Pre-faults the pages of `ranges` ((address, length) each) not in `done` (page numbers),
/// adding them: rewriting one of their bytes as it is makes the kernel do the copy-on-write
/// now, while threads run, instead of during the switch (the stop, or an int3 window). One
/// byte per page is enough (call sites share pages with each other and the entries).
fn prefault(
    mem: &crate::process::Memory,
    ranges: impl Iterator<Item = (u64, usize)>,
    done: &mut BTreeSet<u64>,
) -> Result<(), Error> {
    for (addr, len) in ranges {
        for a in [addr, addr + len.max(1) as u64 - 1] {
            if done.insert(a >> 12) {
                let cur = mem.read_vec(a, 1)?;
                mem.write(a, &cur)?;
            }
        }
    }
    Ok(())
}

/// A thunk preserving the registers the new version may change and the old one did not
/// (lp-core's clobber analysis of both, [`crate::thunk::plan`]), or `None` when the new
/// version changes no more.
fn register_thunk(
    f: &crate::patchfile::FunctionPatch,
    site: &Site,
    image: &crate::link::LinkedImage,
    new: u64,
    new_size: u64,
    at: u64,
    vectors: &crate::thunk::VectorState,
) -> Result<Option<Vec<u8>>, Error> {
    let off = (new - image.load_addr) as usize;
    let new_code = image
        .bytes
        .get(off..off + new_size as usize)
        .filter(|b| !b.is_empty());
    let unsupported = |e: String| Error::Unsupported(format!("function {}: {e}", f.old_name));
    let save = crate::thunk::plan(&f.old_bytes, site.entry, new_code, new, vectors)
        .map_err(unsupported)?;
    if save.is_empty() {
        return Ok(None);
    }
    crate::thunk::build(at, new, &save, vectors)
        .map(Some)
        .map_err(unsupported)
}

fn pad16(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(16) {
        v.push(0xcc);
    }
}

/// The original's displaced instructions relocated to `at`, then a jump back (lp-core).
fn build_trampoline(site: &Site, at: u64) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; MAX_TRAMPOLINE_LEN];
    let n = lp_core::trampoline::build_trampoline(site, at, &mut out).map_err(|e| e.to_string())?;
    out.truncate(n);
    Ok(out)
}

//! `livepatch revert`: take a patch back out of a running process — the newest by default.
//! The same consistency check as apply, on the new functions (and the whole patch memory,
//! which is freed afterwards); the original bytes (or the redirect of the patch below, when
//! patches stack) are restored exactly, and so are the direct callers' branches the patch
//! retargeted (to the old entry, or to the patch below's code), in the same switch.

use crate::apply::switch::{self, BusyRange, Mode, SiteSwitch};
use crate::apply::{Error, SwitchStats};
use crate::process::{ProcessError, Tracee};
use crate::state::{self, AppliedCallSite, AppliedFunction, Operation, State, StateMap};
use lp_core::consistency::CodeRange;
use lp_core::plan::plan_write;
use serde::Serialize;
use std::time::{Duration, Instant};

/// What a revert did.
#[derive(Debug, Clone, Serialize)]
pub struct Reverted {
    /// The process.
    pub pid: i32,
    /// The patch id taken out.
    pub id: String,
    /// Functions restored.
    pub functions: Vec<String>,
    /// The patch memory was unmapped (false: a thread stayed inside it in nonstop mode, and
    /// it is left mapped, unreferenced).
    pub code_freed: bool,
    /// Figures of the switch.
    pub stats: SwitchStats,
    /// Wall time, microseconds.
    pub total_us: u64,
}

/// Reverts patch `id` (or the newest when `None`; an id prefix is accepted) of process `pid`.
pub fn revert(
    pid: i32,
    id: Option<&str>,
    mode: Mode,
    timeout: Duration,
) -> Result<Reverted, Error> {
    // iced's tables are built on first use: in nonstop mode (whose settle decodes
    // instructions) by another thread while this one attaches, as apply does. A stop-mode
    // revert uses no iced table, and the warm-up thread would only compete for the CPUs
    // (+3.5 ms median measured on a stop revert).
    if mode == Mode::Nonstop {
        crate::apply::warm_up(pid);
    }
    crate::process::with_tracer_thread(|| revert_here(pid, id, mode, timeout))
}

/// [`revert`] on the calling thread, which must exit afterwards (see `with_tracer_thread`).
fn revert_here(
    pid: i32,
    id: Option<&str>,
    mode: Mode,
    timeout: Duration,
) -> Result<Reverted, Error> {
    let t0 = Instant::now();
    // The tracer gets a CPU as soon as it wakes (see `process/realtime.rs`).
    let _realtime = crate::process::realtime::RealTime::beside(pid);
    // Attached first: the state cannot change under us (one tracer at a time).
    // Nonstop mode traces one thread only during the switch (see apply).
    // The look for the thread nonstop mode borrows runs meanwhile (see `BorrowLook`).
    let look = (mode == Mode::Nonstop).then(|| crate::process::BorrowLook::start(pid));
    // An agent a killed nonstop switch left behind may still hold a write of its program.
    let left_to_its_tool = switch::quiet_orphaned_agent(pid, None)?;
    crate::process::stop_point::reached("orphan-looked");
    // A look, in nonstop mode only: one thread is borrowed; stop mode attaches every thread.
    let mut t = match look {
        Some(look) => Tracee::attach_one_looked(look)?,
        None => Tracee::attach(pid)?,
    };
    t.release_on_drop();
    if left_to_its_tool {
        // Its tool may have been killed since: looked at again (review 11, L3).
        switch::quiet_orphaned_agent(pid, None)?;
    }
    t.check_seccomp(mode == Mode::Nonstop)?;
    let mut current = state::read(pid)?;
    // A livepatch killed in the middle of a switch: that switch is finished first. When it
    // took the patch out and that is the patch asked for (or none was named), that is the
    // whole revert.
    if current.unfinished.is_some() {
        let (finished, done) = finish(&mut t, current, timeout)?;
        if let Some(done) = done.filter(|d| id.is_none_or(|id| d.id.starts_with(id))) {
            t.release()?;
            return Ok(done);
        }
        current = finished;
    }
    let index =
        match id {
            None => current.patches.len().checked_sub(1).ok_or_else(|| {
                Error::NotFound(format!("process {pid} has no livepatch applied"))
            })?,
            Some(id) => {
                let found: Vec<usize> = (0..current.patches.len())
                    .filter(|&i| current.patches[i].id.starts_with(id))
                    .collect();
                match found.as_slice() {
                    [i] => *i,
                    [] => {
                        return Err(Error::NotFound(format!(
                            "patch {id} is not applied to process {pid}"
                        )))
                    }
                    _ => {
                        return Err(Error::NotFound(format!(
                            "patch id {id} is ambiguous in process {pid}: give more digits"
                        )))
                    }
                }
            }
        };
    let done = take_out(&mut t, &current, index, mode, timeout, t0)?;
    t.release()?;
    trace("released", t0);
    Ok(done)
}

/// Finishes what a livepatch killed in the middle of a switch left (the state's write-ahead
/// mark, see state.rs). Returns the state afterwards (unchanged when nothing was unfinished).
pub(crate) fn finish_unfinished(
    t: &mut Tracee,
    current: State,
    timeout: Duration,
) -> Result<State, Error> {
    finish(t, current, timeout).map(|(state, _)| state)
}

/// [`finish_unfinished`]: an apply whose every site holds the patch's bytes missed only its
/// commit and is rolled forward (a hot function could keep a stop-mode undo busy for ever:
/// review session 4, S3); anything else — a revert, or an apply killed mid-write — comes out:
/// sites already restored are left alone, the others restored, in stop mode, or in nonstop
/// mode when `t` traces one thread (a single-thread tracee is one again afterwards). Returns
/// the state afterwards and, when the patch came out, what was done.
fn finish(
    t: &mut Tracee,
    current: State,
    timeout: Duration,
) -> Result<(State, Option<Reverted>), Error> {
    let Some((index, operation)) = current.unfinished_patch() else {
        return Ok((current, None));
    };
    let pid = t.pid();
    let patch = &current.patches[index];
    let short_id = short(&patch.id).to_string();
    // Written, or written under an int3 that is someone else's (then it stays: see
    // `int3s_may_be_ours`).
    let foreign = !int3s_may_be_ours(pid);
    let is = |cur: &[u8], bytes: &[u8]| cur == bytes || (foreign && int3_over(cur, bytes));
    let mut all_written = true;
    for f in &patch.functions {
        all_written &= is(
            &t.mem().read_vec(f.patch_addr, f.written.len())?,
            &f.written,
        );
        // A caller still leading to the dispatch (the apply had not pointed it on to the new
        // code yet) is in as well: the dispatch runs the new code once the flag is set.
        for c in &f.call_sites {
            let cur = t.mem().read_vec(c.addr, c.written.len())?;
            all_written &=
                is(&cur, &c.written) || dispatch_form(f, c).is_some_and(|d| is(&cur, &d));
        }
    }
    if operation == Operation::Applying && all_written {
        // Nonstop mode: the commit's first store, setting the dispatches' flag, may be
        // missing too.
        if let Some(flag) = patch.flag {
            t.mem().write(flag, &[1])?;
        }
        let mut done = current.clone();
        done.unfinished = None;
        StateMap::open(pid)
            .ok_or_else(|| Error::Other(format!("livepatch state of process {pid} vanished")))?
            .store(t.mem(), &done)?;
        eprintln!(
            "livepatch: warning: patch {short_id} was left unrecorded by a livepatch killed while applying it, with every redirect written: recorded as applied"
        );
        return Ok((done, None));
    }
    let single = t.is_single();
    let mode = if single { Mode::Nonstop } else { Mode::Stop };
    let done = take_out(t, &current, index, mode, timeout, Instant::now())?;
    if single && !t.is_single() {
        t.keep_one()?;
    }
    eprintln!(
        "livepatch: warning: patch {short_id} was left half-switched by a livepatch killed while {operation} it: taken out"
    );
    Ok((state::read(pid)?, Some(done)))
}

/// The branch of call site `c` to `f`'s dispatch (nonstop mode): what the site holds between
/// an apply's first windows and its last ones (apply/dispatch.rs).
fn dispatch_form(f: &AppliedFunction, c: &AppliedCallSite) -> Option<Vec<u8>> {
    let d = f.dispatch?;
    lp_core::call_site::plan_retarget(c.addr, &c.written, d)
        .ok()
        .map(|p| p.result().to_vec())
}

/// What a site of the patch being taken out holds now.
enum SiteNow {
    /// The patch's bytes: to be restored.
    Written,
    /// The branch to the dispatch, the patch's bytes before their last step (an apply that
    /// was killed): to be restored from these.
    ToDispatch(Vec<u8>),
    /// Already the bytes it replaced (a switch that was killed), possibly with someone else's
    /// `int3` on the first byte (a uprobe: it stays).
    Restored,
    /// Half-way through nonstop mode's int3 protocol (a switch that was killed): `int3` on
    /// the first byte, the rest either version's.
    Int3(Vec<u8>),
    /// Someone else's `int3` (a uprobe, a debugger's breakpoint) on the first byte of the
    /// patch's bytes: restoring them would remove it, so nothing is written.
    ForeignInt3,
}

/// What a site holds now (`cur`), given the bytes the patch wrote there, those it replaced,
/// its branch to the dispatch (a call site in nonstop mode), whether the switch was killed
/// (`unfinished`) and whether an `int3` there can be ours (`int3_ours`, see
/// [`int3s_may_be_ours`]). None: none of these, changed by someone else.
fn site_now(
    cur: Vec<u8>,
    written: &[u8],
    saved: &[u8],
    to_dispatch: Option<&[u8]>,
    unfinished: bool,
    int3_ours: bool,
) -> Option<SiteNow> {
    if cur == written {
        return Some(SiteNow::Written);
    }
    if to_dispatch == Some(&cur[..]) {
        return Some(SiteNow::ToDispatch(cur));
    }
    if !unfinished {
        return None;
    }
    if cur == saved {
        return Some(SiteNow::Restored);
    }
    let over_ours = int3_over(&cur, written) || to_dispatch.is_some_and(|d| int3_over(&cur, d));
    match (int3_ours, int3_over(&cur, saved), over_ours) {
        (true, true, _) | (true, _, true) => Some(SiteNow::Int3(cur)),
        // Not ours: the site holds what it held before the patch, under someone's probe.
        (false, true, _) => Some(SiteNow::Restored),
        (false, _, true) => Some(SiteNow::ForeignInt3),
        _ => None,
    }
}

/// `cur` is `bytes` with an `int3` on the first byte.
fn int3_over(cur: &[u8], bytes: &[u8]) -> bool {
    cur.first() == Some(&0xcc) && cur.len() == bytes.len() && cur.get(1..) == bytes.get(1..)
}

/// Whether an `int3` on a site of a killed switch of process `pid` can be one of ours (review
/// session 4, L6). Only nonstop mode writes them, and only while its SIGTRAP handler is the
/// process's action: installed before the first `int3`, given back after the last one is
/// gone, left in place when the tool is killed in between. A process that catches no SIGTRAP
/// has no int3 of ours — one on a site is a uprobe's (perf probe, bpftrace) or a debugger's,
/// and is never overwritten. When it catches SIGTRAP (our handler left by a killed nonstop
/// switch, or its own), an int3 over our bytes is taken for ours, as before: a uprobe put on a
/// site of a killed nonstop switch before the next livepatch finishes it is still removed.
fn int3s_may_be_ours(pid: i32) -> bool {
    use crate::process::observe;
    observe::process_signal_mask(pid, &["SigCgt"]) & observe::bit(libc::SIGTRAP) != 0
}

/// Takes patch `index` of `current` out: restores its sites (those of an unfinished switch
/// that hold the old bytes already are left alone), drops its record — marked "reverting"
/// in the state before the first byte is written — and frees its memory.
fn take_out(
    t: &mut Tracee,
    current: &State,
    index: usize,
    mode: Mode,
    timeout: Duration,
    t0: Instant,
) -> Result<Reverted, Error> {
    trace("attached, state read", t0);
    let pid = t.pid();
    let unfinished = current.unfinished_patch().is_some_and(|(i, _)| i == index);
    let patch = current.patches[index].clone();
    // A later patch on one of the same functions stacks on this one: it must go first.
    for later in &current.patches[index + 1..] {
        if let Some(f) = later
            .functions
            .iter()
            .find(|f| patch.functions.iter().any(|g| g.old == f.old))
        {
            return Err(Error::NotTop(format!(
                "cannot revert patch {}: patch {} is stacked on it (function {}); revert that one first",
                patch.id, later.id, f.name
            )));
        }
    }
    // Verify, before anything is written, that our redirects are still what we wrote.
    let mut switches = Vec::new();
    let mut busy = Vec::new();
    let mut int3_seen = false;
    let int3_ours = !unfinished || int3s_may_be_ours(pid);
    for f in &patch.functions {
        let cur = t.mem().read_vec(f.patch_addr, f.written.len())?;
        let now = site_now(cur, &f.written, &f.saved, None, unfinished, int3_ours).ok_or_else(|| {
            Error::Mismatch(format!(
                "function {} at {:#x} no longer holds patch {}'s redirect: changed by someone else; nothing reverted",
                f.name, f.patch_addr, patch.id
            ))
        })?;
        busy.push(BusyRange {
            range: CodeRange::new(f.new, f.new + f.new_size.max(1)),
            name: format!("{} (new version)", f.name),
        });
        let from = match now {
            SiteNow::Restored => continue,
            SiteNow::Written => f.written.clone(),
            SiteNow::ToDispatch(cur) => cur,
            SiteNow::Int3(cur) => {
                int3_seen = true;
                cur
            }
            SiteNow::ForeignInt3 => return Err(foreign_int3(&f.name, f.patch_addr, &patch.id)),
        };
        let plan = plan_write(f.patch_addr, &from, &f.saved)
            .map_err(|e| Error::Unsupported(format!("function {}: {e}", f.name)))?;
        let below = current.patches[..index]
            .iter()
            .rev()
            .flat_map(|p| p.functions.iter())
            .find(|g| g.old == f.old)
            .map(|g| g.reached());
        switches.push(SiteSwitch {
            name: f.name.clone(),
            plan,
            top: f.reached(),
            below,
            resume: f.trampoline,
            reverting: true,
            call_site: false,
        });
    }
    // The callers' branches go back to what was there before: the original call of the old
    // entry, or the branch of the patch below (whose memory stays).
    let mut then = Vec::new();
    for f in &patch.functions {
        for c in &f.call_sites {
            let cur = t.mem().read_vec(c.addr, c.written.len())?;
            let to_dispatch = dispatch_form(f, c);
            let now = site_now(
                cur,
                &c.written,
                &c.saved,
                to_dispatch.as_deref(),
                unfinished,
                int3_ours,
            )
            .ok_or_else(|| {
                Error::Mismatch(format!(
                    "call site {} at {:#x} (a call of {}) no longer holds patch {}'s branch: changed by someone else; nothing reverted",
                    c.caller, c.addr, f.name, patch.id
                ))
            })?;
            let written_now = matches!(now, SiteNow::Written);
            let at_dispatch = matches!(now, SiteNow::ToDispatch(_));
            let from = match now {
                SiteNow::Restored => continue,
                SiteNow::Written => c.written.clone(),
                SiteNow::ToDispatch(cur) => cur,
                SiteNow::Int3(cur) => {
                    int3_seen = true;
                    cur
                }
                SiteNow::ForeignInt3 => {
                    let site = format!("call site {} (a call of {})", c.caller, f.name);
                    return Err(foreign_int3(&site, c.addr, &patch.id));
                }
            };
            let name = format!("{} (call site {})", f.name, c.caller);
            let unsupported = |e: &dyn std::fmt::Display| {
                Error::Unsupported(format!("call site {} of {}: {e}", c.caller, f.name))
            };
            // A caller that the patch below had pointed at its own code goes back there in
            // two steps, as an apply's callers come: first to this patch's dispatch (which
            // runs this patch's code until the flag is cleared, the patch below's after),
            // then, once the flag is cleared, straight to the patch below's code. Put back
            // in one step, it would run the patch below while the calls through the entry
            // still run this patch, for as long as the callers' windows last. A caller that
            // goes back to the old entry needs no such step: the entry leads to the dispatch.
            // One found at the dispatch already (a switch killed between its windows) only
            // goes on from there, after the flag.
            if (written_now || at_dispatch) && mode == Mode::Nonstop {
                if let Some(via_dispatch) = to_dispatch.as_deref() {
                    if leads_elsewhere(c.addr, &c.saved, &[f.old, f.patch_addr]) {
                        if written_now {
                            let first = plan_write(c.addr, &from, via_dispatch)
                                .map_err(|e| unsupported(&e))?;
                            switches.push(SiteSwitch::call_site_revert(
                                name.clone(),
                                first,
                                c.trampoline,
                            ));
                        }
                        let second = plan_write(c.addr, via_dispatch, &c.saved)
                            .map_err(|e| unsupported(&e))?;
                        then.push(SiteSwitch::call_site_revert(name, second, c.trampoline));
                        continue;
                    }
                }
            }
            let plan = plan_write(c.addr, &from, &c.saved).map_err(|e| unsupported(&e))?;
            switches.push(SiteSwitch::call_site_revert(name, plan, c.trampoline));
        }
    }
    busy.push(BusyRange {
        range: CodeRange::new(patch.code_addr, patch.code_addr + patch.code_len),
        name: format!("patch {} code", short(&patch.id)),
    });
    let statemap = StateMap::open(pid)
        .ok_or_else(|| Error::Other(format!("livepatch state of process {pid} vanished")))?;
    let mut new_state = current.clone();
    new_state.patches.remove(index);
    new_state.unfinished = None;
    // Write-ahead: from the first byte written until the commit the record is marked, so that
    // the next invocation completes a revert killed in between (staged now, published by the
    // switch right before it writes).
    let staged = statemap.stage(t.mem(), &current.marked(&patch.id, Operation::Reverting))?;
    let mut begin = |m: &crate::process::Memory| -> Result<(), Error> {
        statemap.publish(m, &staged)?;
        Ok(())
    };
    // Serialized now: in stop mode the commit runs inside the stop window, where it only writes.
    let new_encoded = statemap.encode(&new_state)?;
    let mut commit = |m: &crate::process::Memory| -> Result<(), Error> {
        statemap.store_encoded(m, &new_encoded)?;
        Ok(())
    };
    // Nonstop mode: the patch is out from the first store of the switch, which clears its
    // dispatches' flag.
    let flag = patch.flag.map(|addr| switch::Flag {
        addr,
        set: false,
        then,
    });
    let stats = match switch::run(
        t,
        mode,
        &switches,
        &busy,
        timeout,
        flag,
        &mut begin,
        &mut commit,
        None,
    ) {
        Ok(s) => s,
        Err(e) => {
            // Nothing changed (a failed switch undoes its writes): nor does the state. An
            // unfinished one keeps its mark, for the next invocation to finish.
            if !matches!(
                e,
                Error::Process(ProcessError::Exited(_)) | Error::Unfinished(_)
            ) {
                let _ = statemap.store(t.mem(), current);
            }
            return Err(e);
        }
    };
    // Nothing leads into the patch memory any more. In stop mode no thread was inside it; in
    // nonstop mode threads that were running the new code must leave it first (each thread is
    // checked on its own). One that does not within the timeout keeps the memory mapped.
    let area = [CodeRange::new(
        patch.code_addr,
        patch.code_addr + patch.code_len,
    )];
    trace("switched", t0);
    let free = match mode {
        Mode::Stop => true,
        // After the switch: each thread is seen through /proc, without a stop, not running
        // (nor returning into) the memory about to be unmapped — or, when it cannot be seen
        // so soon, stopped once, alone, to check it (see `wait_threads_outside_unstopped`).
        Mode::Nonstop => switch::wait_threads_outside_unstopped(t, &area, timeout)?,
    };
    // A handler kept installed (its action could not be given back) may still send a late
    // trap to a trampoline in this memory: it stays mapped then. So it does after a killed
    // nonstop switch left int3s, while its handler is still the process's action: a thread
    // that took one may not have run the handler yet (`leftover_traps_may_follow`).
    let free = free && !stats.trap_handler_kept && !(int3_seen && leftover_traps_may_follow(pid));
    trace("threads checked", t0);
    let mut free = crate::debug_info::on_revert(t, &patch, free);
    trace("debug info withdrawn", t0);
    if free {
        match t.munmap(patch.code_addr, patch.code_len) {
            Ok(()) => {}
            // The revert itself is done: the memory, which nothing uses, stays mapped.
            Err(e @ ProcessError::Seccomp { .. }) => {
                eprintln!("livepatch: warning: {e}: the patch's memory stays mapped");
                free = false;
            }
            Err(e) => return Err(e.into()),
        }
    }
    trace("memory unmapped", t0);
    Ok(Reverted {
        pid,
        id: patch.id.clone(),
        functions: patch.functions.iter().map(|f| f.name.clone()).collect(),
        code_freed: free,
        stats,
        total_us: t0.elapsed().as_micros() as u64,
    })
}

/// Whether a thread may still be sent into the memory of a patch taken out after a killed
/// nonstop switch left int3s on its sites: only through our SIGTRAP handler, by a trap it took
/// before its int3 was removed. Once the handler is no longer the process's action (a nonstop
/// recovery's own switch gives the original action back when no thread can still need it),
/// none can: the memory is freed. After a stop-mode recovery the killed switch's handler is
/// still installed, and the memory stays mapped (unreferenced).
fn leftover_traps_may_follow(pid: i32) -> bool {
    int3s_may_be_ours(pid)
}

/// The refusal for someone else's `int3` on the first byte of `site` (at `addr`), which
/// holds patch `id`'s bytes otherwise.
fn foreign_int3(site: &str, addr: u64, id: &str) -> Error {
    Error::Mismatch(format!(
        "{site} at {addr:#x} holds patch {}'s bytes under an int3 livepatch did not write (a uprobe or a debugger's breakpoint): left as it is, nothing written",
        short(id)
    ))
}

/// Whether the branch `saved` at `addr` leads somewhere else than to the old entry (`entry`:
/// its addresses): to the code of a patch below.
fn leads_elsewhere(addr: u64, saved: &[u8], entry: &[u64]) -> bool {
    lp_core::call_site::decode(addr, saved).is_ok_and(|s| !entry.contains(&s.target))
}

/// `LIVEPATCH_TRACE`: a step of the revert, `+N us` after its start (the library's callers see
/// it too, unlike the CLI's trace points).
fn trace(what: &str, t0: Instant) {
    if std::env::var_os("LIVEPATCH_TRACE").is_some() {
        eprintln!(
            "livepatch: trace: revert: {what} +{} us",
            t0.elapsed().as_micros()
        );
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: [u8; 5] = [0x8d, 0x47, 0x01, 0x81, 0xff];
    const WRITTEN: [u8; 5] = [0xe9, 0x10, 0x20, 0x30, 0x00];

    fn with_int3(b: &[u8]) -> Vec<u8> {
        let mut v = b.to_vec();
        v[0] = 0xcc;
        v
    }

    fn now(cur: Vec<u8>, unfinished: bool, int3_ours: bool) -> Option<SiteNow> {
        site_now(cur, &WRITTEN, &SAVED, None, unfinished, int3_ours)
    }

    /// Review session 4, L6: an int3 that cannot be ours (no handler of ours installed) is
    /// never taken for our leftover: over the old bytes the site counts as restored (nothing
    /// to write, the probe stays), over the patch's bytes it is refused.
    #[test]
    fn a_foreign_int3_is_never_written_over() {
        assert!(matches!(
            now(with_int3(&SAVED), true, false),
            Some(SiteNow::Restored)
        ));
        assert!(matches!(
            now(with_int3(&WRITTEN), true, false),
            Some(SiteNow::ForeignInt3)
        ));
        // While an int3 can be ours (our handler is installed), it is taken out as before.
        assert!(matches!(
            now(with_int3(&SAVED), true, true),
            Some(SiteNow::Int3(_))
        ));
        assert!(matches!(
            now(with_int3(&WRITTEN), true, true),
            Some(SiteNow::Int3(_))
        ));
        // Outside a killed switch an int3 is nobody's business of ours: changed by someone else.
        assert!(now(with_int3(&WRITTEN), false, true).is_none());
        assert!(matches!(
            now(WRITTEN.to_vec(), false, false),
            Some(SiteNow::Written)
        ));
        assert!(matches!(
            now(SAVED.to_vec(), true, false),
            Some(SiteNow::Restored)
        ));
        assert!(now(vec![0xcc, 0, 0, 0, 0], true, true).is_none());
    }

    /// A process catches SIGTRAP only when a handler is installed: this test process has
    /// none (Rust's runtime installs SIGSEGV/SIGBUS handlers only), so no int3 can be ours.
    #[test]
    fn without_a_sigtrap_handler_no_int3_is_ours() {
        assert!(!int3s_may_be_ours(std::process::id() as i32));
    }
}

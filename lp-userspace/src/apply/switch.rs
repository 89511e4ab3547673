//! The switch itself: carrying out lp-core's write plans on a live process, in one of two modes.
//!
//! - **stop**: every thread stopped at one point; their stacks checked by lp-core; if one is
//!   inside a switched range, resume everyone and retry with backoff until the timeout; else
//!   write every plan, record the state, resume. Threads are stopped only for the check and the
//!   writes: everything slow (allocation, linking, page faults) happened before.
//! - **nonstop**: threads keep running; the plan's `int3` → sync → tail → sync → first byte →
//!   sync protocol is carried out with `membarrier` run inside the target for each sync, and a
//!   thread that hits the temporary `int3` is sent on by lp-core's trap decision.

use super::error::Error;
use super::stacks;
use crate::process::{Memory, Tracee};
use lp_core::consistency::{self, CodeRange, Frame, ThreadStack, Verdict};
use lp_core::plan::{Step, WritePlan};
use lp_core::table::{EntryState, RedirectTable, Slot};
use lp_core::trap::{self, TrapDecision};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How the switch happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// All threads stopped, stacks checked (the default).
    #[default]
    Stop,
    /// Threads keep running; the int3 protocol with the tool as tracer.
    Nonstop,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Stop => "stop",
            Mode::Nonstop => "nonstop",
        })
    }
}

/// One site to switch.
pub(crate) struct SiteSwitch {
    /// Function name, for messages.
    pub name: String,
    /// lp-core's plan for this site.
    pub plan: WritePlan,
    /// The version being installed (apply) or taken out (revert).
    pub top: u64,
    /// The version below it (a patch it stacks on), if any.
    pub below: Option<u64>,
    /// Where the original code runs from: its trampoline (displaced instructions, then a jump
    /// back past the site).
    pub resume: u64,
    /// This switch takes `top` out (revert) rather than putting it in.
    pub reverting: bool,
}

/// Ranges no thread may be in for the switch (stop mode), with the name reported as busy.
pub(crate) struct BusyRange {
    pub range: CodeRange,
    pub name: String,
}

/// Figures of one switch.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SwitchStats {
    /// Longest time all threads were stopped at once (stop mode), or the longest single
    /// thread pause (nonstop mode), in microseconds.
    pub stall_us: u64,
    /// Attempts until the process was found not busy (stop mode).
    pub attempts: u32,
    /// Threads redirected at the int3 (nonstop mode).
    pub traps: usize,
}

/// Runs a switch in `mode`. `commit` records the new state (called while the switch is
/// complete but, in stop mode, before the threads resume).
pub(crate) fn run(
    t: &mut Tracee,
    mode: Mode,
    sites: &[SiteSwitch],
    busy: &[BusyRange],
    timeout: Duration,
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
) -> Result<SwitchStats, Error> {
    match mode {
        Mode::Stop => stop_mode(t, sites, busy, timeout, commit),
        Mode::Nonstop => nonstop_mode(t, sites, commit),
    }
}

fn verify_expected(mem: &Memory, sites: &[SiteSwitch]) -> Result<(), Error> {
    for s in sites {
        let cur = mem.read_vec(s.plan.addr(), s.plan.expected().len())?;
        if cur != s.plan.expected() {
            return Err(Error::Mismatch(format!(
                "bytes of {} at {:#x} changed while we prepared the switch; nothing written",
                s.name,
                s.plan.addr()
            )));
        }
    }
    Ok(())
}

fn stop_mode(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    busy: &[BusyRange],
    timeout: Duration,
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
) -> Result<SwitchStats, Error> {
    let ranges: Vec<CodeRange> = busy.iter().map(|b| b.range).collect();
    // CFI of every module is read now, while threads still run.
    let mut unwinder = super::modules::unwinder(t.pid())?;
    let start = Instant::now();
    let mut delay = Duration::from_micros(500);
    let mut stats = SwitchStats::default();
    loop {
        stats.attempts += 1;
        t.stop_all()?;
        let stopped_at = Instant::now();
        let mut stepped = 0;
        let verdict = loop {
            let owned = stacks::collect(t, &mut unwinder, &ranges)?;
            let views: Vec<ThreadStack<'_>> = owned
                .iter()
                .map(|s| ThreadStack {
                    tid: s.tid,
                    ip: s.ip,
                    return_addresses: &s.returns,
                })
                .collect();
            match consistency::check(&views, &ranges) {
                // A thread executing a switched function (not deeper in its stack) usually
                // leaves it within a few instructions: step it out while the others wait.
                Verdict::Busy(b) if b.frame == Frame::Ip && stepped < MAX_STEP_OUT_THREADS => {
                    stepped += 1;
                    if !step_out(t, b.tid as i32, &ranges)? {
                        break Verdict::Busy(b);
                    }
                }
                v => break v,
            }
        };
        match verdict {
            Verdict::Safe => {
                let r = write_all_stopped(t, sites, commit);
                let stall = stopped_at.elapsed();
                t.resume_all()?;
                stats.stall_us = stall.as_micros() as u64;
                r?;
                return Ok(stats);
            }
            Verdict::Busy(b) => {
                t.resume_all()?;
                if start.elapsed() >= timeout {
                    return Err(Error::Busy {
                        tid: b.tid,
                        function: busy[b.range].name.clone(),
                        waited_ms: start.elapsed().as_millis() as u64,
                    });
                }
                // Short, jittered retries first (a hot function is left quickly), longer
                // ones for a thread that sleeps inside a function.
                let jitter =
                    Duration::from_micros(u64::from(stats.attempts.wrapping_mul(2654435761) % 500));
                std::thread::sleep((delay + jitter).min(timeout.saturating_sub(start.elapsed())));
                delay = (delay * 3 / 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// Threads stepped out of a switched function per attempt, at most.
const MAX_STEP_OUT_THREADS: usize = 16;
/// Instructions stepped per thread, at most.
const MAX_STEP_OUT_INSNS: usize = 64;

/// Single-steps thread `tid` until its ip is outside every range. Gives up (false) at a
/// `syscall` or `call` (the thread could block, or go deeper) or after a few instructions.
fn step_out(t: &mut Tracee, tid: i32, ranges: &[CodeRange]) -> Result<bool, Error> {
    for _ in 0..MAX_STEP_OUT_INSNS {
        let rip = t.regs(tid)?.rip;
        if !ranges.iter().any(|r| r.contains(rip)) {
            return Ok(true);
        }
        let mut insn = [0u8; 2];
        t.mem().read(rip, &mut insn)?;
        let is_syscall = insn == [0x0f, 0x05];
        let is_call = insn[0] == 0xe8 || (insn[0] == 0xff && (insn[1] >> 3) & 7 == 2);
        if is_syscall || is_call {
            return Ok(false);
        }
        t.single_step(tid)?;
    }
    Ok(false)
}

/// All threads are stopped: write every plan's bytes (the syncs are implied: no thread runs,
/// and resuming is a serializing return to user mode). On failure, undo what was written.
fn write_all_stopped(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
) -> Result<(), Error> {
    let mem = t.mem();
    verify_expected(mem, sites)?;
    let mut done = 0;
    let mut result = Ok(());
    for s in sites {
        if let Err(e) = mem.write(s.plan.addr(), s.plan.result()) {
            result = Err(e.into());
            break;
        }
        done += 1;
    }
    if result.is_ok() {
        result = commit(mem);
    }
    if result.is_err() {
        for s in &sites[..done] {
            let _ = mem.write(s.plan.addr(), s.plan.expected());
        }
    }
    result
}

fn nonstop_mode(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
) -> Result<SwitchStats, Error> {
    verify_expected(t.mem(), sites)?;
    // The trap decisions come from lp-core's table: one entry per site, pending until the
    // commit, active after.
    let cap = sites.len().max(1);
    let a: &'static mut [Slot] = Box::leak(vec![Slot::EMPTY; cap].into_boxed_slice());
    let b: &'static mut [Slot] = Box::leak(vec![Slot::EMPTY; cap].into_boxed_slice());
    let table = Rc::new(RefCell::new(RedirectTable::new(a, b)));
    let table_err = |e: lp_core::table::TableError| Error::Other(format!("redirect table: {e}"));
    for (i, s) in sites.iter().enumerate() {
        let tb = table.borrow();
        let addr = s.plan.addr();
        if let Some(below) = s.below {
            tb.push(addr, s.resume, below, below_id(i))
                .map_err(table_err)?;
            tb.set_state(addr, below_id(i), EntryState::Active)
                .map_err(table_err)?;
        }
        tb.push(addr, s.resume, s.top, top_id(i))
            .map_err(table_err)?;
        if s.reverting {
            tb.set_state(addr, top_id(i), EntryState::Reverting)
                .map_err(table_err)?;
        }
    }
    let hook_table = table.clone();
    t.set_trap_hook(Some(Box::new(move |addr| {
        match trap::decide(&hook_table.borrow(), addr) {
            TrapDecision::Redirect(x) | TrapDecision::Resume(x) => Some(x),
            TrapDecision::NotOurs => None,
        }
    })));
    let mut result = nonstop_steps(t, sites, &table, commit);
    if result.is_err() {
        // Put every site back as it was, with the same protocol, so that no int3 of ours is
        // left behind when we let go.
        if let Err(e) = nonstop_rollback(t, sites, &table) {
            result = Err(e);
        }
    }
    // Drain: no thread may be left between our int3 and its report when we let go.
    let s0 = Instant::now();
    let drained = drain_traps(t);
    trace("drain", s0);
    t.set_trap_hook(None);
    let traps = t.traps_handled;
    result?;
    drained?;
    Ok(SwitchStats {
        stall_us: 0,
        attempts: 1,
        traps,
    })
}

fn trace(what: &str, since: Instant) {
    if std::env::var_os("LIVEPATCH_TRACE").is_some() {
        eprintln!(
            "livepatch: trace: nonstop {what} +{} us",
            since.elapsed().as_micros()
        );
    }
}

fn nonstop_steps(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    table: &Rc<RefCell<RedirectTable<'static>>>,
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
) -> Result<(), Error> {
    // All sites go through the protocol together: every int3 first, then every tail, then
    // every first byte, so the process switches all functions at one commit point.
    let max_steps = sites
        .iter()
        .map(|s| s.plan.steps().len())
        .max()
        .unwrap_or(0);
    let mut committed = false;
    let mut settled = false;
    for i in 0..max_steps {
        let mut sync = false;
        for s in sites {
            match s.plan.steps().get(i) {
                Some(Step::Sync) => sync = true,
                Some(step) => {
                    if let Some((addr, data)) = step.data() {
                        // The last write of a plan (its first byte) goes live only after the
                        // commit: from then on trapping threads go to the new code.
                        if !committed && is_last_write(&s.plan, i) {
                            commit_all(table, sites)?;
                            committed = true;
                        }
                        t.mem().write(addr, data)?;
                    }
                }
                None => {}
            }
        }
        if sync {
            let s0 = Instant::now();
            t.sync_cores()?;
            trace("sync", s0);
            t.resume_all()?;
            t.poll_events()?;
            if !settled {
                // Every int3 is in place and seen: no thread can enter a site any more. One
                // that was already past an int3, inside the instructions the tail will
                // overwrite, must leave them first.
                let inside: Vec<CodeRange> = sites
                    .iter()
                    .filter(|s| s.plan.len() > 1)
                    .map(|s| CodeRange::new(s.plan.addr() + 1, s.plan.addr() + s.plan.len() as u64))
                    .collect();
                let s0 = Instant::now();
                wait_threads_outside(t, &inside, None, Duration::from_secs(2))?;
                trace("settle", s0);
                settled = true;
            }
        }
    }
    if !committed {
        commit_all(table, sites)?;
    }
    commit(t.mem())
}

fn nonstop_rollback(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    table: &Rc<RefCell<RedirectTable<'static>>>,
) -> Result<(), Error> {
    // Trapping threads run what the restored bytes run: the old code (apply) or the version
    // being kept (a failed revert).
    for (i, s) in sites.iter().enumerate() {
        let state = if s.reverting {
            EntryState::Active
        } else {
            EntryState::Pending
        };
        let _ = table.borrow().set_state(s.plan.addr(), top_id(i), state);
    }
    for s in sites {
        t.mem().write(s.plan.addr(), &[lp_core::site::INT3])?;
    }
    t.sync_cores()?;
    t.resume_all()?;
    t.poll_events()?;
    for s in sites {
        t.mem().write(s.plan.addr() + 1, &s.plan.expected()[1..])?;
    }
    t.sync_cores()?;
    t.resume_all()?;
    t.poll_events()?;
    for s in sites {
        t.mem().write(s.plan.addr(), &s.plan.expected()[..1])?;
    }
    t.sync_cores()?;
    t.resume_all()?;
    Ok(())
}

fn is_last_write(plan: &WritePlan, i: usize) -> bool {
    !plan.steps()[i + 1..].iter().any(|s| s.data().is_some())
}

fn below_id(i: usize) -> u32 {
    2 * i as u32 + 1
}

fn top_id(i: usize) -> u32 {
    2 * i as u32 + 2
}

/// Apply: from now on a trapping thread runs the new version. Revert: nothing changes (the
/// entry stays "reverting": trapping threads run the version below until the end).
fn commit_all(
    table: &Rc<RefCell<RedirectTable<'static>>>,
    sites: &[SiteSwitch],
) -> Result<(), Error> {
    for (i, s) in sites.iter().enumerate() {
        if s.reverting {
            continue;
        }
        table
            .borrow()
            .set_state(s.plan.addr(), top_id(i), EntryState::Active)
            .map_err(|e| Error::Other(format!("redirect table: {e}")))?;
    }
    Ok(())
}

/// After the last sync no thread can hit one of our int3s any more, but one may still be
/// between an int3 it hit and the report of its SIGTRAP; letting go of it then would deliver
/// the SIGTRAP and kill the process. So each thread in turn is stopped (a trap report in
/// flight arrives first and is redirected), checked for a queued SIGTRAP (resumed and stopped
/// again until it has none), and resumed: one short pause per thread, never all at once.
fn drain_traps(t: &mut Tracee) -> Result<(), Error> {
    t.sync_cores()?;
    t.resume_all()?;
    t.poll_events()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    for tid in t.threads() {
        loop {
            // Blocked in a system call with no SIGTRAP queued: not between a trap and its
            // report, and no int3 of ours is left to hit.
            if t.blocked_in_syscall_at(tid).is_some() && !t.sigtrap_pending(tid) {
                break;
            }
            if t.stop_thread(tid).is_err() || !t.threads().contains(&tid) {
                break; // exited meanwhile
            }
            let pending = t.sigtrap_pending(tid);
            t.resume_thread(tid)?;
            if !pending || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(20));
            t.poll_events()?;
        }
    }
    t.poll_events()?;
    Ok(())
}

/// Checks the threads one at a time (each stopped only for its own check) until none of them
/// executes in `ranges` — nor, when an unwinder is given, will return into them. Threads found
/// outside stay outside: the caller has already made the ranges unreachable.
pub(crate) fn wait_threads_outside(
    t: &mut Tracee,
    ranges: &[CodeRange],
    mut unwinder: Option<&mut crate::unwind::Unwinder>,
    timeout: Duration,
) -> Result<(), Error> {
    if ranges.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let mut pending = t.threads();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for tid in pending {
            // A thread blocked in a system call outside the ranges needs no stop: it resumes
            // there, and nothing leads it back in. (Its stack matters only with an unwinder.)
            if unwinder.is_none()
                && t.blocked_in_syscall_at(tid)
                    .is_some_and(|pc| !ranges.iter().any(|r| r.contains(pc)))
            {
                continue;
            }
            if t.stop_thread(tid).is_err() || !t.threads().contains(&tid) {
                continue; // exited meanwhile
            }
            let regs = t.regs(tid)?;
            // Stopped right after one of our int3s with its SIGTRAP queued: it took the trap
            // and the trap decision will move it; it is not executing the bytes behind it.
            let trapped = ranges.iter().any(|r| r.start == regs.rip) && t.sigtrap_pending(tid);
            let mut addrs = if trapped { vec![] } else { vec![regs.rip] };
            if let Some(u) = unwinder.as_deref_mut() {
                let bt = u.unwind(
                    &crate::unwind::Registers::from_user_regs(&regs),
                    t.mem(),
                    512,
                );
                addrs.extend(bt.return_addresses);
            }
            t.resume_thread(tid)?;
            t.poll_events()?;
            if addrs.iter().any(|a| ranges.iter().any(|r| r.contains(*a))) {
                still.push(tid);
            }
        }
        if !still.is_empty() {
            if Instant::now() > deadline {
                return Err(Error::Busy {
                    tid: still[0] as u32,
                    function: "the code being switched".into(),
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        pending = still;
    }
    Ok(())
}

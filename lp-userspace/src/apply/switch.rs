//! The switch itself: carrying out lp-core's write plans on a live process, in one of two modes.
//!
//! - **stop**: every thread stopped at one point; their stacks checked by lp-core; if one is
//!   inside a switched range, resume everyone and retry with backoff until the timeout; else
//!   write every plan, record the state, resume. Threads are stopped only for the check and the
//!   writes: everything slow (allocation, linking, page faults) happened before.
//! - **nonstop**: threads keep running; the plan's `int3` → sync → tail → sync → first byte →
//!   sync protocol is carried out with `membarrier` run inside the target for each sync, and a
//!   thread that hits the temporary `int3` is sent on by a SIGTRAP handler of ours inside the
//!   target, from lp-core's trap decisions ([`nonstop`]).

mod nonstop;
mod trap_handler;

pub(crate) use nonstop::{quiet_orphaned_agent, wait_threads_outside_unstopped, Early, Flag};

use super::error::Error;
use super::stacks;
use crate::process::{Memory, Tracee};
use lp_core::consistency::{self, CodeRange, Frame, ThreadStack, Verdict};
use lp_core::plan::WritePlan;
use std::time::{Duration, Instant};

/// How the switch happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// All threads stopped, stacks checked (the default).
    #[default]
    Stop,
    /// Threads keep running; the int3 protocol with a trap handler inside the target.
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
#[derive(Clone)]
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
    /// A caller's direct branch (one instruction), not a function's entry.
    pub call_site: bool,
}

impl SiteSwitch {
    /// The switch of a caller's direct branch to a replaced function (apply: to the new code;
    /// revert: back), whose trampoline `tramp` runs the *original* branch relocated.
    ///
    /// A thread that hits the temporary `int3` on a call site must run the original branch in
    /// every phase (before the commit, after it, while reverting, rolling back): the original
    /// names the old entry, whose own redirect (or its `int3`, decided for the same phase)
    /// leads to the right version. So `top` and `resume` are both the trampoline and there is
    /// no version `below`: lp-core's decisions (`Redirect(top)` when active, `Resume(resume)`
    /// otherwise) then all send it there.
    pub fn call_site(name: String, plan: WritePlan, tramp: u64) -> SiteSwitch {
        SiteSwitch {
            name,
            plan,
            top: tramp,
            below: None,
            resume: tramp,
            reverting: false,
            call_site: true,
        }
    }

    /// [`SiteSwitch::call_site`] for a revert.
    pub fn call_site_revert(name: String, plan: WritePlan, tramp: u64) -> SiteSwitch {
        SiteSwitch {
            reverting: true,
            ..SiteSwitch::call_site(name, plan, tramp)
        }
    }
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
    /// Nonstop mode: the process's SIGTRAP action could not be given back safely in time, and
    /// our handler (which passes every trap that is not ours on to it) stays installed.
    /// (Not serialized: the JSON records are a documented interface, lp-py mirrors them.)
    #[serde(skip_serializing)]
    pub trap_handler_kept: bool,
}

/// Runs a switch in `mode`. `begin` publishes the state's write-ahead mark (called right
/// before the first byte is written: in stop mode once the threads are stopped and found not
/// busy); `commit` records the new state (called while the switch is complete but, in stop
/// mode, before the threads resume). A switch that fails after `begin` has undone its writes.
/// `flag`: the patch's dispatch flag (nonstop mode, apply/dispatch.rs), set by an apply's
/// commit, cleared by a revert before its first write. `early`: nonstop mode's area and agent
/// when the caller set them up already (see [`Early`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    t: &mut Tracee,
    mode: Mode,
    sites: &[SiteSwitch],
    busy: &[BusyRange],
    timeout: Duration,
    flag: Option<Flag>,
    begin: &mut dyn FnMut(&Memory) -> Result<(), Error>,
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
    early: Option<Early>,
) -> Result<SwitchStats, Error> {
    match mode {
        // Every thread is stopped: the sites switch at once, whatever they lead to (a revert
        // of a patch with dispatches frees them with the rest of its memory).
        Mode::Stop => stop_mode(t, sites, busy, timeout, begin, commit),
        Mode::Nonstop => {
            begin(t.mem())?;
            nonstop::run(t, sites, timeout, flag.as_ref(), commit, early)
        }
    }
}

/// Sites whose bytes lie close together in one page, read and written as one run: with many
/// call sites, one `/proc/PID/mem` access per site would lengthen the stop window.
pub(super) struct Span {
    pub(super) start: u64,
    end: u64,
    pub(super) sites: Vec<usize>,
}

impl Span {
    fn range(&self, s: &SiteSwitch) -> std::ops::Range<usize> {
        let off = (s.plan.addr() - self.start) as usize;
        off..off + s.plan.len()
    }
}

/// Gap between two sites up to which they share a span (reading the bytes between them costs
/// less than another system call).
const SPAN_GAP: u64 = 512;

pub(super) fn spans(sites: &[SiteSwitch]) -> Vec<Span> {
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_by_key(|&i| sites[i].plan.addr());
    let mut out: Vec<Span> = Vec::new();
    for i in order {
        let (start, end) = (
            sites[i].plan.addr(),
            sites[i].plan.addr() + sites[i].plan.len() as u64,
        );
        let page = |a: u64| a >> 12;
        match out.last_mut() {
            Some(s)
                if start >= s.end
                    && start - s.end <= SPAN_GAP
                    && page(start) == page(s.start)
                    && page(end - 1) == page(s.start) =>
            {
                s.end = end;
                s.sites.push(i);
            }
            _ => out.push(Span {
                start,
                end,
                sites: vec![i],
            }),
        }
    }
    out
}

/// Reads each span's current bytes, checking every site holds its plan's expected bytes.
pub(super) fn read_verified(
    mem: &Memory,
    sites: &[SiteSwitch],
    spans: &[Span],
) -> Result<Vec<Vec<u8>>, Error> {
    read_verified_when(
        mem,
        sites,
        spans,
        "while we prepared the switch; nothing written",
    )
}

/// [`read_verified`], saying `when` the bytes were found changed (and what became of the
/// writes) in its error.
pub(super) fn read_verified_when(
    mem: &Memory,
    sites: &[SiteSwitch],
    spans: &[Span],
    when: &str,
) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::with_capacity(spans.len());
    for sp in spans {
        let cur = mem.read_vec(sp.start, (sp.end - sp.start) as usize)?;
        for &i in &sp.sites {
            let s = &sites[i];
            if cur[sp.range(s)] != *s.plan.expected() {
                return Err(Error::Mismatch(format!(
                    "bytes of {} at {:#x} changed {when}",
                    s.name,
                    s.plan.addr()
                )));
            }
        }
        out.push(cur);
    }
    Ok(out)
}

fn verify_expected(mem: &Memory, sites: &[SiteSwitch]) -> Result<(), Error> {
    read_verified(mem, sites, &spans(sites)).map(drop)
}

fn stop_mode(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    busy: &[BusyRange],
    timeout: Duration,
    begin: &mut dyn FnMut(&Memory) -> Result<(), Error>,
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
        crate::process::stop_point::reached("stop-window");
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
                let r = write_all_stopped(t, sites, begin, commit);
                let stall = stopped_at.elapsed();
                t.resume_all()?;
                stats.stall_us = stall.as_micros() as u64;
                r?;
                crate::process::stop_point::reached("stop-resumed");
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
/// and resuming is a serializing return to user mode), between the state's write-ahead mark
/// (`begin`) and its `commit`. On failure, undo what was written.
fn write_all_stopped(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    begin: &mut dyn FnMut(&Memory) -> Result<(), Error>,
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
) -> Result<(), Error> {
    let mem = t.mem();
    // One read and one write per span of nearby sites; the bytes between sites are written
    // back as they were read (no thread runs).
    let spans = spans(sites);
    let before = read_verified(mem, sites, &spans)?;
    begin(mem)?;
    let mut done = 0;
    let mut result = Ok(());
    for (sp, cur) in spans.iter().zip(&before) {
        let mut new = cur.clone();
        for &i in &sp.sites {
            new[sp.range(&sites[i])].copy_from_slice(sites[i].plan.result());
        }
        if let Err(e) = mem.write(sp.start, &new) {
            result = Err(e.into());
            break;
        }
        done += 1;
    }
    if result.is_ok() {
        crate::process::stop_point::reached("switch-written");
        result = commit(mem);
    }
    if result.is_err() {
        for (sp, cur) in spans[..done].iter().zip(&before) {
            let _ = mem.write(sp.start, cur);
        }
    }
    result
}

/// Checks threads `tids` (traced) one at a time, each stopped only for its own check, and let
/// go: returns those that execute in `ranges` — or, when an unwinder is given, will return
/// into them. Threads found outside stay outside: the caller has already made the ranges
/// unreachable. (The threads that need it: see `nonstop/outside.rs`, which sees the others
/// from /proc, and waits.)
pub(crate) fn threads_inside(
    t: &mut Tracee,
    tids: &[i32],
    ranges: &[CodeRange],
    mut unwinder: Option<&mut crate::unwind::Unwinder>,
) -> Result<Vec<i32>, Error> {
    let mut still = Vec::new();
    if ranges.is_empty() {
        return Ok(still);
    }
    for &tid in tids {
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
    Ok(still)
}

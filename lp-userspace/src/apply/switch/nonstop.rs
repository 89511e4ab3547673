//! Nonstop mode: lp-core's `int3` → sync → tail → sync → first byte → sync protocol carried out
//! while the target's threads keep running, with no ptrace stop of a running thread.
//!
//! - Only one thread is traced ([`Tracee::attach_one`]): the one borrowed for the system calls
//!   (rt_sigaction, the membarrier registration, the start of the sync agent), preferably one
//!   blocked in a system call, so that no running thread is stopped at all. It stays stopped
//!   for the whole switch. The syncs (membarrier SYNC_CORE) run on a thread of ours in the
//!   target, the sync agent (`nonstop/sync_agent.rs`), or through ptrace without it.
//! - A thread that reaches one of our temporary `int3`s takes SIGTRAP *in the target*: a small
//!   handler of ours ([`trap_handler`]) looks `rip - 1` up in a table and sets rip to the
//!   destination of the current phase. The destinations are lp-core's trap decisions
//!   ([`lp_core::trap::decide`] on a [`RedirectTable`]), computed here for every site and
//!   phase before anything is written; the tool flips a one-byte phase index at the commit.
//! - A trap that is not ours goes to the action the process had (see `trap_handler.rs`).
//! - The handler's area (a memfd mapping named after its layout and code, `area_name.rs`, one
//!   per process and build of livepatch) is created by
//!   the first nonstop switch and stays mapped for the life of the process, reused by later
//!   switches:
//!   a thread that took our trap just before the action was restored may still run the
//!   handler later, and must find it there.
//!
//! Nothing here stops, seizes or signals the other threads: what the tool needs to know about
//! them (blocked or running, CPU time consumed, SIGTRAP pending) comes from /proc.

mod area_name;
mod outside;
mod stacks;
mod sync_agent;
mod threads;
mod timer_slack;

use super::trap_handler as th;
use super::{verify_expected, Error, SiteSwitch, SwitchStats};
use crate::process::observe::{self, Activity};
use crate::process::{prot, Memory, Tracee};
use lp_core::consistency::CodeRange;
use lp_core::plan::{Step, WritePlan};
use lp_core::table::{EntryState, RedirectTable, Slot};
use lp_core::trap::{self, TrapDecision};
use stacks::{stack_refers_to, Mappings};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use sync_agent::{Calls, Op, SyncAgent};
use threads::{Thread, Threads};

pub(crate) use outside::wait_threads_outside_unstopped;

/// CPU time a thread must have consumed since a sync before it counts as having moved on:
/// past the few straight-line instructions behind an `int3` (lp-core refuses sites with a
/// branch into them), and past the short non-sleeping kernel path from an `int3` to its
/// SIGTRAP being queued. Both take nanoseconds to microseconds; 200 µs leaves a wide margin.
const PROGRESS_NS: u64 = 200_000;

/// At least this long for the threads to move on before the action is restored (a busy
/// machine gives a low-priority thread little CPU).
const MIN_UNINSTALL_WAIT: Duration = Duration::from_secs(10);

const SIGTRAP: u64 = libc::SIGTRAP as u64;
const SA_SIGINFO: u64 = 4;
const SA_ONSTACK: u64 = 0x0800_0000;
const SA_RESTART: u64 = 0x1000_0000;
const SA_NODEFER: u64 = 0x4000_0000;
const SA_RESETHAND: u64 = 0x8000_0000;
const SA_RESTORER: u64 = 0x0400_0000;

/// Phase indexes (columns of the table).
const BEFORE: u8 = 0;
const COMMITTED: u8 = 1;
const ROLLBACK: u8 = 2;

/// The kernel's `struct sigaction` on x86-64 (rt_sigaction with an 8-byte mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct KAction {
    handler: u64,
    flags: u64,
    restorer: u64,
    mask: u64,
}

impl KAction {
    fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in [self.handler, self.flags, self.restorer, self.mask]
            .iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; 32]) -> KAction {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        KAction {
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        }
    }

    fn read(mem: &Memory, addr: u64) -> Result<KAction, Error> {
        let mut b = [0u8; 32];
        mem.read(addr, &mut b)?;
        Ok(KAction::from_bytes(&b))
    }
}

/// The handler's area in the target, and the table bank this switch uses.
struct Area {
    code: u64,
    bank: u64,
}

impl Area {
    fn data(&self) -> u64 {
        self.code + th::PAGE
    }

    fn restorer(&self) -> u64 {
        self.code + th::RESTORER_OFF
    }

    fn read_u64(&self, mem: &Memory, off: u64) -> Result<u64, Error> {
        Ok(mem.read_u64(self.data() + off)?)
    }

    fn set_phase(&self, mem: &Memory, phase: u8) -> Result<(), Error> {
        // One byte: a write through /proc/PID/mem of a single byte cannot tear.
        Ok(mem.write(self.data() + th::PHASE + self.bank, &[phase])?)
    }
}

/// CPU time of the calling thread (the tool's, which does the switch), in microseconds: the
/// target's threads wait behind it for a CPU on a small machine.
fn thread_cpu_us() -> u64 {
    // SAFETY: clock_gettime fills the timespec it is given.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts
    };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// `LIVEPATCH_TRACE`: a phase of the switch, `+N us` after `since`, after `@M`: µs since
/// the first line this process traced (one clock for every line: the gap between any two
/// lines reads off directly). Tests read the lines' ends.
fn trace(what: &str, since: Instant) {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    if std::env::var_os("LIVEPATCH_TRACE").is_some() {
        let origin = *ORIGIN.get_or_init(Instant::now);
        eprintln!(
            "livepatch: trace: @{} nonstop {what} +{} us",
            origin.elapsed().as_micros(),
            since.elapsed().as_micros()
        );
    }
}

/// What a nonstop apply sets up before its preparation ([`Early::start`]): the areas found,
/// the handler's area opened, the sync agent started and the program's SIGTRAP action read —
/// for the preparation's own system calls (the patch memory's mapping and protections:
/// [`Early::map_patch`], [`Early::protect`]) and then for the switch, which takes it over
/// ([`run`]).
///
/// Why. The agent's start waits for the borrowed thread twice or three times (each a wait
/// for that ordinary thread to get a CPU: 60–620 µs under load), and so did each remote call
/// of the preparation; started first, the agent makes those calls (a request and its answer),
/// while the planner thread links and plans the patch beside (see `apply_here`).
///
/// Dropped (a preparation that failed): the agent is told to exit and waited for (its Drop);
/// the area stays, as every area does (see the module documentation) — unless it was made for
/// this apply: [`Early::abandon`] takes it out again (review 11: a refused apply left it in a
/// process never patched). Signals the borrowed
/// thread was about to take while it started the agent are held by the tracee at once (sent
/// again when the thread is let go, in the order they were taken, see [`Tracee::hold`]).
pub(crate) struct Early {
    /// The process's areas of this layout as found before the agent started (see
    /// [`layout_areas`]): the agents living there then are orphans, not ours.
    areas: Vec<(u64, bool)>,
    area: Area,
    /// The program's SIGTRAP action, once read (by the preparation's first agent program).
    current: Option<KAction>,
    agent: Option<SyncAgent>,
    /// The area was made by this apply (none was found).
    made: bool,
    /// The switch's wait for a thread keeping SIGTRAP blocked ([`refuse_if_sigtrap_blocked`]).
    timeout: Duration,
    /// The switch's first look at the threads, taken while the agent maps the patch memory
    /// (see [`FirstLook`]).
    first_look: Option<FirstLook>,
}

impl Early {
    /// Opens the area, reads the SIGTRAP action and starts the agent on `t`'s borrowed thread
    /// (see [`Early`]). An error leaves what a switch failing there leaves (an area made stays).
    pub(crate) fn start(t: &mut Tracee, timeout: Duration) -> Result<Early, Error> {
        let t0 = Instant::now();
        let areas = layout_areas(t.pid(), t.mem())?;
        let found = areas.iter().find_map(|&(code, own)| own.then_some(code));
        let area = open_area(t, found)?;
        trace("area opened (before the preparation)", t0);
        let mut held = Vec::new();
        let agent = SyncAgent::start(t, area.code, &mut held, false);
        for (tid, signal) in held {
            t.hold(tid, signal);
        }
        trace(
            &format!("sync agent {:?}", agent.as_ref().map(|a| a.tid())),
            t0,
        );
        // The program's SIGTRAP action is read by the preparation's first program (see
        // `Early::map_patch`), or at the switch.
        Ok(Early {
            areas,
            area,
            current: None,
            agent,
            made: found.is_none(),
            timeout,
            first_look: None,
        })
    }

    /// The refusal of the switch's first look (a thread whose seccomp filters stop our
    /// handler's calls, or that keeps SIGTRAP blocked, see [`FirstLook`]), taken while the
    /// patch memory was mapped: the apply is refused there, as in its preparation
    /// ([`Early::abandon`]), rather than after the patch is planned and written, and without
    /// leaving an area it made (the switch's own refusal returns with the agent dropped, not
    /// abandoned).
    pub(crate) fn refusal(&mut self) -> Option<Error> {
        let look = self.first_look.as_mut()?;
        std::mem::replace(&mut look.checked, Ok(())).err()
    }

    /// An apply refused in its preparation, before its switch: the agent is told to exit and
    /// waited for, and an area this apply made is unmapped once no agent lives in it (nothing
    /// was installed, nothing of the program refers to it): the target is left as it was, but
    /// for the process's membarrier registration for SYNC_CORE, which the agent made as it
    /// started (see `sync_agent::assemble`), which the kernel keeps for the process's life
    /// (the program's own SYNC_CORE barriers, refused before, are then served).
    pub(crate) fn abandon(mut self, t: &mut Tracee) {
        drop(self.agent.take());
        if self.made && sync_agent::living_agent(t.mem(), self.area.code).is_none() {
            let _ = t.munmap(self.area.code, th::AREA_LEN);
            crate::process::maps_text::changed(t.pid());
        }
    }

    /// Maps an apply's patch memory, `len` bytes exactly at `addr` (see [`sync_agent::Op::Mmap`]:
    /// read-only, `MAP_FIXED_NOREPLACE`, populated), then sets `protections` in it ((address,
    /// length, protection) each): through the agent when it answers, as one program (one
    /// request for all), else the mapping through ptrace. Returns the mapping's address and
    /// how many of `protections` are set (a prefix: the caller sets the rest, see
    /// [`Early::protect`]). Every call is vetted against the seccomp filters first, either
    /// way. An agent stuck in a call is an error (`Unfinished`): it may still make it.
    pub(crate) fn map_patch(
        &mut self,
        t: &mut Tracee,
        addr: u64,
        len: u64,
        protections: &[(u64, u64, u64)],
    ) -> Result<(u64, usize), Error> {
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_FIXED_NOREPLACE
            | libc::MAP_POPULATE;
        if let Some(a) = self.agent.as_mut() {
            // The program's SIGTRAP action is read first, in the same program: one request
            // and its answer fewer than a call of its own.
            let scratch = self.area.data() + th::SCRATCH_OLD;
            let read = self.current.is_none();
            let mut ops = Vec::new();
            if read {
                t.vet_ahead(libc::SYS_rt_sigaction, [SIGTRAP, 0, scratch, 8, 0, 0])?;
                ops.push(Op::SigAction {
                    signal: SIGTRAP as u32,
                    act: 0,
                    old: scratch,
                });
            }
            t.vet_ahead(
                libc::SYS_mmap,
                [addr, len, prot::READ, flags as u64, u64::MAX, 0],
            )?;
            ops.push(Op::Mmap { addr, len });
            for &(at, len, p) in protections
                .iter()
                .take_while(|(_, _, p)| sync_agent::MPROTECT_PROTS.contains(p))
            {
                t.vet_ahead(libc::SYS_mprotect, [at, len, p, 0, 0, 0])?;
                ops.push(Op::Mprotect {
                    addr: at,
                    len,
                    prot: p,
                });
            }
            // The switch's first look at the threads is taken meanwhile, once: the tool would
            // only wait (the planner is usually done by now).
            let mut first = None;
            let calls = {
                let (areas, code, agent, timeout) =
                    (&self.areas, self.area.code, a.tid(), self.timeout);
                let wanted = self.first_look.is_none();
                a.calls_meanwhile(&ops, sync_agent::ANSWER_WAIT, &mut || {
                    if wanted {
                        first = Some(FirstLook::take(t, areas, Some(code), Some(agent), timeout));
                    }
                })
            };
            if first.is_some() {
                self.first_look = first;
            }
            // The action read: kept (else it is read at the switch).
            let first = usize::from(read);
            if read && matches!(calls, Ok(Some(c)) if c.done >= 1) {
                self.current = KAction::read(t.mem(), scratch).ok();
            }
            // From here on, `done` counts the mapping and the protections.
            let calls = calls.map(|c| {
                c.map(|c| Calls {
                    done: c.done.saturating_sub(first),
                    ..c
                })
            });
            match calls {
                Ok(Some(c)) if c.done >= 1 => return Ok((addr, c.done - 1)),
                // Made, not counted (the agent silent right after it): mapped all the same; the
                // protections after it were not set (review 11: mapped again elsewhere, this
                // mapping was left behind for good).
                Ok(Some(c)) if c.mapped as u64 == addr => return Ok((addr, 0)),
                // Mapped elsewhere than asked (see the agent's code): given back.
                Ok(Some(c)) if c.mapped > 0 && c.mapped as u64 != addr => {
                    let _ = t.munmap(c.mapped as u64, len);
                }
                // The same call through ptrace tells what is wrong (in its own words).
                Ok(_) => {}
                Err(stuck) => return Err(agent_stuck(t.pid(), stuck)),
            }
        }
        // Without the agent the first look is taken here all the same: its refusal comes
        // before the switch (see `Early::refusal`), as when the agent maps.
        if self.first_look.is_none() {
            let agent = self.agent.as_ref().map(SyncAgent::tid);
            let (areas, code) = (&self.areas, self.area.code);
            self.first_look = Some(FirstLook::take(t, areas, Some(code), agent, self.timeout));
        }
        Ok((t.mmap(addr, len, prot::READ, flags, -1, 0)?, 0))
    }

    /// `mprotect(addr, len, prot)` in the target, through the agent when it answers and
    /// `prot` is one its code is vetted for (see [`Early::map_patch`]).
    pub(crate) fn protect(
        &mut self,
        t: &mut Tracee,
        addr: u64,
        len: u64,
        prot: u64,
    ) -> Result<(), Error> {
        if let Some(a) = self
            .agent
            .as_mut()
            .filter(|_| sync_agent::MPROTECT_PROTS.contains(&prot))
        {
            t.vet_ahead(libc::SYS_mprotect, [addr, len, prot, 0, 0, 0])?;
            match a.call(Op::Mprotect { addr, len, prot }, sync_agent::ANSWER_WAIT) {
                Ok(Some(0)) => return Ok(()),
                Ok(_) => {}
                Err(stuck) => return Err(agent_stuck(t.pid(), stuck)),
            }
        }
        Ok(t.mprotect(addr, len, prot)?)
    }
}

/// Carries out the switch of `sites` in nonstop mode (see the module documentation).
///
/// `early`: the area, action and agent an apply set up before its preparation ([`Early`]);
/// without it (a revert, a switch finishing a killed one) they are set up here.
///
/// `timeout`: how long the threads get to leave the bytes behind an `int3` (then the switch
/// is rolled back: busy), and at least [`MIN_UNINSTALL_WAIT`], to be past our traps before the
/// SIGTRAP action is restored.
pub(crate) fn run(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    timeout: Duration,
    flag: Option<&Flag>,
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
    mut early: Option<Early>,
) -> Result<SwitchStats, Error> {
    let (began_at, cpu_at) = (Instant::now(), thread_cpu_us());
    let _precise = timer_slack::Precise::start();
    verify_expected(t.mem(), sites)?;
    if sites.len() > th::MAX_SITES {
        return Err(Error::Unsupported(format!(
            "nonstop mode switches at most {} sites (function entries and their direct callers) at once, not {}",
            th::MAX_SITES,
            sites.len()
        )));
    }
    // A sync agent orphaned by a killed livepatch may still live in an area (it blocks every
    // signal): it is ours, not a thread of the program that keeps SIGTRAP blocked, and it
    // never runs the program's code: no wait is for it either. The areas are looked for once:
    // only a livepatch makes one, and this one holds the process's lock (see `layout_areas`
    // for the maps they are looked for in). An apply's early agent (see [`Early`]) lives in
    // this build's area, opened already (perhaps made since the areas were looked for):
    // listed with the orphans, it is told from the program's threads in any state, as they
    // are (and skipped twice where the switch's agent is skipped, which changes nothing).
    let (found, first) = match early.as_mut() {
        Some(e) => {
            let first = e.first_look.take().unwrap_or_else(|| {
                let agent = e.agent.as_ref().map(SyncAgent::tid);
                FirstLook::take(t, &e.areas, Some(e.area.code), agent, timeout)
            });
            (None, first)
        }
        None => {
            let areas = layout_areas(t.pid(), t.mem())?;
            let found = areas.iter().find_map(|&(code, own)| own.then_some(code));
            (found, FirstLook::take(t, &areas, found, None, timeout))
        }
    };
    let FirstLook {
        mut agents,
        threads,
        checked,
    } = first;
    let threads = RefCell::new(threads);
    trace("area looked for", began_at);
    checked?;
    trace("signal masks checked", began_at);
    let columns = decisions(sites)?;
    let mut area = match &early {
        Some(e) => Area {
            code: e.area.code,
            bank: 0,
        },
        None => open_area(t, found)?,
    };
    agents.code = Some(area.code);
    trace("area opened", began_at);
    // With dispatches the callers and the entries switch in windows of their own: a call
    // site's trap takes the original branch, through the entry (whole then) and the dispatch
    // (whose flag decides); the shortcut to the entry's own decision would be wrong there —
    // the entry's "before the commit" is the old code even after the flag store, while the
    // callers are pointed on to the new code, or before a revert's store. The sites an apply
    // points on from the dispatch (`flag.then`) have the same address and trampoline as their
    // first switch: the same rows serve them.
    let shortcut = flag.is_none();
    write_table(
        t.mem(),
        &mut area,
        sites,
        &published(sites, &columns, shortcut),
    )?;
    let hits0 = area.read_u64(t.mem(), th::HITS)?;

    // The borrowed thread is traced: a trap it takes reaches us, not the handler. The same
    // decisions, the same phase.
    let phase = Rc::new(Cell::new(BEFORE));
    let hook_phase = phase.clone();
    let hook_table: Vec<(u64, [u64; th::NPHASES])> = sites
        .iter()
        .zip(&columns)
        .map(|(s, c)| (s.plan.addr(), *c))
        .collect();
    t.set_trap_hook(Some(Box::new(move |addr| {
        hook_table
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, c)| c[hook_phase.get() as usize])
            .filter(|&d| d != 0)
    })));

    let t0 = Instant::now();
    // iced-x86's tables (settle decodes) are built first, waited for asleep: they are built
    // under a spinning lock, and a thread of ours spinning on it while another one builds them
    // can keep that one from a CPU — the tracer runs SCHED_FIFO (`process/realtime.rs`;
    // review R4; a library caller's warm-up thread may still be at it).
    crate::apply::modules::warm_instruction_tables();
    // The sync agent first: the system calls before the first int3 — the read of the
    // program's SIGTRAP action, our action, the membarrier registration, the look at the
    // other actions — and the uninstall's are its requests, not ptrace stops (see
    // `SyncAgent::call`). Without it, they and the syncs go through ptrace.
    let mut held = Vec::new();
    let (current, mut agent) = match early.take() {
        Some(e) => {
            trace(
                &format!("agent kept {:?}", e.agent.as_ref().map(|a| a.tid())),
                t0,
            );
            let mut agent = e.agent;
            let current = match e.current {
                Some(c) => Ok(c),
                None => current_action(t, &mut agent, &area),
            };
            (current, agent)
        }
        None => {
            let mut agent = SyncAgent::start(t, area.code, &mut held, true);
            trace(
                &format!("sync agent {:?}", agent.as_ref().map(|a| a.tid())),
                t0,
            );
            let current = current_action(t, &mut agent, &area);
            (current, agent)
        }
    };
    // The signals whose actions `unmasked_handler` looks at: only when there are sites with
    // bytes to settle.
    let caught = if inner_ranges(sites).is_empty() {
        0
    } else {
        threads.borrow_mut().process_signal_mask(&["SigCgt"]) & !observe::bit(libc::SIGTRAP)
    };
    let mut made = CallsMade::default();
    // The last look at the threads' signal masks before the first int3 is taken while the
    // agent makes those calls (see `wait_sigtrap_unblocked`), or after them without an agent.
    let skip = skipped(t, &agent, &agents.orphans);
    let mut unblocked = None;
    let installed = current.and_then(|current| {
        made = calls_before_int3(t, &mut agent, &area, current, caught, &mut || {
            let look = wait_sigtrap_unblocked(&mut threads.borrow_mut(), &skip, &agents);
            unblocked = Some((look, Instant::now()));
        })?;
        install(t, &mut agent, &area, current, made.installed)
    });
    trace(
        &format!("installed (borrowed thread {:?})", t.threads()),
        t0,
    );
    // Not installed: nothing was written, and nothing may be (an int3 would reach the
    // process's own action).
    let was_installed = installed.is_ok();
    // Before the first int3: the membarrier registration (slow the first time in a process)
    // and the last look at the threads' signal masks. A failure there has nothing to undo.
    let mut unmasked = false;
    let ready = installed
        .and_then(|()| register_sync_cores(t, &mut agent, made.registered))
        .and_then(|()| {
            unmasked =
                caught != 0 && unmasked_handler(t, &mut agent, &area, caught, &made.actions)?;
            trace("ready", t0);
            // Taken again when the agent's calls took long (a process's first membarrier
            // registration can take ~0.1 s): the look is to be close to the first int3.
            match unblocked.take() {
                Some((look, at)) if at.elapsed() < FRESH_MASK_LOOK => look,
                _ => wait_sigtrap_unblocked(&mut threads.borrow_mut(), &skip, &agents),
            }
        });
    let wrote = ready.is_ok();
    trace("masks looked at again", t0);
    // Processes forked from now on may copy the code mid-switch (see finish_children): counted
    // right before the first int3, after the agent's own clone, which would otherwise make
    // every switch look at the target's children.
    let forks_before = tasks_created_so_far();
    let began = boot_ticks_now();
    // The sites whose window began writing (a window that found bytes changed by someone else
    // writes nothing: its sites, and those of windows after it, are not rolled back).
    let mut started = Started::default();
    // From the first int3 to the last sync the tracer runs at the default policy (see
    // `realtime::Ordinary`): the threads trap meanwhile, and a real-time tracer's wake-ups
    // preempted them in the middle of their traps — the longest call overlapping the apply,
    // A/B at load 4-6.5, 8 rounds: median 69 µs (29-194) real-time, 30 µs (22-55) without,
    // for an apply as short (4.41 / 4.48 ms median; 6.23 ms on main).
    let windows = crate::process::realtime::Ordinary::during();
    let mut result = ready.and_then(|()| {
        let rules = SettleRules {
            timeout,
            unmasked_handler: unmasked,
            threads: &threads,
            orphans: &agents.orphans,
        };
        switch_sites(
            t,
            sites,
            &area,
            &phase,
            &mut agent,
            rules,
            flag,
            commit,
            &mut started,
        )
    });
    // A process that died meanwhile (of a trap that was not ours, say) makes whatever call
    // came next fail with its own error (ESRCH from ptrace, a short read): it exited.
    if result.is_err() && crate::process::is_gone_or_zombie(t.pid()) {
        result = Err(crate::process::ProcessError::Exited(t.pid()).into());
    }
    let mut kept = false;
    // An agent that may still write a byte of the switch (see `Burst::flush`): nothing more is
    // written, the handler stays, as after a killed tool; the next livepatch finishes it.
    let stuck = agent.as_ref().is_some_and(SyncAgent::is_stuck);
    if stuck {
        kept = true;
    } else if !matches!(
        result,
        Err(Error::Process(crate::process::ProcessError::Exited(_)))
    ) {
        let mut settled_bytes = true;
        if result.is_err() && was_installed && wrote {
            // An apply's commit store may have been made (a failure after it): the dispatches
            // run the old code again before their sites are put back.
            if let Some(f) = flag.filter(|f| f.set) {
                let _ = t.mem().write(f.addr, &[0]);
            }
            // Put every site written back with the same protocol: trapping threads run what
            // the restored bytes run.
            // A caller's branch is in `started` twice when an apply pointed it on from the
            // dispatch to the new code: its bytes before the switch are the first one's.
            let mut seen = std::collections::BTreeSet::new();
            let mut sites = std::mem::take(&mut started.sites);
            sites.retain(|s| seen.insert(s.plan.addr()));
            if let Some(f) = flag.filter(|f| !f.set) {
                sites.retain(|s| !left_at_dispatch(t.mem(), s, f, &started.done));
            }
            let rolled = rollback(t, &sites, &area, &phase, &mut agent);
            match rolled {
                Err(e) => {
                    result = Err(e);
                    settled_bytes = false;
                }
                // A revert cleared the flag first: every site leads to the dispatch again,
                // which runs the new code again.
                Ok(()) => {
                    if let Some(f) = flag.filter(|f| !f.set) {
                        if let Err(e) = t.mem().write(f.addr, &[1]) {
                            result = Err(e.into());
                        }
                    }
                }
            }
        }
        // The uninstall's wait for the threads to be past our int3s ([`uninstall`], 1.) begins
        // here, right after the last sync: what it looks for counts from then on. Its first look
        // finds most threads blocked; the others run on while the children are finished, and
        // are looked at again by `uninstall`.
        drop(windows);
        let early = (was_installed && settled_bytes).then(|| {
            let mut threads = threads.borrow_mut();
            let mut watch = MovedOn::start(
                &mut threads,
                &skipped(t, &agent, &agents.orphans),
                &[],
                None,
            );
            watch.look(t.mem(), &mut threads);
            watch
        });
        if was_installed && settled_bytes {
            let mut all = sites.to_vec();
            all.extend(flag.iter().flat_map(|f| f.then.iter().cloned()));
            let forks = (forks_before, began);
            finish_children(t.pid(), forks, &area, &all, flag, result.is_ok());
        }
        trace("switched", t0);
        // A rollback that failed may have left int3s of ours in the code: the handler stays
        // the action (it passes every trap that is not ours on), or a thread reaching one would
        // meet the program's own action — SIG_DFL kills the process (review 9, noticed).
        let uninstalled = if settled_bytes {
            uninstall(
                t,
                &mut agent,
                &area,
                timeout.max(MIN_UNINSTALL_WAIT),
                &mut threads.borrow_mut(),
                early,
                &agents.orphans,
            )
        } else {
            Ok(false)
        };
        trace("uninstalled", t0);
        // Nothing is left for it: the agent exits. Its exit is waited for when the tracee lets
        // the borrowed thread go (see `Tracee::keep_until_unlock`).
        if let Some(mut a) = agent.take() {
            a.quit();
            t.keep_until_unlock(Box::new(a));
        }
        match uninstalled {
            Ok(restored) => kept = !restored,
            // The switch is done and recorded: failing now would make the caller free patch
            // memory the new jumps lead to. Our handler stays installed (it passes every trap
            // that is not ours on), as when the wait runs out. A process gone is an error.
            Err(e @ Error::Process(crate::process::ProcessError::Exited(_))) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(_) => kept = true,
        }
    }
    t.set_trap_hook(None);
    trace(
        &format!("run done, tool cpu {} us", thread_cpu_us() - cpu_at),
        began_at,
    );
    // Signals the borrowed thread was about to take while it started the agent: held with the
    // others the tracee holds for it (not sent earlier: a SIGTRAP pending there would hold the
    // uninstall up), sent again with them, in the order they were taken, when the thread is let
    // go (see `HeldSignal`).
    for (tid, signal) in held {
        t.hold(tid, signal);
    }
    result?;
    let hits = area.read_u64(t.mem(), th::HITS)?.wrapping_sub(hits0) as usize;
    Ok(SwitchStats {
        stall_us: 0,
        attempts: 1,
        traps: hits + t.traps_handled,
        trap_handler_kept: kept,
    })
}

/// The last process or thread id handed out in our pid namespace (/proc/loadavg's last
/// field): when it has not moved, nothing was created — the target forked nothing (a fork in
/// a namespace below ours takes an id in ours too). A third of the cost of /proc/stat's
/// "processes" count (which also counts every clone), whose text grows with the machine's
/// CPUs and interrupts.
fn tasks_created_so_far() -> Option<u64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .nth(4)?
        .parse()
        .ok()
}

/// The processes descending from `pid` (children, their children...) that started at clock
/// tick `since` (after boot) or later, from one scan of /proc (reliable under concurrent
/// forks and exits, unlike /proc/PID/task/TID/children, which can skip entries then). A
/// grandchild forked mid-switch by a child forked mid-switch has the same half-written code
/// (session 4's review: it was missed); a process started before the switch has code of its
/// own, which this switch never touched — it may even be in a switch of its own, which must
/// not be "finished" from here (review session 5, #10).
///
/// A process forked mid-switch whose parent (itself forked mid-switch) has exited is no longer
/// linked to `pid` (reparented to init or a subreaper, review 11 L6), but still maps `pid`'s
/// area (a shared memfd page: its copy is the same page), which names its owner: so a process
/// started since that is not linked is taken when its memory at `owner_at` holds `owner` (one
/// read each, for the few processes started during the switch).
fn descendants_since(pid: i32, since: u64, owner_at: u64, owner: Option<[u8; 16]>) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let links: Vec<(i32, i32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| {
            let (parent, start) = parent_and_start(p)?;
            (start >= since).then_some((p, parent))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(links.iter().filter(|l| l.1 == parent).map(|l| l.0));
        i += 1;
    }
    found.remove(0);
    if let Some(owner) = owner {
        let unlinked: Vec<i32> = links
            .iter()
            .map(|l| l.0)
            .filter(|p| *p != pid && !found.contains(p))
            .collect();
        found.extend(unlinked.into_iter().filter(|&p| {
            Memory::open(p).is_ok_and(|mem| mem.read_vec(owner_at, 16).is_ok_and(|o| o == owner))
        }));
    }
    found
}

/// Process `pid`'s parent and its start time (clock ticks after boot), from /proc/PID/stat.
fn parent_and_start(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let parent = fields.nth(1)?.parse().ok()?;
    let start = fields.nth(17)?.parse().ok()?;
    Some((parent, start))
}

/// Now, in the clock ticks after boot that /proc/PID/stat's start times count (rounded down:
/// a process started in this tick counts as started from now on).
fn boot_ticks_now() -> u64 {
    // SAFETY: clock_gettime fills the timespec it is given; sysconf takes a constant.
    let (ts, hz) = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
        (ts, libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64)
    };
    ts.tv_sec as u64 * hz + ts.tv_nsec as u64 * hz / 1_000_000_000
}

/// A process forked while the switch ran (review N6) got a copy of the code as it was at
/// that instant: an `int3` on a site, maybe a half-written jump behind it. Our handler
/// (inherited, with the shared table) covers it only while the table holds that site; the
/// next switches drop it and their destinations lead into the parent's patch memory, which
/// the child's copy does not follow. So each such child gets the switch's final bytes too
/// (`committed`: the new jumps, else the original bytes), through its own /proc/PID/mem:
/// only sites still in one of the protocol's intermediate states (int3, then the old or the
/// new tail) are touched — a child that exec'd since, or wrote its own code, is left alone.
/// The tail goes first, then the first byte; the child is not traced, so there is no sync
/// in it, and a thread of it that meets a stale int3 is still sent on by the handler.
///
/// Children are found only when the machine forked at all during the switch (`forks_before`);
/// every descendant started since the switch began is then looked at: one forked after the
/// last first byte has whole bytes and is not touched.
///
/// A committed apply with a flag (apply/dispatch.rs) sets the child's flag too, once every
/// site of the child holds the new bytes (one forked between the windows keeps the old
/// code everywhere, as its copy of the state says).
fn finish_children(
    pid: i32,
    (forks_before, began): (Option<u64>, u64),
    area: &Area,
    sites: &[SiteSwitch],
    flag: Option<&Flag>,
    committed: bool,
) {
    if forks_before.is_some() && tasks_created_so_far() == forks_before {
        return;
    }
    // The /proc scan reads every process's stat (milliseconds of CPU on a busy machine): only
    // for a target that has children at all. Its threads' children lists are cheap, and
    // unreliable only in skipping entries while children come and go — not all of them.
    let has_children = observe::tasks(pid).into_iter().any(|tid| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"))
            .is_ok_and(|s| !s.trim().is_empty())
    });
    if !has_children {
        return;
    }
    let owner_at = area.data() + th::OWNER;
    for child in descendants_since(pid, began, owner_at, owner_of(pid)) {
        let Ok(mem) = Memory::open(child) else {
            continue; // gone
        };
        let mut fixed = 0;
        for s in sites {
            let (old, new) = (s.plan.expected(), s.plan.result());
            let want = if committed { new } else { old };
            let Ok(cur) = mem.read_vec(s.plan.addr(), want.len()) else {
                break; // exec'd or gone
            };
            let midway = cur[0] == lp_core::site::INT3
                && (1..cur.len()).all(|i| cur[i] == old[i] || cur[i] == new[i]);
            if cur == want || !midway {
                continue;
            }
            if mem.write(s.plan.addr() + 1, &want[1..]).is_err()
                || mem.write(s.plan.addr(), &want[..1]).is_err()
            {
                break;
            }
            fixed += 1;
        }
        if let Some(f) = flag.filter(|f| f.set && committed) {
            // A caller's branch has two plans (to the dispatch, then on to the new code):
            // either result is new.
            let all_new = sites.iter().all(|s| {
                mem.read_vec(s.plan.addr(), s.plan.len()).is_ok_and(|cur| {
                    sites
                        .iter()
                        .filter(|o| o.plan.addr() == s.plan.addr())
                        .any(|o| cur == o.plan.result())
                })
            });
            if all_new && mem.write(f.addr, &[1]).is_ok() {
                fixed += 1;
            }
        }
        if fixed > 0 {
            trace(
                &format!("child {child} forked mid-switch: {fixed} sites finished"),
                Instant::now(),
            );
        }
    }
}

/// A thread with SIGTRAP blocked that reaches an `int3` is killed by the kernel (a trap's
/// signal cannot wait: force_sig resets the action to SIG_DFL). A process with a thread that
/// keeps SIGTRAP blocked (a worker or a signal-waiting thread blocking every signal) is
/// refused. A thread seen blocking it for a moment only is not: inside its own SIGTRAP
/// handler, or just created (glibc starts a thread with every signal blocked, until it has
/// run a little). A suspect is refused once it has kept SIGTRAP blocked while consuming
/// [`PROGRESS_NS`] of CPU, or at `timeout`.
///
/// The masks are read from each thread's `stat` (its `blocked` field: the same word as
/// `SigBlk` in `status`, for signals 1-31), through descriptors kept for the later looks.
///
/// The thread borrowed for our system calls (`borrowed`) is stopped until the end of the
/// switch: seen with SIGTRAP blocked (taken inside pthread_create, which blocks every signal
/// around clone(), say), it cannot unblock it or run meanwhile, so waiting for it would only
/// end at `timeout` with the refusal. It is reported at once: as busy when other threads do
/// not block SIGTRAP (the next try borrows a thread at another moment), refused when every
/// thread does (the borrow takes such a thread only then).
fn refuse_if_sigtrap_blocked(
    threads: &mut Threads,
    pid: i32,
    borrowed: &[i32],
    timeout: Duration,
    agents: &Agents,
) -> Result<(), Error> {
    let blocked = |t: &Thread| t.blocks(libc::SIGTRAP) && !agents.runs(t);
    // Our agents (an apply's, started before its preparation, and orphans) are no threads of
    // the program: not counted as ones that do not block SIGTRAP either.
    let tids = threads.current(&agents.orphans);
    let mut suspects: BTreeMap<i32, (u64, Option<u64>)> = BTreeMap::new();
    let mut borrowed_blocks = None;
    let mut some_thread_does_not = false;
    for &tid in &tids {
        let Some(t) = threads.get(tid).filter(|t| blocked(t)) else {
            some_thread_does_not |= threads.get(tid).is_some();
            continue;
        };
        if borrowed.contains(&tid) {
            borrowed_blocks = Some(tid);
        } else if let Some(ns) = t.files.runtime_ns() {
            suspects.insert(tid, (ns, None));
        }
    }
    if let Some(tid) = borrowed_blocks {
        // The borrow takes such a thread only when every thread blocks SIGTRAP (review 9,
        // F2): then the process may well keep it blocked for good (a program that blocks
        // every signal), and nonstop mode cannot switch it — or it was for a moment (a
        // single thread inside pthread_create). Both ways out are said. A borrowed thread
        // forced by the test knob, beside threads that do not block it: try again.
        if some_thread_does_not {
            return Err(Error::Busy {
                tid: tid as u32,
                function: "a moment with SIGTRAP blocked (when it was stopped for our system calls; try again)".into(),
                waited_ms: 0,
            });
        }
        return Err(Error::Unsupported(format!(
            "thread {tid} of process {pid} blocks SIGTRAP, as every thread of it does now: a trap would kill it; try again, or use --mode stop"
        )));
    }
    let deadline = crate::deadline::after(timeout);
    loop {
        let mut refuse = None;
        suspects.retain(|&tid, (at_start, base)| {
            let Some(t) = threads.get(tid).filter(|t| blocked(t)) else {
                return false;
            };
            let Some(now) = t.files.runtime_ns() else {
                return false; // gone
            };
            match base {
                None if now != *at_start => *base = Some(now),
                Some(b) if now.saturating_sub(*b) >= PROGRESS_NS => {
                    refuse.get_or_insert(tid);
                }
                _ => {}
            }
            true
        });
        if Instant::now() > deadline {
            refuse = refuse.or(suspects.keys().next().copied());
        }
        if let Some(tid) = refuse {
            return Err(Error::Unsupported(format!(
                "thread {tid} of process {pid} keeps SIGTRAP blocked: a trap would kill it; use --mode stop"
            )));
        }
        if suspects.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// How old the last look at the threads' SIGTRAP masks, taken while the agent made the calls
/// before the first int3, may be when that int3 comes (see `wait_sigtrap_unblocked`).
const FRESH_MASK_LOOK: Duration = Duration::from_millis(1);

const SIGTRAP_BLOCKED_NOW: &str = "a moment with SIGTRAP blocked (at the first int3)";

/// How long a thread seen with SIGTRAP blocked right before the first int3 gets to unblock it
/// (glibc blocks every signal around clone() in pthread_create and posix_spawn: microseconds;
/// a thread inside our own handler, after a killed switch left int3s, blocks it until the
/// handler returns — which on a loaded machine can wait milliseconds for a CPU: 5 ms was too
/// short once under load in e2e_killed_program and once in e2e_nonstop). A thread that keeps
/// it blocked was refused before ([`refuse_if_sigtrap_blocked`]), so the wait costs only here.
const UNBLOCK_WAIT: Duration = Duration::from_millis(100);

/// A thread that reaches one of our int3s while it blocks SIGTRAP dies with the whole
/// process (the kernel resets the action to SIG_DFL: a trap's signal cannot wait). Threads
/// that keep it blocked were refused before anything was done
/// ([`refuse_if_sigtrap_blocked`]); a thread that blocks it for a moment (review N5) cannot be
/// excluded from outside, but one doing so right when the int3s go in is waited for, briefly
/// — milliseconds have passed since that first check (the handler's area, its table, the
/// remote rt_sigaction calls). The window left is a thread that starts blocking SIGTRAP
/// during the int3 window itself and reaches a site before it unblocks it (a limit). The
/// borrowed thread (`skip`) stays stopped through the window. With the sync agent, the look
/// is taken while the agent installs our action ([`calls_before_int3`]'s `meanwhile`), where
/// the tool would only wait: the first int3 usually follows within ~0.1 ms, and the look is
/// taken again when it is older than [`FRESH_MASK_LOOK`] by then (a process's first
/// membarrier registration, in the same program, can take ~0.1 s: review 13).
///
/// The threads are listed again (one may have come since the first look); their kept files
/// are read, those of a new thread opened.
fn wait_sigtrap_unblocked(
    threads: &mut Threads,
    skip: &[i32],
    agents: &Agents,
) -> Result<(), Error> {
    let mut tids = threads.current(skip);
    let deadline = Instant::now() + UNBLOCK_WAIT;
    loop {
        tids.retain(|&tid| {
            threads
                .get(tid)
                .is_some_and(|t| t.blocks(libc::SIGTRAP) && !agents.runs(t))
        });
        let Some(&tid) = tids.first() else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(Error::Busy {
                tid: tid as u32,
                function: SIGTRAP_BLOCKED_NOW.into(),
                waited_ms: UNBLOCK_WAIT.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// lp-core's trap decision for every site in every phase: `columns[site][phase]`, 0 when
/// lp-core says the trap is not ours.
fn decisions(sites: &[SiteSwitch]) -> Result<Vec<[u64; th::NPHASES]>, Error> {
    let table_err = |e: lp_core::table::TableError| Error::Other(format!("redirect table: {e}"));
    // The state of the entry being switched in each phase: apply — pending until the
    // commit, active after, pending again when rolled back; revert — reverting throughout
    // (threads run the version kept), active again when rolled back. One table per phase:
    // lp-core's entries only move forward (pending → active → reverting).
    let state = |s: &SiteSwitch, phase: u8| match (s.reverting, phase) {
        (false, COMMITTED) => Some(EntryState::Active),
        (false, _) => None,
        (true, ROLLBACK) => Some(EntryState::Active),
        (true, _) => Some(EntryState::Reverting),
    };
    let mut columns = vec![[0u64; th::NPHASES]; sites.len()];
    for phase in [BEFORE, COMMITTED, ROLLBACK] {
        let cap = sites.len().max(1);
        let mut a = vec![Slot::EMPTY; cap];
        let mut b = vec![Slot::EMPTY; cap];
        let table = RedirectTable::new(&mut a, &mut b);
        for (i, s) in sites.iter().enumerate() {
            let addr = s.plan.addr();
            if let Some(below) = s.below {
                table
                    .push(addr, s.resume, below, below_id(i))
                    .map_err(table_err)?;
                table
                    .set_state(addr, below_id(i), EntryState::Active)
                    .map_err(table_err)?;
            }
            table
                .push(addr, s.resume, s.top, top_id(i))
                .map_err(table_err)?;
            if let Some(st) = state(s, phase) {
                table.set_state(addr, top_id(i), st).map_err(table_err)?;
            }
        }
        for (i, s) in sites.iter().enumerate() {
            columns[i][phase as usize] = match trap::decide(&table, s.plan.addr()) {
                TrapDecision::Redirect(x) | TrapDecision::Resume(x) => x,
                TrapDecision::NotOurs => 0,
            };
        }
    }
    Ok(columns)
}

/// The destinations the in-target handler gets: lp-core's decisions, except for a direct
/// call of a function switched at the same time. Its decision (the call site's trampoline,
/// which makes the original call) leads to the callee's `int3`, a second trap; the handler
/// makes the call itself instead — pushes the return address and goes where the callee's
/// trap would go in the same phase ([`th::CALL`]). A direct `jmp` (a tail call) goes there
/// with nothing pushed. The tool's own trap hook (the borrowed thread) keeps lp-core's
/// decisions: it cannot push.
fn published(
    sites: &[SiteSwitch],
    columns: &[[u64; th::NPHASES]],
    shortcut: bool,
) -> Vec<[u64; th::NPHASES]> {
    let entry = |addr: u64| {
        sites
            .iter()
            .position(|s| s.plan.addr() == addr && !is_call_site(s))
            .map(|i| columns[i])
            .filter(|c| c.iter().all(|&d| d != 0))
    };
    sites
        .iter()
        .zip(columns)
        .map(|(s, c)| {
            if !shortcut || !is_call_site(s) {
                return *c;
            }
            // The original branch: the bytes before an apply, the bytes after a revert.
            let original = if s.reverting {
                s.plan.result()
            } else {
                s.plan.expected()
            };
            let Some((kind, target)) = direct_branch(s.plan.addr(), original) else {
                return *c;
            };
            match entry(target) {
                Some(callee) => callee.map(|d| if kind == 0xe8 { d | th::CALL } else { d }),
                None => *c,
            }
        })
        .collect()
}

/// A call site's switch ([`SiteSwitch::call_site`]): its trampoline is both the version and
/// the resume point; a function entry's version is never its own trampoline.
fn is_call_site(s: &SiteSwitch) -> bool {
    s.top == s.resume && s.below.is_none()
}

/// A `call rel32` (0xe8) or `jmp rel32` (0xe9) at `addr`: (opcode, target).
fn direct_branch(addr: u64, bytes: &[u8]) -> Option<(u8, u64)> {
    match bytes {
        [op @ (0xe8 | 0xe9), d0, d1, d2, d3] => {
            let rel = i32::from_le_bytes([*d0, *d1, *d2, *d3]);
            Some((*op, addr.wrapping_add(5).wrapping_add(rel as i64 as u64)))
        }
        _ => None,
    }
}

fn below_id(i: usize) -> u32 {
    2 * i as u32 + 1
}

fn top_id(i: usize) -> u32 {
    2 * i as u32 + 2
}

/// The code pages of process `pid`'s own areas of this layout, each with whether it is this
/// build's (its name has our code's hash) or another build's. A process forked from one with
/// an area maps that area too (a shared mapping, review S10): it belongs to the parent — whose
/// switches rewrite its tables, phase and agent words at any time — and is never used (nor
/// listed here); the child gets an area of its own.
///
/// The maps are `maps_text`'s: while a tracee of ours holds the process's lock, the text read
/// once after the lock was taken (by the state's look, usually) and kept until a mapping of
/// livepatch's own is made or removed. An area is such a mapping: only a livepatch makes one
/// (`open_area`: a memfd mapping, which forgets the text, and its code page's protection,
/// which does too), and none removes it. So a switch finds the area in the text kept since
/// the state read instead of reading the maps again (~70 µs of an apply at load 4-5 here,
/// more on a busier machine). Without a tracee (`quiet_orphaned_agent` before the attach) the
/// maps are read afresh.
fn layout_areas(pid: i32, mem: &Memory) -> Result<Vec<(u64, bool)>, Error> {
    let maps = crate::process::maps_text::ours(pid)
        .map_err(|_| crate::process::ProcessError::Exited(pid))?;
    let me = owner_of(pid);
    Ok(areas_in(&maps)
        .filter(|&(code, _)| {
            let owner = mem.read_vec(code + th::PAGE + th::OWNER, 16).ok();
            me.is_some() && owner.as_deref() == me.as_ref().map(|m| &m[..])
        })
        .collect())
}

/// The code pages of the areas of this layout in maps text `maps` (whoever owns them), each
/// with whether it is this build's: [`layout_areas`] before its owner check.
fn areas_in(maps: &str) -> impl Iterator<Item = (u64, bool)> + '_ {
    maps.lines()
        .filter_map(|l| Some((l, area_name::memfd_of(l)?)))
        .filter(|(_, name)| area_name::is_layout(name))
        .filter(|(l, _)| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("r-x"))
        })
        .filter_map(|(l, name)| {
            let code = u64::from_str_radix(l.split('-').next()?, 16).ok()?;
            Some((code, name == area_name::own()))
        })
}

/// Makes a sync agent that a killed livepatch left in process `pid` harmless before anything
/// is written (see `sync_agent::quiet_orphan`), in either mode. `maps`: the process's mappings
/// when the caller has read them already (no area among them: nothing to do, nothing read).
///
/// An agent lives in an area only while its tid word is set (clone sets it, the kernel clears
/// it at the agent's exit: `sync_agent::living_agent`, one 4-byte read). When no area holds
/// one — every apply and revert but the first after a killed livepatch — there is nothing to
/// quiet, and nothing more is read: not the maps again (an apply's areas are those among the
/// mappings `locate` read: areas are never removed, and one made since then is another
/// livepatch's, made after this look as it could be after the attach), not the owner's stat,
/// not the page mapped through map_files. Otherwise every check is made as before on maps
/// read afresh: the area's owner (a forked child sees its parent's area and agent), the tool
/// still tracing, the agent's program.
///
/// Returns whether an agent was left alone because its tool lives: that tool holds the process
/// and the caller's attach waits for it — but should it be killed before, its agent is an
/// orphan by the time the caller holds the process, with a program that would be carried out
/// after the caller's recovery (review 11, L3). The caller looks again once attached then.
/// (In stop mode the attach seizes the agent too: a claim that must be resolved by hand finds
/// it traced already, and the look refuses, writing nothing, as for any agent out of reach.)
pub(crate) fn quiet_orphaned_agent(
    pid: i32,
    maps: Option<&[crate::maps::Mapping]>,
) -> Result<bool, Error> {
    let area_mapped = |m: &crate::maps::Mapping| {
        m.exec
            && m.path
                .as_deref()
                .and_then(|p| p.strip_prefix("/memfd:"))
                .is_some_and(|n| area_name::is_layout(n.trim_end_matches(" (deleted)")))
    };
    if maps.is_some_and(|maps| !maps.iter().any(area_mapped)) {
        return Ok(false);
    }
    let mem = Memory::open(pid)?;
    let text = match maps {
        Some(_) => None,
        None => Some(
            crate::process::maps_text::ours(pid)
                .map_err(|_| crate::process::ProcessError::Exited(pid))?,
        ),
    };
    let mut codes: Vec<u64> = match (maps, &text) {
        (Some(maps), _) => maps
            .iter()
            .filter(|m| area_mapped(m))
            .map(|m| m.start)
            .collect(),
        (None, Some(text)) => areas_in(text).map(|(code, _)| code).collect(),
        (None, None) => Vec::new(),
    };
    codes.retain(|&code| sync_agent::living_agent(&mem, code).is_some());
    if codes.is_empty() {
        return Ok(false);
    }
    // Every area of this layout: one another build of livepatch made may hold an agent its
    // killed tool left too (the words are the same; its code may not be).
    let mut left_to_its_tool = false;
    for (code, own) in layout_areas(pid, &mem)? {
        left_to_its_tool |= sync_agent::quiet_orphan(pid, &mem, code, own).map_err(|e| {
            Error::Unfinished(format!(
                "process {pid}: the sync agent (thread {}) of a killed livepatch{} may still carry out a write of its program (it is stopped, or out of our reach): nothing written; continue the process and try again",
                e.tid,
                if own { "" } else { " of another version" }
            ))
        })?;
    }
    Ok(left_to_its_tool)
}

/// Process `pid`'s identity as an area records it: its pid and its start time (clock ticks
/// after boot, /proc/PID/stat field 22), so that a reused pid is not taken for it.
fn owner_of(pid: i32) -> Option<[u8; 16]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start: u64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(pid as u64).to_le_bytes());
    b[8..].copy_from_slice(&start.to_le_bytes());
    Some(b)
}

/// A switch's first look at the threads: the agents told apart (see [`Agents`]), every
/// thread's /proc files opened (read again by the later looks, see `threads.rs`; those the
/// borrow's look opened are not opened again), and the refusal of a thread whose seccomp
/// filters would not let our handler's calls through (an apply's check, left to this look:
/// [`Tracee::check_handler_threads_left`]) or that keeps SIGTRAP blocked
/// ([`refuse_if_sigtrap_blocked`]), which the switch returns before it changes anything. An
/// apply takes it while its agent maps the patch memory ([`Early::map_patch`]): 0.2-0.5 ms of
/// reads here, in time the tool would only wait.
struct FirstLook {
    agents: Agents,
    threads: Threads,
    checked: Result<(), Error>,
}

impl FirstLook {
    /// `areas`: the process's areas (see [`layout_areas`]); `code`: this build's area, if
    /// there is one; `agent`: our agent's tid, if it runs already (an apply's early one).
    fn take(
        t: &mut Tracee,
        areas: &[(u64, bool)],
        code: Option<u64>,
        agent: Option<i32>,
        timeout: Duration,
    ) -> FirstLook {
        let mut agents = Agents {
            code,
            orphans: areas
                .iter()
                .filter_map(|&(code, _)| sync_agent::living_agent(t.mem(), code))
                .collect(),
        };
        if let Some(tid) = agent.filter(|tid| !agents.orphans.contains(tid)) {
            agents.orphans.push(tid);
        }
        // First: its reads hand the `stat` files opened ahead on to the looked files.
        let seccomp = t.check_handler_threads_left().map_err(Error::from);
        let mut threads = Threads::with_files(t.pid(), t.take_looked_files());
        let checked = seccomp.and_then(|()| {
            refuse_if_sigtrap_blocked(&mut threads, t.pid(), &t.threads(), timeout, &agents)
        });
        FirstLook {
            agents,
            threads,
            checked,
        }
    }
}

/// Tells our sync agents (this switch's, or ones orphaned by killed livepatches) from the
/// program's threads: they block every signal, SIGTRAP included.
#[derive(Debug)]
struct Agents {
    /// The code page of this build's area, if there is one: a thread blocked in its agent's
    /// code (where an agent always waits) is ours.
    code: Option<u64>,
    /// The agents living in the process's areas (this build's and others') when the switch
    /// began, by the tid word of their pages: ours in any state. An orphan the program starves
    /// of a CPU (a real-time thread on its CPU) is runnable, its pc unknown to /proc: it was
    /// taken for a program thread that keeps SIGTRAP blocked, and the recovery refused ("use
    /// --mode stop") at `--timeout` (session 8, killedprog; the pc test alone). (A tid is not
    /// reused within a switch: the kernel hands them out in turn.)
    orphans: Vec<i32>,
}

impl Agents {
    /// Whether thread `t` is one of our agents.
    fn runs(&self, t: &Thread) -> bool {
        if self.orphans.contains(&t.files.tid()) {
            return true;
        }
        let Some(code) = self.code else {
            return false;
        };
        matches!(t.files.activity(), Some(Activity::Blocked { pc, .. })
            if (code + th::AGENT_CODE..code + th::PAGE).contains(&pc))
    }
}

/// Finds the handler's area (mapped by an earlier nonstop switch) or creates it: a memfd
/// mapping, code page r-x, data pages rw-. `found`: this build's area, if [`layout_areas`]
/// found one.
fn open_area(t: &mut Tracee, found: Option<u64>) -> Result<Area, Error> {
    if let Some(code) = found {
        let area = Area { code, bank: 0 };
        let page = generate(&area)?;
        // The code never changes for a given address: check that it is ours, intact.
        if t.mem().read_vec(code, page.len())? != page {
            return Err(Error::Mismatch(format!(
                "the livepatch trap handler of process {} at {code:#x} was changed by someone else",
                t.pid()
            )));
        }
        return Ok(area);
    }
    let code = t.map_memfd(area_name::own(), th::AREA_LEN)?;
    let area = Area { code, bank: 0 };
    let page = generate(&area)?;
    // Written while the page is still writable: /proc/PID/mem cannot force a write into a
    // shared mapping that is not.
    t.mem().write(code, &page)?;
    let data = area.data();
    t.mem()
        .write(data + th::TRAP_SET, &(1u64 << (SIGTRAP - 1)).to_le_bytes())?;
    let owner = owner_of(t.pid()).ok_or(crate::process::ProcessError::Exited(t.pid()))?;
    t.mem().write(data + th::OWNER, &owner)?;
    t.mprotect(code, th::PAGE, prot::READ | prot::EXEC)?;
    // The code page is found by its protection (`layout_areas`): a text read since the memfd
    // was mapped shows it writable still.
    crate::process::maps_text::changed(t.pid());
    Ok(area)
}

/// The code page's bytes (up to the end of its last piece): the handler, the restorer and the
/// sync agent, each at its offset.
///
/// They depend on the code page's address alone, and assembling them takes 100-600 µs of CPU
/// here (more on a busy machine): the last page made is kept for the next switch of this
/// process of ours at the same address (a library caller's next apply or revert; the area stays
/// where it is for the life of the target). The same build of the tool makes the same bytes, so
/// the check of an area found in place is unchanged.
fn generate(area: &Area) -> Result<Vec<u8>, Error> {
    static LAST: std::sync::Mutex<Option<(u64, Vec<u8>)>> = std::sync::Mutex::new(None);
    if let Some((code, page)) = LAST.lock().ok().as_deref().and_then(Option::as_ref) {
        if *code == area.code {
            return Ok(page.clone());
        }
    }
    let page = assemble(area)?;
    if let Ok(mut last) = LAST.lock() {
        *last = Some((area.code, page.clone()));
    }
    Ok(page)
}

fn assemble(area: &Area) -> Result<Vec<u8>, Error> {
    let err = |e: iced_x86::IcedError| Error::Other(format!("trap handler: {e}"));
    let (handler, restorer) = th::generate(area.code).map_err(err)?;
    let agent = sync_agent::generate(area.code).map_err(err)?;
    let mut page = vec![0u8; th::AGENT_CODE as usize + agent.len()];
    page[..handler.len()].copy_from_slice(&handler);
    let r = th::RESTORER_OFF as usize;
    page[r..r + restorer.len()].copy_from_slice(&restorer);
    page[th::AGENT_CODE as usize..].copy_from_slice(&agent);
    Ok(page)
}

/// Publishes the sites and their destinations, phase BEFORE, in the bank the handler does not
/// use, then makes that bank the handler's (one byte). The previous bank stays as it was for
/// a thread of the previous switch that read the bank byte before the flip; the new bank
/// carries the previous switch's sites for one that reads it after (see [`table_rows`]).
fn write_table(
    mem: &Memory,
    area: &mut Area,
    sites: &[SiteSwitch],
    columns: &[[u64; th::NPHASES]],
) -> Result<(), Error> {
    let data = area.data();
    let mut byte = [0u8];
    mem.read(data + th::BANK, &mut byte)?;
    let old = u64::from(byte[0] & 1);
    let n_old = mem
        .read_u64(data + th::NSITES + 8 * old)?
        .min(th::MAX_SITES as u64);
    let old_rows = mem.read_vec(
        data + th::TABLE + old * th::BANK_LEN,
        (n_old * th::ENTRY_LEN) as usize,
    )?;
    let new: Vec<(u64, [u64; th::NPHASES])> = sites
        .iter()
        .zip(columns)
        .map(|(s, c)| (s.plan.addr(), *c))
        .collect();
    let rows = table_rows(&new, &old_rows);
    area.bank = 1 - old;
    let bank = area.bank;
    let mut table = Vec::with_capacity(rows.len() * th::ENTRY_LEN as usize);
    for (addr, c) in &rows {
        table.extend_from_slice(&addr.to_le_bytes());
        for d in c {
            table.extend_from_slice(&d.to_le_bytes());
        }
    }
    mem.write(data + th::NSITES + 8 * bank, &0u64.to_le_bytes())?;
    mem.write(data + th::TABLE + bank * th::BANK_LEN, &table)?;
    area.set_phase(mem, BEFORE)?;
    mem.write(
        data + th::NSITES + 8 * bank,
        &(rows.len() as u64).to_le_bytes(),
    )?;
    mem.write(data + th::BANK, &[bank as u8])?;
    Ok(())
}

/// The rows of a switch's table: its own sites first (the handler takes the first match),
/// then the sites of the previous switch (`old`: that bank's raw table) that are not among
/// them, each sending a thread back to the site itself in every phase. A thread that took an
/// int3 of the previous switch but reaches the handler only now re-executes the site, whose
/// bytes are whole again (or hold an int3 of this switch, which decides anew). Rows that were
/// carried already (destination = the site) are not carried again: one switch back is enough
/// for a thread between an int3 and its handler; the bank holds [`th::MAX_SITES`] rows.
fn table_rows(new: &[(u64, [u64; th::NPHASES])], old: &[u8]) -> Vec<(u64, [u64; th::NPHASES])> {
    let word = |row: &[u8], i: usize| u64::from_le_bytes(row[i * 8..i * 8 + 8].try_into().unwrap());
    let mut rows = new.to_vec();
    for row in old.chunks_exact(th::ENTRY_LEN as usize) {
        let addr = word(row, 0);
        let carried = (0..th::NPHASES).all(|p| word(row, p + 1) == addr);
        if rows.len() >= th::MAX_SITES || carried || rows.iter().any(|(a, _)| *a == addr) {
            continue;
        }
        rows.push((addr, [addr; th::NPHASES]));
    }
    rows
}

/// `rt_sigaction(signal, act, old)` in the target (addresses in the area): made by the sync
/// agent when there is one (a request and its answer), through ptrace on the borrowed thread
/// otherwise (two stops, each waiting for that ordinary thread to get a CPU back: 100–250 µs
/// each on this project's loaded 2-CPU machine). Vetted against the seccomp filters first
/// either way (the agent is the borrowed thread's clone: it has the same filters).
fn sigaction(
    t: &mut Tracee,
    agent: &mut Option<SyncAgent>,
    signal: u64,
    act: u64,
    old: u64,
) -> Result<(), Error> {
    let args = [signal, act, old, 8, 0, 0];
    if let Some(a) = agent.as_mut() {
        t.vet_ahead(libc::SYS_rt_sigaction, args)?;
        let op = Op::SigAction {
            signal: signal as u32,
            act,
            old,
        };
        match a.call(op, sync_agent::ANSWER_WAIT) {
            Ok(Some(0)) => return Ok(()),
            // The same call through ptrace tells what is wrong (in its own words).
            Ok(_) => {}
            Err(stuck) => return Err(agent_stuck(t.pid(), stuck)),
        }
    }
    t.syscall("rt_sigaction", libc::SYS_rt_sigaction, args)?;
    Ok(())
}

/// The process's membarrier registration for SYNC_CORE ([`Tracee::register_sync_cores`]),
/// made by the sync agent when there is one (see [`sigaction`]).
/// `made`: [`calls_before_int3`] made it already.
fn register_sync_cores(
    t: &mut Tracee,
    agent: &mut Option<SyncAgent>,
    made: bool,
) -> Result<(), Error> {
    if made {
        return Ok(());
    }
    if let Some(a) = agent.as_mut() {
        t.vet_ahead(libc::SYS_membarrier, [1 << 6, 0, 0, 0, 0, 0])?;
        // Slow the first time in a process (the kernel waits for every CPU to pass a
        // scheduling point: 150 ms was seen on a loaded machine).
        match a.call(Op::RegisterSyncCore, REGISTER_WAIT) {
            Ok(Some(0)) => return Ok(()),
            Ok(_) => {}
            Err(stuck) => return Err(agent_stuck(t.pid(), stuck)),
        }
    }
    Ok(t.register_sync_cores()?)
}

/// How long the agent gets for the membarrier registration.
const REGISTER_WAIT: Duration = Duration::from_secs(1);

/// What [`calls_before_int3`] made: [`install`], [`register_sync_cores`] and [`unmasked_handler`]
/// make the rest themselves, as without an agent.
#[derive(Default)]
struct CallsMade {
    installed: bool,
    registered: bool,
    /// The actions of the signals looked at, by signal.
    actions: BTreeMap<i32, KAction>,
}

/// The sync agent's calls before the first int3 as one program: our SIGTRAP action
/// ([`install`]), the membarrier registration ([`register_sync_cores`]) and the look at the
/// actions of the signals `caught` ([`unmasked_handler`]). Each call alone costs a wake-up of
/// the agent and one of the tool (50–150 µs here); one program for all saves all but one.
/// Each call is vetted against seccomp first, as alone. Nothing is made without an agent,
/// when a vet refuses or when our action cannot be staged: the functions then make their
/// calls one by one, and say what is wrong in their own words. The only error is an agent
/// stuck with a call of ours claimed (see [`agent_stuck`]). `meanwhile` runs while the agent
/// makes them (not at all when it makes nothing).
fn calls_before_int3(
    t: &mut Tracee,
    agent: &mut Option<SyncAgent>,
    area: &Area,
    current: KAction,
    caught: u64,
    meanwhile: &mut dyn FnMut(),
) -> Result<CallsMade, Error> {
    let mut made_now = CallsMade::default();
    let Some(a) = agent.as_mut() else {
        return Ok(made_now);
    };
    let data = area.data();
    let Ok(install) = stage_install(t, area, current) else {
        return Ok(made_now);
    };
    let mut ops = Vec::new();
    if install {
        ops.push(Op::SigAction {
            signal: SIGTRAP as u32,
            act: data + th::SCRATCH_ACT,
            old: data + th::SCRATCH_OLD,
        });
    }
    ops.push(Op::RegisterSyncCore);
    // Each action read into a slot of the agent's page (those that do not fit are read one by
    // one afterwards).
    let looked: Vec<(i32, usize, u64)> = (1..=64)
        .filter(|&sig| caught & observe::bit(sig) != 0)
        .enumerate()
        .map_while(|(i, sig)| Some((sig, i, a.out_slot(i)?)))
        .collect();
    for &(sig, _, old) in &looked {
        ops.push(Op::SigAction {
            signal: sig as u32,
            act: 0,
            old,
        });
    }
    for op in &ops {
        let (nr, args) = match *op {
            Op::SigAction { signal, act, old } => {
                (libc::SYS_rt_sigaction, [signal as u64, act, old, 8, 0, 0])
            }
            _ => (libc::SYS_membarrier, [1 << 6, 0, 0, 0, 0, 0]),
        };
        if t.vet_ahead(nr, args).is_err() {
            return Ok(made_now);
        }
    }
    let made = a
        .calls_meanwhile(&ops, REGISTER_WAIT, meanwhile)
        .map_err(|stuck| agent_stuck(t.pid(), stuck))?
        .map_or(0, |c| c.done);
    let first_look = usize::from(install) + 1;
    made_now.installed = install && made >= 1;
    made_now.registered = made >= first_look;
    for (k, &(sig, slot, _)) in looked.iter().enumerate() {
        if made > first_look + k {
            made_now
                .actions
                .insert(sig, KAction::from_bytes(&a.out(slot)));
        }
    }
    Ok(made_now)
}

/// The agent claimed a call of ours and stays stopped before making it: it may still make it
/// (see `SyncAgent::call`). Nothing more is written (see `run`).
fn agent_stuck(pid: i32, stuck: sync_agent::Stuck) -> Error {
    Error::Unfinished(format!(
        "process {pid}: the sync agent (thread {}) is stopped in the middle of a system call of ours: nothing written; continue the process and try again",
        stuck.tid
    ))
}

/// The process's SIGTRAP action now, read by the sync agent (through ptrace on the borrowed
/// thread without one, see [`sigaction`]). Read after the agent's start: its request is one
/// wake-up of an agent that runs SCHED_FIFO, where ptrace is two stops of an ordinary thread.
fn current_action(
    t: &mut Tracee,
    agent: &mut Option<SyncAgent>,
    area: &Area,
) -> Result<KAction, Error> {
    sigaction(t, agent, SIGTRAP, 0, area.data() + th::SCRATCH_OLD)?;
    KAction::read(t.mem(), area.data() + th::SCRATCH_OLD)
}

/// Our action for the install's `rt_sigaction` (see [`install`]), written to the area with
/// the previous one: false when SIGTRAP's action is ours already (nothing to make). Our
/// action copies what matters of the previous one (mask, SA_ONSTACK, SA_RESTART, its
/// restorer) so that a chained handler runs as it would have.
fn stage_install(t: &Tracee, area: &Area, current: KAction) -> Result<bool, Error> {
    let data = area.data();
    if current.handler == area.code {
        // Left installed by an earlier switch that could not restore it: the previous
        // action is already saved.
        return Ok(false);
    }
    if current.flags & SA_RESETHAND != 0 {
        return Err(Error::Unsupported(format!(
            "process {} handles SIGTRAP once only (SA_RESETHAND): use --mode stop",
            t.pid()
        )));
    }
    t.mem().write(data + th::OLD_ACT, &current.to_bytes())?;
    // Under SIG_IGN or SIG_DFL a SIGTRAP sent by kill never interrupted a system call (it
    // was discarded, or killed the process); through our handler (which drops or re-raises
    // it) it would end a blocking read() with EINTR unless SA_RESTART restarts it. (Calls
    // the kernel never restarts — poll, nanosleep... — still return EINTR: a limit.)
    let restart = if current.handler <= 1 {
        SA_RESTART
    } else {
        current.flags & SA_RESTART
    };
    let ours = KAction {
        handler: area.code,
        flags: SA_SIGINFO | SA_RESTORER | SA_NODEFER | (current.flags & SA_ONSTACK) | restart,
        restorer: if current.flags & SA_RESTORER != 0 && current.restorer != 0 {
            current.restorer
        } else {
            area.restorer()
        },
        // The mask a chained handler runs with. Under SIG_IGN or SIG_DFL no handler runs:
        // glibc's signal() puts the signal itself in the mask, and ours would then run with
        // SIGTRAP blocked, which a trap of ours must never meet.
        mask: if current.handler <= 1 {
            0
        } else {
            current.mask
        },
    };
    t.mem().write(data + th::SCRATCH_ACT, &ours.to_bytes())?;
    Ok(true)
}

/// Makes our handler the SIGTRAP action in place of `current` (see [`current_action`]),
/// keeping the previous one for the chain and the restore (see [`stage_install`]). `made`:
/// [`calls_before_int3`] made the `rt_sigaction` already; only its outcome is checked.
fn install(
    t: &mut Tracee,
    agent: &mut Option<SyncAgent>,
    area: &Area,
    current: KAction,
    made: bool,
) -> Result<(), Error> {
    let data = area.data();
    if !made {
        if !stage_install(t, area, current)? {
            return Ok(());
        }
        sigaction(
            t,
            agent,
            SIGTRAP,
            data + th::SCRATCH_ACT,
            data + th::SCRATCH_OLD,
        )?;
    }
    // The action it replaced. Ours: the sync agent made this very call and was not heard of
    // in time (its process stopped right after the call), and `sigaction` made it again
    // through ptrace (`SyncAgent::call` redoes a call it cannot tell was made): the agent
    // replaced `current`, which the process could not have changed back to our handler.
    let replaced = KAction::read(t.mem(), data + th::SCRATCH_OLD)?;
    if replaced != current && replaced.handler != area.code {
        // The process changed its action between our two calls: give it back its own.
        sigaction(t, agent, SIGTRAP, data + th::SCRATCH_OLD, 0)?;
        return Err(Error::Busy {
            tid: t.pid() as u32,
            function: "its SIGTRAP action (changed while we installed ours)".into(),
            waited_ms: 0,
        });
    }
    Ok(())
}

/// Gives SIGTRAP its previous action back, once that is safe; returns false when it is not
/// safe within the wait (our handler then stays installed: it chains to the previous action,
/// so the process behaves the same).
///
/// Why the check is enough. After the last sync no thread can execute one of our `int3`s any
/// more (they are all gone from memory, and every thread has serialized). A thread that did
/// execute one is somewhere on the kernel path `exc_int3` → `do_int3_user` → `force_sig`
/// (A: no sleeping, microseconds) → SIGTRAP pending (B: `SigPnd` shows it) → dequeued by
/// `get_signal` at the exit to user mode, signal frame built for *our* handler (C) → inside
/// our handler (D: the entry counter shows it). Restoring the action is wrong only while a
/// thread is in A or B: from C on, the frame already leads to our handler, which stays
/// mapped with its table (the area lives as long as the process). So:
/// 1. every thread must be seen, after the last sync, either blocked (sleeping: not in A,
///    which cannot sleep) or having consumed [`PROGRESS_NS`] of CPU (far longer than A);
///    once out of A a thread cannot enter it again;
/// 2. then no thread may have SIGTRAP pending in its own set (B is left in order, and nothing
///    enters it; a trap's signal is thread-directed, so the process-wide set does not count);
/// 3. and, belt and braces, no thread is inside the handler.
///
/// `orphans`: sync agents killed livepatches left (they never run the program's code).
/// `early`: the wait of 1. when it was begun already, right after the last sync (a first look
/// was taken then: what counts is what was seen after the last sync, and those looks were).
/// The threads' files are `threads`' kept ones; their pending sets are read from their `stat`
/// (its `signal` field: the thread's own set, the word `SigPnd` shows).
fn uninstall(
    t: &mut Tracee,
    agent: &mut Option<SyncAgent>,
    area: &Area,
    wait: Duration,
    threads: &mut Threads,
    early: Option<MovedOn<'_>>,
    orphans: &[i32],
) -> Result<bool, Error> {
    crate::process::stop_point::reached("uninstall");
    let data = area.data();
    let start = Instant::now();
    let deadline = crate::deadline::after(wait);
    let skip = skipped(t, agent, orphans);
    let watch = early.unwrap_or_else(|| MovedOn::start(threads, &skip, &[], None));
    if let Some((tid, _)) = watch.wait(t.mem(), threads, deadline, UNINSTALL_POLL)? {
        trace(
            &format!("uninstall: thread {tid} not seen past the int3s"),
            start,
        );
        return program_owns_sigtrap(t, agent, area);
    }
    // Threads created from now on never executed one of our int3s: the list is final. (Our
    // agents, which block every signal and never run our int3s, are not in it.)
    let mut agents = orphans.to_vec();
    agents.extend(agent.as_ref().map(SyncAgent::tid));
    let tids = threads.current(&agents);
    let mut pause = UNINSTALL_POLL.first;
    loop {
        // A trap's SIGTRAP is queued to the thread that trapped (force_sig): its own
        // pending set. The process-wide set holds only SIGTRAPs sent by kill, never ours —
        // and one can stay there for long (sent while the borrowed thread, stopped, was the
        // only candidate the kernel looked at).
        let pending = tids.iter().any(|&tid| {
            threads
                .get(tid)
                .is_some_and(|t| t.has_pending(libc::SIGTRAP))
        });
        if !pending && area.read_u64(t.mem(), th::INSIDE)? == 0 {
            break;
        }
        if Instant::now() > deadline {
            let inside = area.read_u64(t.mem(), th::INSIDE)?;
            trace(
                &format!("uninstall: SIGTRAP pending {pending}, {inside} inside the handler"),
                start,
            );
            return program_owns_sigtrap(t, agent, area);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(UNINSTALL_POLL.max);
    }
    // The previous action back, and the one it replaces read in the same call (one call
    // through the agent instead of a look first, then the restore: each is a wake-up of the
    // agent and one of the tool). Not ours: the process set its own action during the
    // switch, and it is put back at once — it owns SIGTRAP.
    sigaction(
        t,
        agent,
        SIGTRAP,
        data + th::OLD_ACT,
        data + th::SCRATCH_OLD,
    )?;
    let replaced = KAction::read(t.mem(), data + th::SCRATCH_OLD)?;
    if replaced.handler != area.code {
        sigaction(t, agent, SIGTRAP, data + th::SCRATCH_OLD, 0)?;
    }
    Ok(true)
}

/// The uninstall's wait ran out: our handler stays the action (false), unless the process set
/// its own during the switch — it owns SIGTRAP then (true).
fn program_owns_sigtrap(
    t: &mut Tracee,
    agent: &mut Option<SyncAgent>,
    area: &Area,
) -> Result<bool, Error> {
    let data = area.data();
    sigaction(t, agent, SIGTRAP, 0, data + th::SCRATCH_OLD)?;
    Ok(KAction::read(t.mem(), data + th::SCRATCH_OLD)?.handler != area.code)
}

/// How often the threads are looked at while waiting for them: soon at first (most threads
/// are seen blocked at the first looks, and every microsecond of the int3 window costs a trap
/// per call), then less often (each look reads two /proc files per thread: CPU time the
/// target's threads would otherwise get on a small machine).
#[derive(Debug, Clone, Copy)]
struct Poll {
    first: Duration,
    max: Duration,
}

/// While int3s are in place (settle). Most threads are done at the first looks (a trap of
/// theirs, or blocked), and the rest usually within a few hundred microseconds: the looks
/// stay close (a look at the threads left costs a few microseconds each), so that a thread
/// blocked only between short stretches of work (a loop sleeping 50 µs per round) is caught
/// blocked soon (the sleeps are as short as asked: `timer_slack`).
const SETTLE_POLL: Poll = Poll {
    first: Duration::from_micros(20),
    max: Duration::from_micros(50),
};

/// After the last sync (uninstall): no int3 is left, only the tool's wall time is at stake,
/// and the looks read only the threads not seen past the int3s yet.
const UNINSTALL_POLL: Poll = Poll {
    first: Duration::from_micros(30),
    max: Duration::from_micros(200),
};

/// How settle waits: at most `timeout`, whether the process has a signal handler that
/// blocks no handled signal ([`unmasked_handler`]), and the switch's kept thread files.
#[derive(Clone, Copy)]
struct SettleRules<'a> {
    timeout: Duration,
    unmasked_handler: bool,
    threads: &'a RefCell<Threads>,
    /// Sync agents killed livepatches left (see [`Agents`]): never waited for.
    orphans: &'a [i32],
}

/// What settle knows beside /proc (see [`MovedOn`]): where the threads' trap records
/// are in the target, the epoch that counts, and whether the process has a signal handler that
/// runs without blocking any handled signal (see [`unmasked_handler`]).
#[derive(Debug, Clone, Copy)]
struct SettleFacts {
    records: u64,
    epoch: u64,
    unmasked_handler: bool,
}

/// A wait until every thread except `skip` has moved on since its start ("now"): gone, seen blocked at a pc
/// outside `ranges` with no address inside them on its stack, or seen to consume
/// [`PROGRESS_NS`] of CPU after now. Threads created after now count as moved on. Returns a
/// thread that has not at the deadline, and whether it was last seen in a signal handler (or
/// call) whose way back leads into `ranges`.
///
/// CPU time comes from schedstat, which the scheduler updates only at ticks and switches: the
/// value read now may lag the thread's true CPU time by up to a tick of running. So the
/// measure starts at the first *update* seen after now (a value different from the one read
/// now, exact at that update), and the thread must consume [`PROGRESS_NS`] beyond it. A
/// change of the run count (schedstat's third field, bumped at every switch-in) starts it as
/// well: right before that switch-in the thread was off its CPU, so its CPU time was exact
/// then (the switch-out before it updated it, and nothing ran since), and any value read
/// after it is at least that — at least the CPU time the thread had now. (A thread that was
/// waiting for a CPU now changes its run count when it gets one, before its CPU time moves.)
///
/// `traps` (settle only): a trap of ours after the epoch was set is proof as good as the CPU
/// time, and comes sooner — every thread that calls a switched function takes one. The
/// handler copies the epoch into the thread's record when it runs; the tool sets the epoch
/// once every int3 is in place and seen by every thread. A record holding this thread's tid
/// and the epoch means: after that, the thread's context stood at a site's first byte (the
/// int3; the handler then sends it to a destination, never into the bytes behind a site),
/// hence outside every range — and from then on it cannot enter one (every site starts with a
/// visible int3). It may go back into one only the ways CPU time does not rule out either (a
/// signal handler or a displaced call returning into the bytes): the same checks follow.
///
/// A blocked thread's pc is not enough (review N3): blocked inside a signal handler, it
/// resumes at the context the signal interrupted, saved in the signal frame on its stack —
/// possibly inside the displaced bytes; blocked in a function called by a displaced `call`,
/// it returns into them. Both leave that address on its stack, so the stack above its stack
/// pointer is searched ([`stack_refers_to`]; an unrelated word equal to an address inside a
/// function's first bytes only makes the wait longer). Such a thread must later be seen
/// blocked with no such address: CPU time alone no longer counts for it (it could be spent in
/// the handler).
///
/// The threads' files are `threads`' kept ones; the process's status (`SigCgt`) and stat (is
/// it gone?) are read through kept descriptors too. The wait can be cut in two: begun at one
/// point ([`MovedOn::start`]), looked at ([`MovedOn::look`]), continued later
/// ([`MovedOn::wait`]).
struct MovedOn<'r> {
    pid: i32,
    ranges: &'r [CodeRange],
    traps: Option<SettleFacts>,
    /// The signals the process has handlers for (not SIGTRAP: ours), read at the start; 0
    /// when there are no ranges to return into.
    caught: u64,
    pending: Vec<Watched>,
    records: Vec<u8>,
    /// Read at the first need after the start (see [`Mappings`]).
    maps: Mappings,
}

struct Watched {
    tid: i32,
    at_start: observe::SchedStat,
    base: Option<u64>,
    /// Seen blocked with an address inside `ranges` on its stack.
    inside_frame: bool,
    /// A trap record no longer counts for it (a look through ptrace found it in a
    /// handler or call leading back into `ranges`).
    ignore_trap: bool,
}

impl<'r> MovedOn<'r> {
    /// "Now" for the wait: the threads listed, each one's CPU time and run count read.
    fn start(
        threads: &mut Threads,
        skip: &[i32],
        ranges: &'r [CodeRange],
        traps: Option<SettleFacts>,
    ) -> MovedOn<'r> {
        // A thread that stays runnable may be running a signal handler whose interrupted
        // context is inside `ranges`: its CPU time proves nothing then (review R5). A thread
        // that may be in a handler — it blocks a signal the process has a handler for, as the
        // kernel does while the handler runs — is looked at once, briefly, through ptrace.
        // Others are never traced, unless the process has a handler that blocks no handled
        // signal while it runs (SA_NODEFER and no such signal in its mask): then nothing tells
        // from outside whether a thread runs it, and every thread is looked at before it counts
        // as moved on.
        let caught = if ranges.is_empty() {
            0
        } else {
            threads.process_signal_mask(&["SigCgt"]) & !observe::bit(libc::SIGTRAP)
            // ours
        };
        let tids = threads.current(skip);
        let pending = tids
            .into_iter()
            .filter_map(|tid| {
                let at_start = threads.get(tid)?.files.schedstat()?;
                Some(Watched {
                    tid,
                    at_start,
                    base: None,
                    inside_frame: false,
                    ignore_trap: false,
                })
            })
            .collect();
        MovedOn {
            pid: threads.pid(),
            ranges,
            traps,
            caught,
            pending,
            records: vec![0u8; (th::NSEEN * 8) as usize],
            maps: Mappings::new(threads.pid()),
        }
    }

    /// Looks at the threads not yet seen to have moved on; returns one that has not (and
    /// whether it was last seen in a signal handler or call leading back into `ranges`), or
    /// None when all have.
    fn look(&mut self, mem: &Memory, threads: &mut Threads) -> Option<(i32, bool)> {
        let MovedOn {
            pid,
            ranges,
            traps,
            caught,
            pending,
            records,
            maps,
        } = self;
        let (pid, ranges, traps, caught) = (*pid, *ranges, *traps, *caught);
        let unmasked = traps.is_some_and(|t| t.unmasked_handler);
        let records = match traps {
            Some(r) if mem.read(r.records, records).is_ok() => &records[..],
            _ => &[][..],
        };
        let trapped = |tid: i32| {
            let slot = (tid as u64 % th::NSEEN * 8) as usize;
            traps.is_some_and(|r| {
                records.get(slot..slot + 8).is_some_and(|b| {
                    u64::from_le_bytes(b.try_into().unwrap()) == (tid as u64) << 32 | r.epoch
                })
            })
        };
        pending.retain_mut(|w| {
            // Kept since the start (an entry is replaced only once its thread is gone).
            let Some(t) = threads.get(w.tid) else {
                return false; // gone
            };
            let moved = match t.files.activity() {
                None => true,
                Some(Activity::Blocked { pc, .. }) if ranges.iter().any(|r| r.contains(pc)) => {
                    false
                }
                Some(Activity::Blocked { sp, .. }) => {
                    w.inside_frame = !ranges.is_empty() && stack_refers_to(mem, maps, sp, ranges);
                    !w.inside_frame
                }
                Some(Activity::Running) if w.inside_frame => false,
                Some(Activity::Running) => match t.files.schedstat() {
                    None => true,
                    Some(now) => {
                        let by_trap = !w.ignore_trap && trapped(w.tid);
                        let by_cpu = match w.base {
                            None => {
                                if now.runtime_ns != w.at_start.runtime_ns
                                    || now.run_count != w.at_start.run_count
                                {
                                    w.base = Some(now.runtime_ns);
                                }
                                false
                            }
                            Some(base) => now.runtime_ns.saturating_sub(base) >= PROGRESS_NS,
                        };
                        if by_trap || by_cpu {
                            let inside = caught != 0
                                && (unmasked || t.blocked_of(caught) != 0)
                                && running_thread_refers_to(mem, pid, w.tid, ranges);
                            if inside {
                                w.base = Some(now.runtime_ns); // look again after more progress
                                w.ignore_trap = true;
                            }
                            !inside
                        } else {
                            false
                        }
                    }
                },
            };
            !moved
        });
        pending.first().map(|w| (w.tid, w.inside_frame))
    }

    /// Looks until every thread has moved on (None) or `deadline` (the one that has not).
    fn wait(
        mut self,
        mem: &Memory,
        threads: &mut Threads,
        deadline: Instant,
        poll: Poll,
    ) -> Result<Option<(i32, bool)>, Error> {
        let mut pause = poll.first;
        // Its looks must not preempt the threads it waits for (see `Ordinary`).
        let _ordinary = crate::process::realtime::Ordinary::during();
        loop {
            let Some(late) = self.look(mem, threads) else {
                return Ok(None);
            };
            if threads.process_gone() {
                return Err(crate::process::ProcessError::Exited(self.pid).into());
            }
            if Instant::now() > deadline {
                return Ok(Some(late));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(poll.max);
        }
    }
}

/// Stops running thread `tid` for a moment (seize, interrupt, read its registers, detach,
/// passing on a signal it was about to take) and tells whether its rip or its stack refers to
/// `ranges`. A thread that cannot be looked at (gone, traced by someone else) does not.
fn running_thread_refers_to(mem: &Memory, pid: i32, tid: i32, ranges: &[CodeRange]) -> bool {
    use crate::process::ptrace::{self, WaitStatus};
    if ptrace::seize(tid).is_err() {
        return false;
    }
    let regs = ptrace::interrupt(tid).ok().and_then(|()| loop {
        match ptrace::wait(tid, false) {
            Ok(Some((_, WaitStatus::Gone))) | Err(_) => break None,
            Ok(Some((_, st))) => {
                let pass_on = match st {
                    WaitStatus::Signal(sig) => sig,
                    _ => 0,
                };
                break Some((ptrace::get_regs(tid).ok(), pass_on));
            }
            Ok(None) => continue,
        }
    });
    let Some((regs, pass_on)) = regs else {
        return false; // gone
    };
    let _ = ptrace::detach(tid, pass_on);
    regs.is_some_and(|r| {
        ranges.iter().any(|c| c.contains(r.rip))
            || stack_refers_to(mem, &mut Mappings::new(pid), r.rsp, ranges)
    })
}

/// The bytes behind each site's first byte where a thread may be between two instructions
/// (the tail write overwrites them). None where the current code at the site is a single
/// instruction covering the whole plan (our own redirect, when reverting).
fn inner_ranges(sites: &[SiteSwitch]) -> Vec<CodeRange> {
    sites
        .iter()
        .filter(|s| s.plan.len() > 1 && first_insn_len(&s.plan) < s.plan.len())
        .map(|s| CodeRange::new(s.plan.addr() + 1, s.plan.addr() + s.plan.len() as u64))
        .collect()
}

fn first_insn_len(plan: &WritePlan) -> usize {
    let mut d = iced_x86::Decoder::with_ip(
        64,
        plan.expected(),
        plan.addr(),
        iced_x86::DecoderOptions::NONE,
    );
    let i = d.decode();
    if i.is_invalid() {
        0
    } else {
        i.len()
    }
}

/// Nonstop mode's commit byte (apply/dispatch.rs): the flag of a patch whose sites lead to
/// its dispatches.
#[derive(Clone)]
pub(crate) struct Flag {
    /// Its address in the patch memory.
    pub addr: u64,
    /// Set by this switch (an apply's commit); otherwise cleared (a revert's store).
    pub set: bool,
    /// Callers' branches switched on from the dispatch after the flag store, before the
    /// state's commit: an apply's, straight to the new code (a call through the dispatch costs
    /// a flag test and a branch more: `call_overhead`); a revert's, to the code of the patch
    /// below that had retargeted them (they went to the dispatch first: see revert.rs).
    pub then: Vec<SiteSwitch>,
}

/// The sites' writes, in [`steps`]. With a flag (apply/dispatch.rs) an apply switches:
/// 1. the callers' branches, to the dispatches, in windows of a few sites each (each call of
///    a site costs a trap while its window lasts: three syncs);
/// 2. the entries, to the dispatches, in one window with their settle, which now runs while
///    the direct calls already go through the dispatches and meet no `int3`;
/// 3. the flag (the commit: until this store the dispatches run the old code, so any window
///    rolls back with no new code having run);
/// 4. the callers' branches again, on from the dispatches to the new code (`flag.then`), in
///    windows like the first ones — a call through a dispatch costs a flag test and a branch;
///    then the state's commit.
///
/// A revert switches the callers' branches back first (they then lead through the entries to
/// the dispatches, which still run the new code; a caller that the patch below had retargeted
/// leads to the dispatch itself), clears the flag (from there on every call runs the old code,
/// or the patch below's), moves those callers on to the patch below's code (`then`), and
/// restores the entries last, so that a failure never has to put a jump back over entry bytes
/// restored earlier (a thread may be between their instructions: review session 6, 1).
#[allow(clippy::too_many_arguments)]
fn switch_sites(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    area: &Area,
    phase: &Cell<u8>,
    agent: &mut Option<SyncAgent>,
    rules: SettleRules<'_>,
    flag: Option<&Flag>,
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
    started: &mut Started,
) -> Result<(), Error> {
    let Some(flag) = flag else {
        return steps(t, sites, area, phase, agent, rules, commit, started);
    };
    let (callers, entries): (Vec<SiteSwitch>, Vec<SiteSwitch>) =
        sites.iter().cloned().partition(|s| s.call_site);
    let w0 = Instant::now();
    // Written by the agent, a window lasts tens of µs (see `Burst`): every caller goes in one,
    // which saves the syncs of the others — each one the agent's CPU held for an IPI round trip
    // (12–25 µs here), with the thread it preempted waiting meanwhile. Written by the tool, a
    // window lasts hundreds of µs, and fewer sites in each means fewer traps per iteration of a
    // thread that calls them all.
    let per_window = if agent.as_ref().is_some_and(SyncAgent::writes) {
        callers.len().max(flag.then.len()).max(1)
    } else {
        CALLERS_PER_WINDOW.max(callers.len().div_ceil(MAX_CALLER_WINDOWS))
    };
    let windows = Windows {
        per_window,
        area,
        phase,
        rules,
    };
    windows.run(t, &callers, agent, None, started)?;
    trace("callers' windows done", w0);
    // An apply's callers go on to the new code after the entries' window; a revert's (those a
    // patch below had retargeted, at the dispatch now) right after the flag's store, before
    // the entries: the entries go last in a revert, so that a failure never puts a jump back
    // over entry bytes restored earlier while a thread is between them (review session 6, 1).
    let then_after_entries = flag.set && !flag.then.is_empty();
    if !flag.set {
        // A revert: its callers lead to the entries again, which lead to the dispatches, which
        // still run the new code; from this store on every call runs the old code (the
        // version below, for a patch stacked on another).
        t.mem().write(flag.addr, &[0])?;
        windows.run(t, &flag.then, agent, None, started)?;
    }
    let mut commit_with_flag = |m: &Memory| -> Result<(), Error> {
        if flag.set {
            crate::process::stop_point::reached("dispatch-flag");
            m.write(flag.addr, &[1])?;
        }
        if !then_after_entries {
            commit(m)?;
        }
        Ok(())
    };
    area.set_phase(t.mem(), BEFORE)?;
    phase.set(BEFORE);
    steps(
        t,
        &entries,
        area,
        phase,
        agent,
        rules,
        &mut commit_with_flag,
        started,
    )?;
    trace("entries' window done", w0);
    if !then_after_entries {
        return Ok(());
    }
    // The patch is in. The callers' branches go on from the dispatches to the new code, in
    // windows like the first ones; the last commits. One found changed since its first window
    // (a uprobe put on it meanwhile, say) stays at its dispatch, which runs the new code now:
    // this step only saves a flag test per call, and rolling the whole switch back would
    // write over the other party's change (review session 6, 3).
    let mut then = Vec::with_capacity(flag.then.len());
    for sp in super::spans(&flag.then) {
        let now = t.mem().read_vec(sp.start, (sp.end - sp.start) as usize)?;
        for &i in &sp.sites {
            let s = &flag.then[i];
            if now[sp.range(s)] == *s.plan.expected() {
                then.push(s.clone());
            } else {
                eprintln!(
                    "livepatch: warning: {} at {:#x} changed by someone else since it was pointed at the dispatch: left there (its calls run the new code through the dispatch)",
                    s.name,
                    s.plan.addr()
                );
            }
        }
    }
    if then.is_empty() {
        return commit(t.mem());
    }
    windows.run(t, &then, agent, Some(commit), started)?;
    trace("callers straight to the new code", w0);
    Ok(())
}

/// What a window calls once its sites are switched (the state's commit, with the last one).
type Commit<'c> = &'c mut dyn FnMut(&Memory) -> Result<(), Error>;

/// The sites a switch began writing (in order; a caller with two plans is there twice), and
/// the bytes each site was left with by its last window that ran to the end.
#[derive(Default)]
struct Started {
    sites: Vec<SiteSwitch>,
    done: BTreeMap<u64, Vec<u8>>,
}

/// Callers' branches switched a few at a time (see [`switch_sites`]).
struct Windows<'a> {
    per_window: usize,
    area: &'a Area,
    phase: &'a Cell<u8>,
    rules: SettleRules<'a>,
}

impl Windows<'_> {
    /// `sites` in windows of `per_window`, each starting before its commit (a late trap of
    /// the previous one takes the original branch, through the entry and the dispatch, in
    /// either phase); `last` commits with the last window.
    fn run(
        &self,
        t: &mut Tracee,
        sites: &[SiteSwitch],
        agent: &mut Option<SyncAgent>,
        mut last: Option<Commit<'_>>,
        started: &mut Started,
    ) -> Result<(), Error> {
        let n = sites.chunks(self.per_window).count();
        for (k, window) in sites.chunks(self.per_window).enumerate() {
            self.area.set_phase(t.mem(), BEFORE)?;
            self.phase.set(BEFORE);
            let mut none = |_: &Memory| Ok(());
            let commit: &mut dyn FnMut(&Memory) -> Result<(), Error> = match last.as_deref_mut() {
                Some(c) if k + 1 == n => c,
                _ => &mut none,
            };
            steps(
                t, window, self.area, self.phase, agent, self.rules, commit, started,
            )?;
        }
        Ok(())
    }
}

/// Callers' branches switched in one window when the tool writes them (see [`switch_sites`]):
/// each call reaching one of them costs a trap while the window lasts, and a thread whose loop
/// calls them all takes that many traps per iteration.
const CALLERS_PER_WINDOW: usize = 2;
/// At most this many windows of callers: a patch with many callers switches them more at
/// a time rather than in ever more syncs.
const MAX_CALLER_WINDOWS: usize = 16;

/// One window: `sites` through the protocol together; they are added to `started` once
/// their bytes were found as expected, before the first write.
#[allow(clippy::too_many_arguments)]
fn steps(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    area: &Area,
    phase: &Cell<u8>,
    agent: &mut Option<SyncAgent>,
    rules: SettleRules<'_>,
    commit: &mut dyn FnMut(&Memory) -> Result<(), Error>,
    started: &mut Started,
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
    let inner = inner_ranges(sites);
    if !inner.is_empty() {
        borrowed_thread_clear(t, sites, &inner)?;
    }
    let w0 = Instant::now();
    // Sites close together in a page are written as one run (each /proc/PID/mem write costs
    // ~10-20 µs here, and every µs of a window is a µs in which calls trap): a step reads the
    // run from its first to its last byte to change, puts this step's bytes in, and writes it
    // back. The bytes in between are read right before (not from an earlier copy): the kernel
    // may change them meanwhile — a uprobe's int3 put in or taken out (review session 5, #1).
    let runs = super::spans(sites);
    // A window after others that wrote: what they wrote is rolled back if this one fails.
    let when = if started.sites.is_empty() {
        "while we prepared the switch; nothing written"
    } else {
        "by someone else during the switch; what it had written was put back"
    };
    super::read_verified_when(t.mem(), sites, &runs, when)?;
    started.sites.extend(sites.iter().cloned());
    for s in sites {
        started.done.remove(&s.plan.addr());
    }
    // The writes and syncs go to the sync agent as one program where they can (see Burst),
    // up to the settle, which the tool runs between them.
    let ranges = !inner.is_empty();
    let mut burst = Burst::new(agent);
    trace("window's bytes read", w0);
    for i in 0..max_steps {
        let mut needs_sync = false;
        let mut writes: Vec<Vec<(u64, &[u8])>> = vec![Vec::new(); runs.len()];
        for (run, writes) in runs.iter().zip(&mut writes) {
            for &k in &run.sites {
                let s = &sites[k];
                match s.plan.steps().get(i) {
                    Some(Step::Sync) => needs_sync = true,
                    Some(step) => {
                        if let Some((addr, data)) = step.data() {
                            // The last write of a plan (its first byte) goes live only after
                            // the commit: from then on trapping threads go to the new code.
                            if !committed && is_last_write(&s.plan, i) {
                                burst.write(
                                    t,
                                    agent,
                                    area.data() + th::PHASE + area.bank,
                                    &[COMMITTED],
                                )?;
                                phase.set(COMMITTED);
                                committed = true;
                            }
                            writes.push((addr, data));
                        }
                    }
                    None => {}
                }
            }
        }
        for w in writes.iter().filter(|w| !w.is_empty()) {
            burst.write_run(t, agent, w)?;
        }
        if needs_sync {
            trace(&format!("step {i} written"), w0);
            burst.sync(t, agent, i)?;
            if !settled && ranges {
                burst.flush(t, agent)?;
            }
            if !settled {
                // Every int3 is in place and seen: no thread can enter a site any more. One
                // already past an int3, between the instructions the tail will overwrite,
                // must leave them first.
                let s0 = Instant::now();
                let skip = skipped(t, agent, rules.orphans);
                settle(t, sites, area, &skip, rules)?;
                trace("settled", s0);
                settled = true;
            }
        }
    }
    if !committed {
        burst.write(t, agent, area.data() + th::PHASE + area.bank, &[COMMITTED])?;
        phase.set(COMMITTED);
    }
    burst.flush(t, agent)?;
    trace("window written", w0);
    for s in sites {
        started.done.insert(s.plan.addr(), s.plan.result().to_vec());
    }
    commit(t.mem())
}

/// A window's writes and syncs, queued for the sync agent, which carries them out as one
/// program (`SyncAgent::run`): no round trip through the tool between the steps of the
/// protocol. Without an agent that writes, each is carried out by the tool at once, as it is
/// queued; so is whatever the agent did not get to.
///
/// Why. Each sync woke the tool, an ordinary thread, which then waited for a CPU behind the
/// target's threads before its next write; the window — during which every call of a site
/// traps — lasted 0.3–0.7 ms, mostly that wait (session 6). The agent runs under SCHED_FIFO and
/// goes from one step to the next at once.
///
/// With a debugging stop point set (`LIVEPATCH_DEBUG_STOP`: the tests of a killed tool), the
/// queue is carried out before each sync, and the sync is a request of its own, so that the
/// tool stops at `nonstop-sync` with the window's bytes as they were without the agent.
struct Burst {
    ops: Vec<Op>,
    /// The step index of each queued sync (for the trace).
    syncs: Vec<usize>,
    queue: bool,
    stop_points: bool,
}

impl Burst {
    fn new(agent: &Option<SyncAgent>) -> Burst {
        Burst {
            ops: Vec::new(),
            syncs: Vec::new(),
            queue: agent.as_ref().is_some_and(SyncAgent::writes),
            stop_points: std::env::var_os(crate::process::stop_point::VAR).is_some(),
        }
    }

    /// Queues `op`, after carrying out what is queued when it would not fit.
    fn push(&mut self, t: &mut Tracee, agent: &mut Option<SyncAgent>, op: Op) -> Result<(), Error> {
        self.ops.push(op);
        if !sync_agent::fits(&self.ops) {
            let op = self.ops.pop();
            self.flush(t, agent)?;
            self.ops.extend(op);
        }
        Ok(())
    }

    fn write(
        &mut self,
        t: &mut Tracee,
        agent: &mut Option<SyncAgent>,
        addr: u64,
        data: &[u8],
    ) -> Result<(), Error> {
        if !self.queue {
            return Ok(t.mem().write(addr, data)?);
        }
        let mut bytes = [0u8; lp_core::plan::MAX_WRITE_LEN];
        bytes[..data.len()].copy_from_slice(data);
        let step = Step::Write {
            addr,
            bytes,
            len: data.len() as u8,
        };
        self.push(t, agent, Op::Step(step))
    }

    /// The writes of one run of sites (see [`write_run`]). Queued, sites within
    /// `sync_agent::MAX_RUN` bytes of each other are one operation: the agent reads the bytes
    /// between them right before and writes them back as they are — one `pread` and one
    /// `pwrite` instead of a `pwrite` per site (~1 µs each).
    fn write_run(
        &mut self,
        t: &mut Tracee,
        agent: &mut Option<SyncAgent>,
        writes: &[(u64, &[u8])],
    ) -> Result<(), Error> {
        if !self.queue {
            return write_run(t.mem(), writes);
        }
        // Sites in address order, cut into runs of at most MAX_RUN bytes.
        let mut sorted = writes.to_vec();
        sorted.sort_by_key(|w| w.0);
        let mut runs: Vec<Vec<(u64, &[u8])>> = Vec::new();
        for w in sorted {
            match runs.last_mut() {
                Some(r) if w.0 + w.1.len() as u64 - r[0].0 <= sync_agent::MAX_RUN as u64 => {
                    r.push(w)
                }
                _ => runs.push(vec![w]),
            }
        }
        for run in runs {
            if let [(addr, data)] = run[..] {
                self.write(t, agent, addr, data)?;
                continue;
            }
            let start = run[0].0;
            let end = run
                .iter()
                .map(|w| w.0 + w.1.len() as u64)
                .max()
                .unwrap_or(start);
            let len = (end - start) as usize;
            let (mut bytes, mut mask) = (vec![0u8; len], vec![false; len]);
            for (addr, data) in &run {
                let at = (addr - start) as usize;
                bytes[at..at + data.len()].copy_from_slice(data);
                mask[at..at + data.len()].fill(true);
            }
            let merge = Op::Merge {
                addr: start,
                bytes,
                mask,
            };
            self.push(t, agent, merge)?;
        }
        Ok(())
    }

    /// A sync after the writes queued so far (step `step` of the plans).
    fn sync(
        &mut self,
        t: &mut Tracee,
        agent: &mut Option<SyncAgent>,
        step: usize,
    ) -> Result<(), Error> {
        if !self.queue || self.stop_points {
            self.flush(t, agent)?;
            let w0 = Instant::now();
            sync(t, agent)?;
            trace(&format!("step {step} synced"), w0);
            return Ok(());
        }
        self.push(t, agent, Op::Step(Step::Sync))?;
        self.syncs.push(step);
        Ok(())
    }

    /// Carries out what is queued: through the agent, then whatever it did not do, in order,
    /// by the tool.
    fn flush(&mut self, t: &mut Tracee, agent: &mut Option<SyncAgent>) -> Result<(), Error> {
        if self.ops.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.ops);
        let mut syncs = std::mem::take(&mut self.syncs).into_iter();
        let w0 = Instant::now();
        let done = match agent.as_mut() {
            Some(a) => a.run(&ops).map_err(|e| {
                Error::Unfinished(format!(
                    "process {}: our sync agent (thread {}) could not be stopped in the middle of the switch's writes (starved by a real-time thread?): nothing more was written; the switch is left as a killed livepatch leaves it, and the next apply or revert finishes it",
                    t.pid(),
                    e.tid
                ))
            })?,
            None => 0,
        };
        let merged = ops
            .iter()
            .filter(|op| matches!(op, Op::Merge { .. }))
            .count();
        trace(&format!("agent program: {merged} merged runs"), w0);
        trace(&format!("agent ran {done} of {} operations", ops.len()), w0);
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Step(Step::Sync) => {
                    if i >= done {
                        sync(t, agent)?;
                    }
                    let step = syncs.next().unwrap_or_default();
                    trace(&format!("step {step} synced"), w0);
                }
                _ if i < done => {}
                Op::Step(step) => {
                    if let Some((addr, data)) = step.data() {
                        t.mem().write(addr, data)?;
                    }
                }
                Op::Merge { addr, bytes, mask } => {
                    let writes: Vec<(u64, &[u8])> = mask
                        .iter()
                        .enumerate()
                        .filter(|(_, &m)| m)
                        .map(|(k, _)| (addr + k as u64, &bytes[k..k + 1]))
                        .collect();
                    write_run(t.mem(), &writes)?;
                }
                // Never in a window's program: the tool's own calls go one at a time
                // (`sigaction`, `register_sync_cores`, `Early`'s).
                Op::SigAction { .. }
                | Op::RegisterSyncCore
                | Op::Mmap { .. }
                | Op::Mprotect { .. } => {}
            }
        }
        if done < ops.len() {
            self.queue = agent.as_ref().is_some_and(SyncAgent::writes);
        }
        Ok(())
    }
}

/// Whether the process handles a signal with an action that blocks no handled signal while
/// its handler runs (SA_NODEFER, and none of them in its mask): a thread running that handler
/// shows nothing in its signal mask (review R5's gap). Read with rt_sigaction on the borrowed
/// thread, once per handled signal, before the first int3 (only when there are sites with
/// bytes to settle; a handler installed during the window itself is not seen).
///
/// `caught`: the signals the process handles (SigCgt, SIGTRAP left out); `known`: the actions
/// [`calls_before_int3`] read already.
fn unmasked_handler(
    t: &mut Tracee,
    agent: &mut Option<SyncAgent>,
    area: &Area,
    caught: u64,
    known: &BTreeMap<i32, KAction>,
) -> Result<bool, Error> {
    for sig in 1..=64 {
        if caught & observe::bit(sig) == 0 {
            continue;
        }
        let act = match known.get(&sig) {
            Some(act) => *act,
            None => {
                let old = area.data() + th::SCRATCH_OLD;
                sigaction(t, agent, sig as u64, 0, old)?;
                KAction::read(t.mem(), old)?
            }
        };
        if act.handler > 1 && act.flags & SA_NODEFER != 0 && act.mask & caught == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Makes every thread of the target serialize: through the sync agent when there is one and
/// it answers, else through ptrace on the borrowed thread.
fn sync(t: &mut Tracee, agent: &mut Option<SyncAgent>) -> Result<(), Error> {
    // For the tests of a killed tool: a kill here leaves int3s in place and the agent waiting.
    crate::process::stop_point::reached("nonstop-sync");
    if let Some(a) = agent {
        let t0 = Instant::now();
        if a.sync() {
            trace(
                &format!("agent sync in {} us", t0.elapsed().as_micros()),
                t0,
            );
            return Ok(());
        }
        trace("agent sync failed: through ptrace", t0);
    }
    Ok(t.sync_cores()?)
}

/// The threads that are ours rather than the program's for the switch: the borrowed thread
/// (stopped), the sync agent and the `orphans` (agents killed livepatches left).
fn skipped(t: &Tracee, agent: &Option<SyncAgent>, orphans: &[i32]) -> Vec<i32> {
    let mut v = t.threads();
    v.extend(agent.as_ref().map(SyncAgent::tid));
    v.extend_from_slice(orphans);
    v
}

/// Waits until no thread is between the instructions behind an int3 (see [`MovedOn`]).
/// `skip`: the borrowed thread (stepped out before the window, see
/// [`borrowed_thread_clear`]) and the sync agent.
fn settle(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    area: &Area,
    skip: &[i32],
    rules: SettleRules<'_>,
) -> Result<(), Error> {
    let SettleRules {
        timeout,
        unmasked_handler,
        threads,
        orphans: _,
    } = rules;
    let ranges = inner_ranges(sites);
    if ranges.is_empty() {
        return Ok(());
    }
    // A new epoch for the threads' trap records, now that every int3 is in place and seen: a
    // record of this epoch was written by a trap handled after this point. (Below 2^32: the
    // tid takes the high half.)
    let epoch = ((area.read_u64(t.mem(), th::EPOCH)? + 1) & 0xffff_ffff).max(1);
    t.mem()
        .write(area.data() + th::EPOCH, &epoch.to_le_bytes())?;
    let traps = SettleFacts {
        records: area.data() + th::SEEN,
        epoch,
        unmasked_handler,
    };
    // The borrowed thread was stepped out before the window began (see
    // [`borrowed_thread_clear`]).
    let watch = MovedOn::start(&mut threads.borrow_mut(), skip, &ranges, Some(traps));
    let deadline = crate::deadline::after(timeout);
    match watch.wait(t.mem(), &mut threads.borrow_mut(), deadline, SETTLE_POLL)? {
        None => Ok(()),
        Some((tid, in_handler)) => Err(Error::Busy {
            tid: tid as u32,
            function: if in_handler {
                "a signal handler (or call) that interrupted the first instructions of a function being switched".into()
            } else {
                "the first instructions of a function being switched (it did not run)".into()
            },
            waited_ms: timeout.as_millis() as u64,
        }),
    }
}

/// The borrowed thread, stopped from before the window to its end, is outside the bytes behind
/// the window's int3s (`ranges`): stepped out of them when its pc is inside (busy when that
/// cannot be done in a few instructions), and busy when its stack refers to them — stopped, it
/// cannot leave a signal handler whose interrupted context is inside, nor return from a callee
/// of a displaced call (see [`MovedOn`]). Looked at before the window's first write rather than
/// in its settle: it stays as it is meanwhile (the syncs the tool makes through it without an
/// agent put its registers back), and the int3 window is shorter by these reads (30-120 µs
/// here).
fn borrowed_thread_clear(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    ranges: &[CodeRange],
) -> Result<(), Error> {
    let mut maps = Mappings::new(t.pid());
    for tid in t.threads() {
        if !super::step_out(t, tid, ranges)? {
            return Err(busy(tid, sites, ranges, t.regs(tid)?.rip));
        }
        if stack_refers_to(t.mem(), &mut maps, t.regs(tid)?.rsp, ranges) {
            return Err(Error::Busy {
                tid: tid as u32,
                function: "a signal handler or call interrupting the first instructions of a function being switched".into(),
                waited_ms: 0,
            });
        }
    }
    Ok(())
}

fn busy(tid: i32, sites: &[SiteSwitch], ranges: &[CodeRange], rip: u64) -> Error {
    let name = ranges
        .iter()
        .position(|r| r.contains(rip))
        .and_then(|i| sites.get(i))
        .map(|s| s.name.clone())
        .unwrap_or_else(|| "the code being switched".into());
    Error::Busy {
        tid: tid as u32,
        function: name,
        waited_ms: 0,
    }
}

/// Writes `writes` (address, bytes; sites of one run, in address order) with one
/// `/proc/PID/mem` write when there are several: the bytes between them are read first and
/// written back as they are.
fn write_run(mem: &Memory, writes: &[(u64, &[u8])]) -> Result<(), Error> {
    if let [(addr, data)] = writes {
        return Ok(mem.write(*addr, data)?);
    }
    let start = writes.iter().map(|w| w.0).min().unwrap_or(0);
    let end = writes
        .iter()
        .map(|w| w.0 + w.1.len() as u64)
        .max()
        .unwrap_or(start);
    let mut run = mem.read_vec(start, (end - start) as usize)?;
    for (addr, data) in writes {
        let at = (addr - start) as usize;
        run[at..at + data.len()].copy_from_slice(data);
    }
    Ok(mem.write(start, &run)?)
}

fn is_last_write(plan: &WritePlan, i: usize) -> bool {
    !plan.steps()[i + 1..].iter().any(|s| s.data().is_some())
}

/// Whether a failed revert leaves caller `s` as it is: a caller the patch below had
/// retargeted, which this revert pointed at the top patch's dispatch (its window ran to the
/// end) and which someone else has changed since (a uprobe put on it). Rolled back, it would
/// lose their change (review session 6, 6); left, it leads to the dispatch, which runs the
/// top patch again once the flag is set back, and a later revert takes it from there.
fn left_at_dispatch(
    mem: &Memory,
    s: &SiteSwitch,
    flag: &Flag,
    done: &BTreeMap<u64, Vec<u8>>,
) -> bool {
    let addr = s.plan.addr();
    let Some(at_dispatch) = flag
        .then
        .iter()
        .find(|o| o.plan.addr() == addr)
        .map(|o| o.plan.expected())
    else {
        return false;
    };
    if done.get(&addr).map(Vec::as_slice) != Some(at_dispatch) {
        return false;
    }
    let changed = mem
        .read_vec(addr, at_dispatch.len())
        .is_ok_and(|cur| cur != at_dispatch);
    if changed {
        eprintln!(
            "livepatch: warning: {} at {addr:#x} changed by someone else since this revert pointed it at the dispatch: left as it is (it leads to the patch, which stays in)",
            s.name
        );
    }
    changed
}

/// Puts every site back as it was with the same protocol, trapping threads sent where the
/// restored bytes lead (phase ROLLBACK).
fn rollback(
    t: &mut Tracee,
    sites: &[SiteSwitch],
    area: &Area,
    phase: &Cell<u8>,
    agent: &mut Option<SyncAgent>,
) -> Result<(), Error> {
    area.set_phase(t.mem(), ROLLBACK)?;
    phase.set(ROLLBACK);
    for s in sites {
        t.mem().write(s.plan.addr(), &[lp_core::site::INT3])?;
    }
    sync(t, agent)?;
    // Threads may be inside the bytes of the new jump only at its start: nothing to wait
    // for before the tail (of a jump, or of the original instructions when the int3 step
    // itself failed half-way).
    for s in sites {
        t.mem().write(s.plan.addr() + 1, &s.plan.expected()[1..])?;
    }
    sync(t, agent)?;
    for s in sites {
        t.mem().write(s.plan.addr(), &s.plan.expected()[..1])?;
    }
    sync(t, agent)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(rows: &[(u64, [u64; th::NPHASES])]) -> Vec<u8> {
        rows.iter()
            .flat_map(|(a, c)| std::iter::once(*a).chain(c.iter().copied()))
            .flat_map(u64::to_le_bytes)
            .collect()
    }

    /// Review N4: a thread of the previous switch that reaches the handler after the next
    /// switch published its table still finds its site, sent back to the site itself.
    #[test]
    fn the_previous_switchs_sites_are_carried_one_switch_back() {
        let prev = [
            (0x1000, [0x9000, 0xa000, 0x9000]),
            (0x2000, [0x9100, 0xa100, 0x9100]),
        ];
        let new = [
            (0x2000, [0xb000, 0xc000, 0xb000]),
            (0x3000, [0xb100, 0xc100, 0xb100]),
        ];
        let rows = table_rows(&new, &raw(&prev));
        // Its own sites first and unchanged; 0x2000 is decided by this switch alone.
        assert_eq!(&rows[..2], &new[..]);
        assert_eq!(rows[2..], [(0x1000, [0x1000; th::NPHASES])]);
        // One switch later the carried row is not carried again; this switch's are.
        let next = table_rows(&[(0x4000, [0xd000, 0xe000, 0xd000])], &raw(&rows));
        let addrs: Vec<u64> = next.iter().map(|r| r.0).collect();
        assert_eq!(addrs, [0x4000, 0x2000, 0x3000]);
        // A full bank keeps its own sites and drops what does not fit.
        let many: Vec<(u64, [u64; th::NPHASES])> = (0..th::MAX_SITES as u64)
            .map(|i| (0x10_0000 + i * 16, [1, 2, 3]))
            .collect();
        assert_eq!(table_rows(&many, &raw(&prev)).len(), th::MAX_SITES);
        assert_eq!(table_rows(&many, &raw(&prev))[..], many[..]);
    }
}

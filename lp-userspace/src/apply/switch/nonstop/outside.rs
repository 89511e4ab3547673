//! After a nonstop revert's switch: waits until no thread is inside, or will return into, the
//! patch memory about to be unmapped — told from /proc for every thread that can be told so,
//! with no ptrace stop (review 8, M1: a stop ends a thread's `epoll_wait`, `semtimedop`,
//! `sigtimedwait`... with EINTR, signal(7)).
//!
//! Why a look is enough. Once the switch is done nothing leads into the patch memory (the
//! sites hold their old bytes, the flag is cleared; a function pointer into it that the patch's
//! own code handed out is outside what livepatch can know, as before). So a thread seen
//! outside it, with nothing on its stack that leads back in, stays outside for good. A thread
//! is seen so when, in this order:
//! 1. its `schedstat` is read (its run count, bumped at every switch-in);
//! 2. its `syscall` file shows it blocked in a system call (the kernel reports it only for a
//!    thread off its CPU), with its pc outside the memory — and the call is not `vfork`,
//!    `clone` or `clone3`: glibc's `vfork` keeps its return address in a register, not on the
//!    stack (the child runs on the parent's stack), and a vfork child runs in this memory too;
//! 3. its stack, from the stack pointer that file gave to the end of its mapping — and, past a
//!    signal frame a handler on an alternate stack left, the interrupted stack
//!    (`search_stack`, settle's search, review 11 H1) — holds no 8-byte word inside the
//!    memory: no return address, no signal frame's saved rip (or register) leading back in;
//!    and it was searched whole (not so: a stack deeper than settle's 1 MiB bound, one in no
//!    mapping known, a page that could not be read);
//! 4. its run count is read again, unchanged (and not 0: a kernel that keeps none shows 0):
//!    the thread was not switched in between 1 and 4, and so was off its CPU from 2 to 4 —
//!    the stack read in 3 is the one it will resume with. (The search is conservative: a
//!    stale word, or a pointer to the patch's data, is taken for a way back.)
//!
//! A running thread is looked at again until it is seen so (it leaves the memory when its
//! calls return, and blocks somewhere, usually soon). Threads that are not seen so within
//! [`GRACE`] — running all the time, blocked in a call made from the memory (or with a word
//! in it on the stack), in a vfork, blocked outside a system call — are checked as before:
//! each stopped alone, its stack unwound with CFI (`switch::wait_these_threads_outside`),
//! until the timeout; a thread still inside then keeps the memory mapped.
//!
//! The threads are those listed once the switch is done, as before: a thread created since
//! starts at its start routine, outside the memory, and nothing leads it in (a thread made
//! by a `clone` that shares its creator's stack, as `vfork` does, is seen through its
//! creator, blocked in that call).
//!
//! The borrowed thread is stopped already: its registers are read (the same search on its
//! stack; where that finds a word, the CFI unwind decides, as before, in that same stop).

use super::stacks::{search_stack, Mappings, Search};
use crate::apply::switch::wait_these_threads_outside;
use crate::apply::Error;
use crate::process::observe::{self, Activity, ThreadFiles};
use crate::process::{Memory, Tracee};
use lp_core::consistency::CodeRange;
use std::time::{Duration, Instant};

/// How long the threads get to be seen outside without a stop (from the first look) before
/// those that were not are stopped as before. A thread of a loop that sleeps is seen blocked
/// within a few looks; one that runs all the time (outside the memory, most likely) only
/// pauses for its stop, which is not worth a longer wait of the tool. (The process_patch
/// bench's threads, 10 calls and a 50 µs sleep per loop: 2-5 rounds at load ~5.)
const GRACE: Duration = Duration::from_millis(1);

/// The pause between two rounds of looks (a round costs a few µs per thread left).
const POLL: Duration = Duration::from_micros(50);

/// What one look at a thread found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Outside the memory, with nothing leading back in: for good.
    Outside,
    /// Gone.
    Gone,
    /// Not shown outside (yet), and why (for the trace).
    NotYet(Why),
}

/// Why a look did not show a thread outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// Running, or waiting for a CPU.
    Running,
    /// Blocked outside a system call, or its run count unreadable or 0.
    Unknown,
    /// Its pc is inside the memory.
    Inside,
    /// In vfork, clone or clone3.
    Vfork,
    /// A word of its stack is inside the memory.
    StackWord,
    /// Its stack was not searched whole.
    StackPartly,
    /// It was switched in during the look.
    Ran,
}

/// Waits until no thread of `t`'s process is in `ranges` or will return into them (see the
/// module documentation). Ok(false): a thread was still inside at `timeout` (or could not be
/// checked): the memory stays mapped.
pub(crate) fn wait_threads_outside_unstopped(
    t: &mut Tracee,
    ranges: &[CodeRange],
    timeout: Duration,
) -> Result<bool, Error> {
    let pid = t.pid();
    let began = Instant::now();
    let deadline = crate::deadline::after(timeout);
    let mut maps = Mappings::new(pid);
    // The threads traced (the borrowed one, stopped): their registers tell, and where the
    // search finds a word of the memory on the stack (or could not search it whole), the CFI
    // unwind decides, as before. One found inside must run to leave: stopped and let go as
    // before (`wait_these_threads_outside`).
    let traced = t.threads();
    let mut unwinder = None;
    let mut doubtful = Vec::new();
    for &tid in &traced {
        let inside = |a: u64| ranges.iter().any(|c| c.contains(a));
        let clear = match t.regs(tid) {
            Ok(r) if !inside(r.rip) => {
                search_stack(t.mem(), &mut maps, r.rsp, ranges) == Search::Clear || {
                    let u = match unwinder.as_mut() {
                        Some(u) => u,
                        None => unwinder.insert(crate::apply::unwinder(pid)?),
                    };
                    let regs = crate::unwind::Registers::from_user_regs(&r);
                    let bt = u.unwind(&regs, t.mem(), 512);
                    !bt.return_addresses.iter().any(|&a| inside(a))
                }
            }
            _ => false,
        };
        if !clear {
            doubtful.push(tid);
        }
    }
    // The others' `syscall` and `schedstat`, opened once (they refer to the thread itself:
    // once it is gone they read nothing, whatever thread gets its id), or read by path when no
    // descriptor is left (never skipped: review 9, F1).
    let mut pending: Vec<ThreadFiles> = observe::tasks(pid)
        .into_iter()
        .filter(|tid| !traced.contains(tid))
        .filter_map(|tid| ThreadFiles::open(pid, tid).or_else(|| ThreadFiles::by_path(pid, tid)))
        .collect();
    trace(&format!("{} threads listed", pending.len()), began);
    let grace = Instant::now() + GRACE;
    let mut rounds = 0u32;
    loop {
        rounds += 1;
        let mut why = Vec::new();
        pending.retain(|th| match look(t.mem(), &mut maps, th, ranges) {
            Seen::NotYet(w) => {
                why.push((th.tid(), w));
                true
            }
            Seen::Outside | Seen::Gone => false,
        });
        if pending.is_empty() && doubtful.is_empty() {
            trace(&format!("threads outside after {rounds} rounds"), began);
            return Ok(true);
        }
        if crate::process::is_gone_or_zombie(pid) {
            return Ok(false); // nothing to unmap
        }
        // (A stopped thread left alone does not move: no wait for it.)
        if Instant::now() < grace && !pending.is_empty() {
            std::thread::sleep(POLL);
            continue;
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        // The rest are checked as before: each stopped alone (every thread seized first, so
        // that any of them can be). One not seized is gone, or going: looked at again.
        t.attach_rest()?;
        let traced_now = t.threads();
        let (stop, later): (Vec<ThreadFiles>, Vec<ThreadFiles>) = pending
            .into_iter()
            .partition(|th| traced_now.contains(&th.tid()));
        let stop: Vec<i32> = stop
            .iter()
            .map(ThreadFiles::tid)
            .chain(doubtful.drain(..))
            .collect();
        trace(
            &format!("stopping threads {stop:?} (last looks: {why:?})"),
            began,
        );
        if stop.is_empty() {
            std::thread::sleep(POLL);
        } else {
            if unwinder.is_none() {
                unwinder = Some(crate::apply::unwinder(pid)?);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if wait_these_threads_outside(t, &stop, ranges, unwinder.as_mut(), left).is_err() {
                return Ok(false);
            }
        }
        pending = later;
    }
}

/// One look at thread `th` (see the module documentation, 1-4).
fn look(mem: &Memory, maps: &mut Mappings, th: &ThreadFiles, ranges: &[CodeRange]) -> Seen {
    let before = th.schedstat();
    let Some(activity) = th.activity() else {
        return Seen::Gone;
    };
    let Activity::Blocked { syscall, sp, pc } = activity else {
        return Seen::NotYet(Why::Running);
    };
    // A kernel that keeps no run counts shows "0 0 0" (and a thread that never ran has
    // nothing to show): no proof then.
    let (Some(nr), Some(before)) = (syscall, before.filter(|b| b.run_count != 0)) else {
        return Seen::NotYet(Why::Unknown);
    };
    if [libc::SYS_vfork, libc::SYS_clone, libc::SYS_clone3].contains(&nr) {
        return Seen::NotYet(Why::Vfork);
    }
    if ranges.iter().any(|r| r.contains(pc)) {
        return Seen::NotYet(Why::Inside);
    }
    match search_stack(mem, maps, sp, ranges) {
        Search::Clear => {}
        Search::Refers => return Seen::NotYet(Why::StackWord),
        Search::Partly => return Seen::NotYet(Why::StackPartly),
    }
    match th.schedstat() {
        Some(after) if after.run_count == before.run_count => Seen::Outside,
        _ => Seen::NotYet(Why::Ran),
    }
}

fn trace(what: &str, since: Instant) {
    if std::env::var_os("LIVEPATCH_TRACE").is_some() {
        eprintln!(
            "livepatch: trace: revert check: {what}, +{} us",
            since.elapsed().as_micros()
        );
    }
}

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
//! each stopped alone, its stack unwound with CFI (`switch::threads_inside`), until the
//! timeout; a thread still inside then keeps the memory mapped. One that a stop found inside
//! is stopped again only once it has run since (200 µs apart at most, as the old loop did):
//! a thread blocked in a call made from the patch's code is stopped once, not every 200 µs.
//!
//! The threads are those listed once the switch is done, as before: a thread created since
//! starts at its start routine, outside the memory, and nothing leads it in (a thread made
//! by a `clone` that shares its creator's stack, as `vfork` does, is seen through its
//! creator, blocked in that call).
//!
//! The borrowed thread is stopped already: its registers are read (the same search on its
//! stack; where that finds a word, the CFI unwind decides, as before, in that same stop).

use super::stacks::{search_stack, Mappings, Search};
use crate::apply::switch::threads_inside;
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

/// How soon a thread that a stop found inside is stopped again when it has run since (the
/// pause of the old loop between its stops).
const RECHECK: Duration = Duration::from_micros(200);

/// A thread not seen outside yet.
struct Watch {
    files: ThreadFiles,
    /// When a stop last found it inside (or returning into) the memory, and the run count it
    /// was seen blocked with since (None until a look saw it so). While it stays blocked with
    /// that count it has not run: it is still where that stop found it, and is not stopped
    /// again (a thread blocked in a call made from the patch's code was stopped every 200 µs
    /// until the timeout, each stop an EINTR for an `epoll_wait`).
    inside: Option<(Instant, Option<u64>)>,
}

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
    // The switch's sync agent, told to exit, is gone first: listed, it would be looked at
    // (and stopped, when it runs on) as a thread of the program (review 12's merge note).
    t.drop_kept();
    // Its looks must not preempt the threads it waits for (see `realtime::Ordinary`).
    let _ordinary = crate::process::realtime::Ordinary::during();
    let pid = t.pid();
    let began = Instant::now();
    let deadline = crate::deadline::after(timeout);
    let mut maps = Mappings::new(pid);
    // The threads traced (the borrowed one, stopped): their registers tell, and where the
    // search finds a word of the memory on the stack (or could not search it whole), the CFI
    // unwind decides, as before. One found inside must run to leave: let go by the stop loop
    // below (`threads_inside`), then looked at like the others.
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
    let open = |tid: i32| ThreadFiles::open(pid, tid).or_else(|| ThreadFiles::by_path(pid, tid));
    let mut pending: Vec<Watch> = observe::tasks(pid)
        .into_iter()
        .filter(|tid| !traced.contains(tid))
        .filter_map(|tid| {
            Some(Watch {
                files: open(tid)?,
                inside: None,
            })
        })
        .collect();
    trace(&format!("{} threads listed", pending.len()), began);
    let grace = Instant::now() + GRACE;
    let mut rounds = 0u32;
    loop {
        rounds += 1;
        let now = Instant::now();
        let mut why = Vec::new();
        let mut due = Vec::new();
        pending.retain_mut(|w| {
            let (seen, quiet) = look(t.mem(), &mut maps, &w.files, ranges);
            let Seen::NotYet(reason) = seen else {
                return false; // outside, or gone
            };
            why.push((w.files.tid(), reason));
            let stop = match &mut w.inside {
                None => true,
                Some((at, held)) => match (*held, quiet) {
                    (None, Some(count)) => {
                        *held = Some(count); // back in its call since that stop
                        false
                    }
                    (Some(was), Some(count)) if was == count => false,
                    _ => now.duration_since(*at) >= RECHECK,
                },
            };
            if stop {
                due.push(w.files.tid());
            }
            true
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
        // that any of them can be), its stack unwound with CFI. One not seized is gone, or
        // going: looked at again.
        due.append(&mut doubtful);
        if !due.is_empty() {
            t.attach_rest()?;
            let traced_now = t.threads();
            due.retain(|tid| traced_now.contains(tid));
            trace(
                &format!("stopping threads {due:?} (last looks: {why:?})"),
                began,
            );
            if unwinder.is_none() {
                unwinder = Some(crate::apply::unwinder(pid)?);
            }
            let Ok(inside) = threads_inside(t, &due, ranges, unwinder.as_mut()) else {
                return Ok(false);
            };
            let now = Instant::now();
            pending.retain_mut(|w| {
                let tid = w.files.tid();
                if inside.contains(&tid) {
                    w.inside = Some((now, None));
                }
                !due.contains(&tid) || inside.contains(&tid)
            });
            // The borrowed thread, let go by its check, is looked at from now on too.
            for &tid in &inside {
                if traced.contains(&tid) {
                    if let Some(files) = open(tid) {
                        pending.push(Watch {
                            files,
                            inside: Some((now, None)),
                        });
                    }
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

/// One look at thread `th` (see the module documentation, 1-4).
/// One look at thread `th` (see the module documentation, 1-4), and, when it was seen blocked
/// and did not run during the look, its run count.
fn look(
    mem: &Memory,
    maps: &mut Mappings,
    th: &ThreadFiles,
    ranges: &[CodeRange],
) -> (Seen, Option<u64>) {
    let before = th.schedstat();
    let Some(activity) = th.activity() else {
        return (Seen::Gone, None);
    };
    let Activity::Blocked { syscall, sp, pc } = activity else {
        return (Seen::NotYet(Why::Running), None);
    };
    // A kernel that keeps no run counts shows "0 0 0" (and a thread that never ran has
    // nothing to show): no proof then.
    let (Some(nr), Some(before)) = (syscall, before.filter(|b| b.run_count != 0)) else {
        return (Seen::NotYet(Why::Unknown), None);
    };
    let why = if [libc::SYS_vfork, libc::SYS_clone, libc::SYS_clone3].contains(&nr) {
        Some(Why::Vfork)
    } else if ranges.iter().any(|r| r.contains(pc)) {
        Some(Why::Inside)
    } else {
        match search_stack(mem, maps, sp, ranges) {
            Search::Clear => None,
            Search::Refers => Some(Why::StackWord),
            Search::Partly => Some(Why::StackPartly),
        }
    };
    let quiet = th
        .schedstat()
        .is_some_and(|after| after.run_count == before.run_count);
    match (why, quiet) {
        (_, false) => (Seen::NotYet(Why::Ran), None),
        (None, true) => (Seen::Outside, None),
        (Some(why), true) => (Seen::NotYet(why), Some(before.run_count)),
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

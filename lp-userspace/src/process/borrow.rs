//! Which thread nonstop mode borrows for its system calls ([`super::Tracee::attach_one`]): a
//! look at the threads through /proc that stops none of them.
//!
//! The borrowed thread stays stopped for the whole switch (milliseconds), so the look wants
//! the thread least likely to need a CPU meanwhile. It ranks the threads by
//! - their class, the preference order of `attach_one`: blocked in a system call other than
//!   futex, then blocked in any system call, then the main thread, then the others, and last
//!   a thread blocked in a call that a stop ends with EINTR (`epoll_wait`...: the program
//!   would see it; a running thread only pauses);
//! - a thread that blocks SIGTRAP is taken only when every thread does (whatever its class:
//!   borrowed, it could not unblock it, and the switch would be busy at every try; review 9,
//!   F2), and comes last in its class (see `History`); so is a thread under a real-time
//!   policy (the program wants its wake-ups served at once; session 12);
//! - then the CPU each used *or waited for* during the look (schedstat's runtime + run_delay:
//!   on a loaded machine a busy thread may get little CPU in the look; review 8, B1), or what
//!   its history says a look this long shows of it (its share of a CPU over its life, see
//!   `History`), whichever is more: a thread that works in periods longer than the look may
//!   look idle in it (review 8, B1: 2 ms of work in every 4), and a thread that used nothing
//!   in the look still ranks after one that never runs;
//! - then, between equals — and every thread at or under 10% of a CPU by both counts is equal —
//!   the one switched in less often per second of its life (a thread that wakes every
//!   millisecond would want a CPU a dozen times while borrowed). (The thread id decided ties
//!   before: the main thread won them.)
//!
//! The look is evaluated at growing steps ([`LOOK_STEPS`]), and ends at a step when a longer
//! look could not change the pick in a way that matters: the best thread is blocked (class 0
//! or 1), does not block SIGTRAP, used at most 5% of a CPU over its life (its history, as
//! above), and either
//! - it used at most 2% of a CPU in the look (idle), or
//! - it used at most 10% of it, and every other thread of its class used at least twice as
//!   much and 2% of a CPU more (clearly busier: a longer look would only add to their lead;
//!   the `process_patch` bench: a main thread in a `usleep(1000)` loop shows one wake-up,
//!   15–50 µs with its wait for a CPU, while the workers of its 50 µs loop show 100 µs and
//!   more in each 300 µs), or
//! - it ran at most 5% of the look and at most 2% of a CPU over its life (quiet): what it
//!   "used" beyond that was a wait for a CPU, which tells that the machine is busy, not that
//!   the thread is. On a loaded machine the bench's main thread waits 20–150 µs for a CPU at
//!   each wake-up, and a worker that happened to sleep through the step no longer used
//!   twice as much: 15–25% of the looks ran to their last step (2 ms) when only the second
//!   rule held (session 11).
//!
//! A thread blocked in a futex (class 1) ends the look early only when no thread was seen
//! blocked in another system call at any step: a look that ends later would pick that one.
//! At the last step the best thread is taken whatever it is, as before.

use super::observe::{self, Activity, SchedStat, ThreadFiles};
use std::time::{Duration, Instant};

/// The steps of the look (time since it started) at which the threads are ranked again and
/// the look may end (see the module's documentation). The first one is enough for a thread of
/// a busy loop to show CPU use (a loop that sleeps 50 µs runs every ~60 µs); the last is the
/// look of session 7, taken when no thread was clearly the one to borrow before.
pub(super) const LOOK_STEPS: [Duration; 4] = [
    Duration::from_micros(300),
    Duration::from_micros(600),
    Duration::from_millis(1),
    Duration::from_millis(2),
];

/// At most this many threads are looked at (the main thread and the lowest other thread ids,
/// usually the oldest): each keeps two descriptors open for the look, which must leave room under
/// the usual limit of 1024 for the rest of the tool (the target's memory and maps, ELF files
/// opened meanwhile by the preparation).
const MAX_LOOKED: usize = 100;

/// The preference order of [`super::Tracee::attach_one`]; smaller is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Blocked in a system call other than futex: it was not running anyway, and holds no
    /// libc lock.
    BlockedInCall,
    /// Blocked in a futex wait.
    BlockedInFutex,
    /// The main thread, running.
    Main,
    /// Any other thread, running.
    Other,
    /// Blocked in a call that a ptrace stop ends with EINTR, never restarted
    /// ([`ends_with_eintr_when_stopped`]): borrowed, the program would see that EINTR (review
    /// 8, M1). Taken only when no thread of another class is there: a running thread stopped
    /// for the switch only pauses.
    BlockedEintrOnStop,
}

/// Whether a thread blocked in system call `nr` sees it fail with EINTR once a ptrace stop
/// interrupts it (signal(7), "Interruption of system calls and library functions by stop
/// signals": the kernel does not restart these after a stop). A socket call under
/// `SO_RCVTIMEO`/`SO_SNDTIMEO` does too; it cannot be told from the call's number alone.
pub(crate) fn ends_with_eintr_when_stopped(nr: i64) -> bool {
    [
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_semop,
        libc::SYS_semtimedop,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_io_getevents,
        333, // io_pgetevents (not in libc's list)
    ]
    .contains(&nr)
}

/// A thread's life so far: what it did before the look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct History {
    /// It blocks SIGTRAP (a thread inside `pthread_create`: glibc blocks every signal around
    /// clone; a thread that waits in sigwait): borrowed, it could not unblock it before the
    /// switch, which then refuses the process as busy (nsio's request, session 9).
    sigtrap_blocked: bool,
    /// It runs under a real-time policy (SCHED_FIFO, SCHED_RR, SCHED_DEADLINE): the program
    /// made it so because its wake-ups must be served at once, and a borrowed thread waits
    /// for the whole switch. Taken only when every thread is one (as a thread that blocks
    /// SIGTRAP). (Review 7's watcher threads, SCHED_FIFO and blocked in a futex, were borrowed
    /// when the look ended early on them: each then watched nothing — session 12.)
    realtime: bool,
    /// The share of a CPU it used over its life, in parts per million (start-up included),
    /// or the share it used *or waited for* when it ran in stretches longer than
    /// [`LONG_STRETCH_NS`] on average (each time it was switched in). The wait counts, as in
    /// the look: on a loaded machine a thread that works half of the time in long stretches
    /// gets little CPU (review 8, B1; the CI probe at load ~20). It counts only for long
    /// stretches: a thread that runs in short wake-ups (the `process_patch` bench's main
    /// thread, `usleep(1000)`: ~8 µs each) waits for a CPU at each, the longer the more loaded
    /// the machine, and its short wake-ups cannot hide from a look: one shows in it whenever
    /// it falls in the look.
    share_ppm: u64,
    /// Times it was switched in per second of its life. (Each borrow adds ~3 of its own: the
    /// seize, the interrupt and the detach.)
    wakes_per_s: u64,
}

impl History {
    /// Busy over its life ([`BUSY_SHARE_PPM`]), in a way a short look may miss (review 8, B1:
    /// 2 ms of work in every 4).
    fn busy(&self) -> bool {
        self.share_ppm > BUSY_SHARE_PPM
    }

    /// Not to be taken before the last step of the look: busy, blocking SIGTRAP, or real-time.
    fn shunned(&self) -> bool {
        self.busy() || self.sigtrap_blocked || self.realtime
    }

    /// Taken only when every thread is so (see [`Look::best`]).
    fn last_resort(&self) -> bool {
        self.sigtrap_blocked || self.realtime
    }

    /// What a look of `look_ns` should have seen of this thread, by its history.
    fn expected_ns(&self, look_ns: u64) -> u64 {
        (self.share_ppm as u128 * look_ns as u128 / 1_000_000) as u64
    }
}

/// A thread busy over its life ([`History::busy`]: more than 5% of a CPU) is never taken
/// before the last step of the look (review 8, B1).
const BUSY_SHARE_PPM: u64 = 50_000;

/// A thread that used at most 2% of a CPU over its life is quiet: in a look, what it used
/// beyond its own running (5% of the look at most) was a wait for a CPU (see the module's
/// documentation).
const QUIET_SHARE_PPM: u64 = 20_000;

/// Runs longer than this, on average, count as work a short look may miss (its first step is
/// 300 µs; a CPU-bound thread on a loaded machine runs for its slice, ~1–3 ms, each time).
const LONG_STRETCH_NS: u64 = 100_000;

/// Young threads count as 100 ms old: a thread that just started has not shown its habits,
/// and a main thread's start-up (the dynamic linker, the program's initialisation: one long
/// stretch, with its waits for a CPU on a loaded machine) would make it look busy for long
/// (the `process_patch` bench, patched right after its start: its main thread ranked after
/// workers of a 50 µs loop at 10 ms). A thread busy half of the time is busy by its history
/// from an age of ~10 ms on all the same (5 ms of CPU is 5% of 100 ms).
const MIN_AGE_NS: u64 = 100_000_000;

struct Looked {
    files: ThreadFiles,
    before: SchedStat,
    history: std::cell::OnceCell<History>,
}

impl Looked {
    fn history(&self, pid: i32) -> History {
        *self.history.get_or_init(|| {
            let tid = self.files.tid();
            let now = self.files.schedstat();
            match (now, observe::life(pid, tid)) {
                (Some(now), Some(life)) => {
                    let age = life.age_ns.max(MIN_AGE_NS) as u128;
                    let per =
                        |v: u64, unit: u128| (v as u128 * unit / age).min(u64::MAX as u128) as u64;
                    let stretch = now.runtime_ns / now.run_count.max(1);
                    let counted = if stretch > LONG_STRETCH_NS {
                        now.runtime_ns.saturating_add(now.run_delay_ns)
                    } else {
                        now.runtime_ns
                    };
                    History {
                        sigtrap_blocked: life.blocked & observe::bit(libc::SIGTRAP) != 0,
                        realtime: life.realtime,
                        share_ppm: per(counted, 1_000_000),
                        wakes_per_s: per(now.run_count, 1_000_000_000),
                    }
                }
                // Gone: ranked last, never taken early.
                _ => History {
                    sigtrap_blocked: true,
                    realtime: true,
                    share_ppm: u64::MAX,
                    wakes_per_s: u64::MAX,
                },
            }
        })
    }
}

/// One thread as a step of the look saw it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    class: Class,
    /// CPU used or waited for since the look started, in nanoseconds.
    used: u64,
    /// CPU used alone (no wait) since the look started, in nanoseconds.
    ran: u64,
    index: usize,
}

/// A look at the threads of a process, started before the tracee is opened (its checks and
/// lock count as look time: they are wall time of the apply all the same).
pub(super) struct Look {
    pid: i32,
    started: Instant,
    threads: Vec<Looked>,
}

impl Look {
    /// Starts looking at the threads of `pid` (none when it is gone: [`Look::pick`] then
    /// returns `None`).
    pub(super) fn start(pid: i32) -> Look {
        let started = Instant::now();
        let mut tids = observe::tasks(pid);
        // The main thread first (thread ids wrap around: it need not be the lowest).
        if let Some(main) = tids.iter().position(|&t| t == pid) {
            tids[..=main].rotate_right(1);
        }
        let threads = tids
            .into_iter()
            .take(MAX_LOOKED)
            .filter_map(|tid| {
                let files = ThreadFiles::open(pid, tid)?;
                let before = files.schedstat()?;
                Some(Looked {
                    files,
                    before,
                    history: std::cell::OnceCell::new(),
                })
            })
            .collect();
        Look {
            pid,
            started,
            threads,
        }
    }

    /// The thread to borrow (see the module's documentation), or `None` when every thread
    /// looked at is gone (the caller starts a new look, or finds the process gone).
    pub(super) fn pick(&self) -> Option<i32> {
        let mut saw_in_call = false;
        for (step, at) in LOOK_STEPS.iter().enumerate() {
            std::thread::sleep(at.saturating_sub(self.started.elapsed()));
            let look_ns = self.started.elapsed().as_nanos() as u64;
            let seen = self.see();
            saw_in_call |= seen.iter().any(|s| s.class == Class::BlockedInCall);
            let best = self.best(&seen, look_ns)?;
            let last = step + 1 == LOOK_STEPS.len();
            if last || self.ends_early(best, &seen, look_ns, saw_in_call) {
                let tid = self.threads[best.index].files.tid();
                if std::env::var_os("LIVEPATCH_TRACE").is_some() {
                    let h = self.threads[best.index].history(self.pid);
                    eprintln!(
                        "livepatch: trace: borrowed thread {tid} ({:?}, {} us used; life: {} ppm of a CPU, {} wake-ups/s) after a look of {} us, step {}",
                        best.class,
                        best.used / 1000,
                        h.share_ppm,
                        h.wakes_per_s,
                        look_ns / 1000,
                        step + 1
                    );
                }
                return Some(tid);
            }
        }
        None
    }

    /// The files of every thread looked at, for the switch's own looks at the threads (see
    /// [`super::Tracee::take_looked_files`]).
    pub(super) fn into_files(self) -> Vec<ThreadFiles> {
        self.threads.into_iter().map(|t| t.files).collect()
    }

    /// Every thread still there, with its class and the CPU it used in the look so far.
    fn see(&self) -> Vec<Seen> {
        self.threads
            .iter()
            .enumerate()
            .filter_map(|(index, t)| {
                let class = match t.files.activity()? {
                    Activity::Blocked {
                        syscall: Some(nr), ..
                    } if ends_with_eintr_when_stopped(nr) => Class::BlockedEintrOnStop,
                    Activity::Blocked {
                        syscall: Some(nr), ..
                    } if nr != libc::SYS_futex => Class::BlockedInCall,
                    Activity::Blocked {
                        syscall: Some(_), ..
                    } => Class::BlockedInFutex,
                    _ if t.files.tid() == self.pid => Class::Main,
                    _ => Class::Other,
                };
                let now = t.files.schedstat()?;
                // Not switched in at all: nothing used (the runtime of a thread on a CPU lags).
                let ran = now.runtime_ns.saturating_sub(t.before.runtime_ns);
                let used = if now == t.before {
                    0
                } else {
                    (ran + now.run_delay_ns.saturating_sub(t.before.run_delay_ns)).max(1)
                };
                Some(Seen {
                    class,
                    used,
                    ran,
                    index,
                })
            })
            .collect()
    }

    /// The best of `seen`: by class (a thread that blocks SIGTRAP only when every one does),
    /// then a thread that blocks SIGTRAP last, then by the CPU
    /// used in the look or what its history says a look this long shows of it, whichever is
    /// more, then by wake-ups per second of life, then by thread id. Histories are read (a
    /// stat read each) in the order of CPU used in the look, only until no thread left can
    /// beat the best.
    fn best(&self, seen: &[Seen], look_ns: u64) -> Option<Seen> {
        // A thread that blocks SIGTRAP is taken only when every thread does: borrowed, it
        // cannot unblock it while stopped, and the switch is refused as busy at every try
        // (review 9, F2: glibc's timer helper, blocked for good in a call with every signal
        // blocked, beat a busy main thread on class). So the classes are tried in order until
        // one's best does not block it.
        let mut classes: Vec<Class> = seen.iter().map(|s| s.class).collect();
        classes.sort();
        classes.dedup();
        let mut fallback = None;
        for class in classes {
            let Some(b) = self.best_of_class(seen, class, look_ns) else {
                continue;
            };
            if !self.threads[b.index].history(self.pid).last_resort() {
                return Some(b);
            }
            fallback.get_or_insert(b);
        }
        fallback
    }

    /// [`Look::best`] among the threads of `class`.
    fn best_of_class(&self, seen: &[Seen], class: Class, look_ns: u64) -> Option<Seen> {
        let mut of_class: Vec<Seen> = seen.iter().filter(|s| s.class == class).copied().collect();
        of_class.sort_by_key(|s| s.used);
        // Up to 10% of a CPU over the look counts as idle (review 8's B1 thread, busy half
        // the time, stays far above), and idle threads are told apart by how often they wake:
        // a young process's main thread, whose start-up (exec, the loader: milliseconds, in a
        // life counted as 100 ms at least) shows 2-6%, must not lose to a worker that wakes
        // 500 times a second and shows 1% (review5_trampoline_copy borrowed that worker, its
        // printer, now and then). The look's early end keeps its own, stricter 5%.
        let idle = look_ns / 10;
        let bucket = |ns: u64| if ns <= idle { 0 } else { ns };
        let key = |s: &Seen| {
            let t = &self.threads[s.index];
            let h = t.history(self.pid);
            (
                h.last_resort(),
                bucket(s.used.max(h.expected_ns(look_ns))),
                h.wakes_per_s,
                t.files.tid(),
            )
        };
        let mut best: Option<(Seen, (bool, u64, u64, i32))> = None;
        for s in of_class {
            if best.is_some_and(|(_, k)| !k.0 && bucket(s.used) > k.1) {
                // It and the rest used more in the look alone: none can beat the best.
                break;
            }
            let k = key(&s);
            if best.is_none_or(|(_, b)| k < b) {
                best = Some((s, k));
            }
        }
        best.map(|(s, _)| s)
    }

    /// Whether the look may end with `best` before its last step (see the module's
    /// documentation).
    fn ends_early(&self, best: Seen, seen: &[Seen], look_ns: u64, saw_in_call: bool) -> bool {
        let blocked = match best.class {
            Class::BlockedInCall => true,
            Class::BlockedInFutex => !saw_in_call,
            Class::Main | Class::Other | Class::BlockedEintrOnStop => false,
        };
        let history = self.threads[best.index].history(self.pid);
        if !blocked || history.shunned() {
            return false;
        }
        let quiet = best.ran <= look_ns / 20 && history.share_ppm <= QUIET_SHARE_PPM;
        let idle = best.used <= look_ns / 50 || quiet;
        let clearly_best = best.used <= look_ns / 10
            && seen
                .iter()
                .filter(|s| s.class == best.class && s.index != best.index)
                .all(|s| s.used >= (2 * best.used).saturating_add(look_ns / 50));
        idle || clearly_best
    }
}

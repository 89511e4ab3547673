//! The tracer thread under SCHED_FIFO while it works on a target ([`RealTime`]).
//!
//! Why. On a small or busy machine the tracer, an ordinary thread, waits for a CPU behind the
//! target's threads after each of its sleeps: its waits for the borrowed thread, for the sync
//! agent's answers, between its looks at /proc. Measured in session 13 on this project's 2-CPU
//! VM (the `process_patch` bench, an 8-thread target, nonstop apply): of a ~2.4 ms switch the
//! tracer spent ~1.3 ms on its CPU and ~0.75 ms runnable without one (its schedstat's run
//! delay). Under SCHED_FIFO it gets a CPU as soon as it wakes — except in its waits on the
//! target's threads and in nonstop mode's int3 windows, where it must not preempt them
//! ([`Ordinary`]).
//!
//! What it costs the target. Each wake-up of a real-time thread preempts a thread of the
//! target at once when no CPU is idle, for the length of the tracer's burst. Session 4 measured
//! the longest call during a nonstop apply ~1.7x longer with the int3 window boosted, when the
//! tracer still wrote every byte itself; since the sync agent carries the windows out (session
//! 5) and the looks got shorter, the cost is small: session 13's A/B (8 rounds of 30 applies,
//! load 2.5-3.3) gave a nonstop apply median of 4.60 ms against 5.35, and the longest call
//! overlapping it 37 µs against 32 (medians of the rounds' medians).
//!
//! What it never does. The target's threads keep their policies (a tool killed meanwhile could
//! not give a target's thread its own back). Threads the tracer starts (the planner, the
//! read-ahead, the names' writer) run under the default policy (`SCHED_RESET_ON_FORK`; the
//! planner begins real-time and goes to the default policy as its first step,
//! [`HelperStartsRealTime`]). The
//! tracer sleeps between its steps and never spins on a lock another thread of ours holds
//! (iced-x86's tables are waited for asleep, `apply/iced_tables.rs`). Without the privilege
//! (CAP_SYS_NICE, or an RLIMIT_RTPRIO) nothing changes, nor on one CPU (see `several_cpus`),
//! and a thread already real-time keeps its policy and priority.

/// `SCHED_RESET_ON_FORK`: threads started by a thread with it run under the default policy.
const RESET_ON_FORK: i32 = 0x4000_0000;

/// The calling thread's policy (with its `SCHED_RESET_ON_FORK` bit) and priority.
fn scheduling() -> Option<(i32, libc::sched_param)> {
    // SAFETY: sched_param is plain old data; all-zero is a valid value.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: plain system calls on the calling thread (0); param is a valid sched_param to
    // fill.
    let policy = unsafe { libc::sched_getscheduler(0) };
    // SAFETY: as above.
    (policy >= 0 && unsafe { libc::sched_getparam(0, &mut param) } == 0).then_some((policy, param))
}

/// The calling thread runs under SCHED_FIFO (priority 1) while this lives, and gets its own
/// policy back when it is dropped (the thread may be a library caller's).
pub(crate) struct RealTime {
    /// The policy and priority, and the timer slack (which the kernel sets to 0 for a
    /// real-time thread and to the default when it is an ordinary one again).
    saved: Option<(i32, libc::sched_param, libc::c_int)>,
    /// Dropped on the thread it changed (a raw pointer makes it neither Send nor Sync).
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl RealTime {
    /// Makes the calling thread real-time, when it may be, is not already, and may run on more
    /// than one CPU.
    pub(crate) fn start() -> RealTime {
        let none = RealTime {
            saved: None,
            _this_thread: std::marker::PhantomData,
        };
        let Some((policy, param)) = scheduling() else {
            return none;
        };
        let base = policy & !RESET_ON_FORK;
        if base == libc::SCHED_FIFO || base == libc::SCHED_RR || !several_cpus() {
            return none;
        }
        // SAFETY: prctl with PR_GET_TIMERSLACK takes no pointer.
        let slack = unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
        let rt = libc::sched_param { sched_priority: 1 };
        // SAFETY: a plain system call; rt is a valid sched_param.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO | RESET_ON_FORK, &rt) } != 0 {
            return none;
        }
        RealTime {
            saved: Some((policy, param, slack)),
            _this_thread: std::marker::PhantomData,
        }
    }

    /// [`RealTime::start`] for the tracer of process `pid`: not when a thread of `pid` runs
    /// under a real-time policy itself. Such a thread, busy, would keep the tracer (priority 1,
    /// not above it) from its CPU — on every CPU it may use, for good: the kernel's share for
    /// threads under real-time load goes to ordinary threads only. Looked at once, at the
    /// start; a thread made real-time later is not seen (nor is another process's real-time
    /// thread busy on every CPU: a limit).
    pub(crate) fn beside(pid: i32) -> RealTime {
        let realtime_thread = super::observe::tasks(pid).into_iter().any(realtime_policy);
        if realtime_thread {
            return RealTime {
                saved: None,
                _this_thread: std::marker::PhantomData,
            };
        }
        RealTime::start()
    }

    /// Whether the calling thread was made real-time (false: no privilege, or it was already).
    pub(crate) fn raised(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        if let Some((policy, param, slack)) = self.saved {
            // SAFETY: plain system calls on the calling thread; param was filled by
            // sched_getparam; PR_SET_TIMERSLACK takes a value. (On the thread it changed:
            // `_this_thread`.)
            unsafe {
                // Without CAP_SYS_NICE (real-time through an RLIMIT_RTPRIO) the kernel lets a
                // thread leave SCHED_FIFO but not clear SCHED_RESET_ON_FORK: refused whole, the
                // thread would stay real-time. Its policy back, the flag kept, then.
                if libc::sched_setscheduler(0, policy, &param) != 0 {
                    libc::sched_setscheduler(0, policy | RESET_ON_FORK, &param);
                }
                if slack > 0 {
                    libc::prctl(libc::PR_SET_TIMERSLACK, slack as libc::c_ulong, 0, 0, 0);
                }
            }
        }
    }
}

/// Whether thread `tid` runs under SCHED_FIFO, SCHED_RR or SCHED_DEADLINE (false when it is
/// gone). One system call, where the policy field of its /proc `stat` took a file read: ~8 µs
/// each on this project's VM, and `beside`, on the tracer's path before its first step, read
/// one per thread (~0.1 ms of an apply to an 8-thread process, session 14).
fn realtime_policy(tid: i32) -> bool {
    // SAFETY: a plain system call; it reads another thread's policy (no privilege needed).
    let policy = unsafe { libc::sched_getscheduler(tid) };
    policy >= 0
        && matches!(
            policy & !RESET_ON_FORK,
            libc::SCHED_FIFO | libc::SCHED_RR | super::observe::SCHED_DEADLINE
        )
}

/// Whether the calling thread may run on more than one CPU. On one (a one-CPU machine, or a
/// tool confined to one by `taskset`) a real-time thread of the same or a higher priority that
/// never sleeps there — a busy thread of a real-time target, say — would keep the tracer from
/// it for good: the kernel guarantees ordinary threads a share of a CPU under real-time load
/// (5% by default), not real-time ones of lower or equal priority. Measured in review 13 with
/// both pinned to one CPU: a nonstop apply beside a `SCHED_FIFO` busy thread never ended with
/// the tracer real-time (its timeouts never ran either); ordinary, it ended. With a second CPU
/// the kernel moves a woken real-time thread to a CPU not running a higher-priority one.
fn several_cpus() -> bool {
    // SAFETY: cpu_set_t is plain old data; sched_getaffinity fills the set it is given (its
    // size passed), for the calling thread (0); CPU_COUNT only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0
            && libc::CPU_COUNT(&set) > 1
    }
}

/// The calling thread, if real-time, runs under the default policy while this lives (and is
/// real-time again when it is dropped): for the tracer's waits on the target's threads, and
/// nonstop mode's int3 windows (whose trapping threads it must not preempt: see
/// `apply/switch/nonstop.rs`, `run`).
///
/// Why. A wait that looks at the threads again and again (nonstop mode's settle and uninstall:
/// until every thread is seen blocked, or trapped, or to have run on) must not preempt them.
/// A real-time tracer waking for each look preempts whatever thread of the target runs on its
/// CPU, in the middle of its work: that thread is then runnable at the look, and at the next,
/// and never seen blocked. Session 13, with a compiler busy on the other CPU: the entries'
/// settle of the bench's apply took 8.2 ms (median) with a real-time tracer, against 0.8 ms at
/// the default policy, and the longest call overlapping the apply 130-225 µs against 11-47.
/// At the default policy the tracer's wake-ups wait for those threads' short bursts to end.
pub(crate) struct Ordinary {
    _back: PolicyBack,
}

impl Ordinary {
    /// Makes the calling thread ordinary if it runs under SCHED_FIFO.
    pub(crate) fn during() -> Ordinary {
        let back = PolicyBack::change_fifo(|policy, _| {
            let plain = libc::sched_param { sched_priority: 0 };
            Some((libc::SCHED_OTHER | (policy & RESET_ON_FORK), plain))
        });
        if back.saved.is_some() {
            // Back from real-time the kernel gives the thread the default timer slack (50 µs),
            // which stretched each sleep between the looks these waits take: 1 ns, as
            // `timer_slack::Precise` holds it for an ordinary tracer (a real-time one has none;
            // real-time again at the end, it has none again).
            // SAFETY: PR_SET_TIMERSLACK takes a value, no pointer.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        }
        Ordinary { _back: back }
    }
}

/// A change of the calling thread's policy, undone when this is dropped (on the thread it
/// changed: a raw pointer makes it neither Send nor Sync).
struct PolicyBack {
    /// The policy (with its `SCHED_RESET_ON_FORK` bit) and priority before the change.
    saved: Option<(i32, libc::sched_param)>,
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl PolicyBack {
    /// When the calling thread runs under SCHED_FIFO: the policy and priority `to` gives for
    /// its own (none: no change), set; nothing either when the kernel refuses.
    fn change_fifo(
        to: impl FnOnce(i32, libc::sched_param) -> Option<(i32, libc::sched_param)>,
    ) -> PolicyBack {
        let mut back = PolicyBack {
            saved: None,
            _this_thread: std::marker::PhantomData,
        };
        let Some((policy, param)) = scheduling() else {
            return back;
        };
        if policy & !RESET_ON_FORK != libc::SCHED_FIFO {
            return back;
        }
        let Some((new, new_param)) = to(policy, param) else {
            return back;
        };
        // SAFETY: a plain system call on the calling thread; new_param is a valid
        // sched_param.
        if unsafe { libc::sched_setscheduler(0, new, &new_param) } == 0 {
            back.saved = Some((policy, param));
        }
        back
    }
}

impl Drop for PolicyBack {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.saved {
            // SAFETY: a plain system call on the calling thread; param was filled by
            // sched_getparam. (On the thread it changed: `_this_thread`.)
            unsafe { libc::sched_setscheduler(0, policy, &param) };
        }
    }
}

/// Raises the calling thread, a helper the tracer waits for (the planner), to nice -20 when
/// it may (no change without CAP_SYS_NICE), under the default policy — also when it began
/// real-time ([`HelperStartsRealTime`]). Not real-time: a helper may meet iced-x86's tables
/// being built by another thread and spin on their lock, and a real-time spinner can keep the
/// builder from a CPU for good on a machine with one; at nice -20 it is only favoured. Under
/// the tracer's `SCHED_RESET_ON_FORK` it would otherwise wait behind the target's threads:
/// session 13 measured the planner ~0.4 ms later at the default nice (the bench's 8-thread
/// target), the tracer waiting for it. Its thread ends with its work: nothing is given back.
pub(crate) fn favour_helper() {
    if let Some((policy, _)) = scheduling() {
        if policy & !RESET_ON_FORK == libc::SCHED_FIFO {
            let plain = libc::sched_param { sched_priority: 0 };
            // SAFETY: a plain system call on the calling thread; plain is a valid sched_param.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER | RESET_ON_FORK, &plain) };
        }
    }
    // SAFETY: a plain system call on the calling thread (Linux keeps a nice value per thread).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -20) };
}

/// While this lives, a thread the calling thread starts begins under its real-time policy:
/// the calling thread, real-time with `SCHED_RESET_ON_FORK`, drops the flag. For the planner,
/// which goes to the default policy (nice -20) as its first step ([`favour_helper`]).
///
/// Why. A thread started under the default policy waits for its first turn on a CPU behind
/// whatever runs there: traced in session 14 (the bench's 8-thread target, nonstop apply), the
/// planner's run delay was 120–600 µs, most of it before its first instruction (it ran once,
/// never preempted), while the tracer waited for its plan. Started real-time it runs at once.
/// Nothing changes when the flag cannot be dropped (real-time through an RLIMIT_RTPRIO,
/// without CAP_SYS_NICE) or the thread is not real-time.
pub(crate) struct HelperStartsRealTime {
    _back: PolicyBack,
}

impl HelperStartsRealTime {
    pub(crate) fn during() -> HelperStartsRealTime {
        HelperStartsRealTime {
            _back: PolicyBack::change_fifo(|policy, param| {
                (policy & RESET_ON_FORK != 0).then_some((libc::SCHED_FIFO, param))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> i32 {
        // SAFETY: a plain system call on the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    /// Root here: the thread is real-time while it lives, its threads are not, and it gets its
    /// policy back.
    #[test]
    fn the_thread_is_fifo_while_held_its_threads_are_not_and_it_gets_its_policy_back() {
        std::thread::spawn(|| {
            let before = policy();
            // SAFETY: PR_SET/GET_TIMERSLACK take a value, no pointer.
            let slack = || unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
            // SAFETY: as above.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 7000 as libc::c_ulong, 0, 0, 0) };
            let rt = RealTime::start();
            assert!(rt.raised(), "root may make a thread real-time");
            assert_eq!(policy() & !RESET_ON_FORK, libc::SCHED_FIFO);
            let child = std::thread::spawn(policy).join().unwrap();
            assert_eq!(
                child,
                libc::SCHED_OTHER,
                "a thread it starts runs ordinarily"
            );
            drop(rt);
            assert_eq!(policy(), before);
            assert_eq!(slack(), 7000, "its own timer slack back");
        })
        .join()
        .unwrap();
    }

    /// Real-time through an RLIMIT_RTPRIO, without CAP_SYS_NICE (an unprivileged user whose
    /// limits allow it): the thread is an ordinary one again at the end, though the kernel
    /// refuses such a thread to clear SCHED_RESET_ON_FORK. (Here the thread is made real-time
    /// with the capability, then drops it: the same state at the end, where raising the limit
    /// needs CAP_SYS_RESOURCE, which root may not have.)
    #[test]
    fn a_thread_without_cap_sys_nice_at_the_end_gets_its_policy_back() {
        std::thread::spawn(|| {
            let before = policy();
            let rt = RealTime::start();
            assert!(rt.raised(), "root may make a thread real-time");
            assert!(crate::process::capabilities::drop_sys_nice());
            drop(rt);
            assert_eq!(
                policy() & !RESET_ON_FORK,
                before,
                "the thread stayed real-time"
            );
        })
        .join()
        .unwrap();
    }

    /// A helper started under `HelperStartsRealTime` begins real-time, and `favour_helper`
    /// makes it an ordinary thread at nice -20; the starting thread gets its
    /// `SCHED_RESET_ON_FORK` back, and threads it starts afterwards begin ordinary again.
    #[test]
    fn a_helper_begins_real_time_then_is_favoured_under_the_default_policy() {
        std::thread::spawn(|| {
            let rt = RealTime::start();
            assert!(rt.raised(), "root may make a thread real-time");
            let before = policy();
            assert_ne!(before & RESET_ON_FORK, 0);
            let (first, favoured, nice) = {
                let _starts = HelperStartsRealTime::during();
                assert_eq!(policy(), libc::SCHED_FIFO, "the flag dropped meanwhile");
                std::thread::spawn(|| {
                    let first = policy();
                    favour_helper();
                    // SAFETY: plain system calls on the calling thread.
                    let nice = unsafe {
                        libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
                    };
                    (first, policy(), nice)
                })
                .join()
                .unwrap()
            };
            assert_eq!(first, libc::SCHED_FIFO, "the helper began real-time");
            assert_eq!(favoured & !RESET_ON_FORK, libc::SCHED_OTHER);
            assert_eq!(nice, -20);
            assert_eq!(policy(), before, "the starting thread's flag back");
            let later = std::thread::spawn(policy).join().unwrap();
            assert_eq!(later, libc::SCHED_OTHER, "a thread started afterwards");
        })
        .join()
        .unwrap();
    }

    /// `beside`'s look at a target thread's policy: SCHED_RR with SCHED_RESET_ON_FORK counts
    /// as real-time, an ordinary thread does not, nor a thread that is gone.
    #[test]
    fn a_real_time_thread_is_told_from_an_ordinary_one_and_a_gone_one() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            go_rx.recv().unwrap();
        });
        let tid = tid_rx.recv().unwrap();
        assert!(!realtime_policy(tid), "an ordinary thread");
        let rr = libc::sched_param { sched_priority: 1 };
        // SAFETY: a plain system call on a thread of ours; rr is a valid sched_param.
        let set = unsafe { libc::sched_setscheduler(tid, libc::SCHED_RR | RESET_ON_FORK, &rr) };
        assert_eq!(set, 0, "root may make a thread real-time");
        assert!(realtime_policy(tid), "SCHED_RR, with SCHED_RESET_ON_FORK");
        go_tx.send(()).unwrap();
        thread.join().unwrap();
        // `join` returns before the kernel unlists the thread (see `wait_until_reaped`).
        let listed = format!("/proc/self/task/{tid}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::path::Path::new(&listed).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Its id is not reused this soon (ids are handed out in increasing order).
        assert!(!realtime_policy(tid), "a thread that is gone");
    }

    /// Confined to one CPU (see `several_cpus`), the thread stays an ordinary one.
    #[test]
    fn a_thread_confined_to_one_cpu_stays_ordinary() {
        std::thread::spawn(|| {
            // SAFETY: sched_getcpu takes nothing; cpu_set_t is plain old data, filled by
            // CPU_SET and read by sched_setaffinity (its size passed) for the calling thread.
            unsafe {
                let cpu = libc::sched_getcpu();
                assert!(cpu >= 0);
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu as usize, &mut one);
                assert_eq!(
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one),
                    0
                );
            }
            let before = policy();
            let rt = RealTime::start();
            assert!(!rt.raised(), "made real-time on one CPU");
            assert_eq!(policy(), before);
        })
        .join()
        .unwrap();
    }

    /// A real-time thread is ordinary while an `Ordinary` lives, real-time again after; an
    /// ordinary thread stays as it is.
    #[test]
    fn ordinary_for_a_while() {
        std::thread::spawn(|| {
            let plain = policy();
            drop(Ordinary::during());
            assert_eq!(policy(), plain);
            let rt = RealTime::start();
            assert!(rt.raised());
            {
                let _o = Ordinary::during();
                assert_eq!(policy() & !RESET_ON_FORK, libc::SCHED_OTHER);
            }
            assert_eq!(policy() & !RESET_ON_FORK, libc::SCHED_FIFO);
        })
        .join()
        .unwrap();
    }

    /// While an `Ordinary` lives the tracer's sleeps stay as short as asked: back from
    /// real-time, a thread gets the default timer slack (50 µs) from the kernel, which
    /// stretched every sleep of the settle's and the uninstall's looks (see
    /// `apply/switch/nonstop/timer_slack.rs`, whose 1 ns a real-time thread cannot hold).
    #[test]
    fn an_ordinary_stretch_sleeps_precisely() {
        std::thread::spawn(|| {
            // SAFETY: PR_GET_TIMERSLACK takes no pointer.
            let slack = || unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
            let rt = RealTime::start();
            assert!(rt.raised());
            {
                let _o = Ordinary::during();
                assert_eq!(slack(), 1, "the default slack while ordinary");
            }
            drop(rt);
        })
        .join()
        .unwrap();
    }

    /// A thread real-time already is left as it is (and as it is after).
    #[test]
    fn a_real_time_thread_keeps_its_own_priority() {
        std::thread::spawn(|| {
            let p = libc::sched_param { sched_priority: 3 };
            // SAFETY: a plain system call; p is a valid sched_param.
            assert_eq!(
                unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &p) },
                0
            );
            let rt = RealTime::start();
            assert!(!rt.raised());
            drop(rt);
            assert_eq!(policy(), libc::SCHED_RR);
        })
        .join()
        .unwrap();
    }
}

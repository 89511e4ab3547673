//! Nonstop mode's courtesy to the target: the tool's thread gives way to the target's threads
//! for the CPUs.
//!
//! Why. In nonstop mode the target's threads keep running while the tool works beside them,
//! and what a thread sees as a stall is mostly a wait for a CPU. A thread preempted in the
//! middle of a call (by another of its process's threads waking up: that happens without us
//! too) waits behind everything runnable on its CPU — and during an apply the tool is there,
//! with bursts of tens of microseconds (reads of /proc, ptrace round trips). Traced on this
//! project's 2-CPU VM (`perf record -e sched:sched_switch`, `process_patch`'s target): the
//! longest calls overlapping a nonstop apply (100–290 µs) were such waits, with the tool's
//! bursts of 60–66 µs inside them.
//!
//! So a nonstop switch runs the tool's thread at the weakest nice value, 19: the scheduler then
//! runs a runnable thread of the target before it, and the tool works in the CPU time the
//! target leaves idle. Threads the tool starts afterwards inherit it. The sync agent, which
//! writes the int3 windows' bytes and makes their syncs inside the target, keeps its own
//! SCHED_FIFO: the windows stay as short as before (the int3s cost a trap per call while they
//! last). On a machine the target saturates the apply takes longer (it still gets its share:
//! nice 19 is a small weight, not an idle class), which nonstop mode accepts: its point is the
//! target's threads going on undisturbed.
//!
//! Not in stop mode, where every thread of the target waits for the tool while it is stopped;
//! not when the caller runs at a raised priority (`livepatch --boost`, a negative nice: it asked
//! for the opposite); not below the nice value the caller has (never raised by us).

use super::Mode;

/// The nice value a nonstop switch runs the tool's thread at.
pub(crate) const NONSTOP_NICE: i32 = 19;

/// Lowers the calling thread's priority for an apply or revert in `mode` (see the module
/// documentation). The thread keeps it until it ends: the library's switches run on a tracer
/// thread of their own, the command line's on a process that exits after one switch.
pub(crate) fn give_way_in(mode: Mode) {
    if mode != Mode::Nonstop {
        return;
    }
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // getpriority returns the nice value, which can be -1: errno tells an error apart.
    // SAFETY: errno location of this thread; getpriority reads no memory of ours.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() != 0 {
            return;
        }
        n
    };
    if (0..NONSTOP_NICE).contains(&nice) {
        // SAFETY: a plain system call on our own thread id. Raising one's own nice value needs
        // no privilege; a failure leaves the priority as it was, which is only less courteous.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, NONSTOP_NICE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        // SAFETY: as in give_way_in.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    #[test]
    fn nonstop_lowers_the_thread_and_stop_does_not() {
        let stop = std::thread::spawn(|| {
            let before = nice_of_this_thread();
            give_way_in(Mode::Stop);
            (before, nice_of_this_thread())
        })
        .join()
        .unwrap();
        assert_eq!(stop.0, stop.1);
        let nonstop = std::thread::spawn(|| {
            give_way_in(Mode::Nonstop);
            let mine = nice_of_this_thread();
            // A thread started afterwards inherits it.
            let child = std::thread::spawn(nice_of_this_thread).join().unwrap();
            (mine, child)
        })
        .join()
        .unwrap();
        assert_eq!(nonstop, (NONSTOP_NICE, NONSTOP_NICE));
        // Only the thread that switched: this one is as it was.
        assert_eq!(nice_of_this_thread(), stop.0);
    }

    #[test]
    fn a_raised_priority_is_left_alone() {
        let kept = std::thread::spawn(|| {
            // SAFETY: as in give_way_in; as root (the tests' case) a negative nice is allowed.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -5) } != 0 {
                return None; // not privileged: nothing to show
            }
            give_way_in(Mode::Nonstop);
            Some(nice_of_this_thread())
        })
        .join()
        .unwrap();
        if let Some(n) = kept {
            assert_eq!(n, -5);
        }
    }
}

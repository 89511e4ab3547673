//! A signal the tool took from a thread and holds back, to send again once the thread runs its
//! own code.
//!
//! A thread we use (a remote system call or function call, a single-step, the sync agent's
//! start-up) may stop in a signal-delivery stop on the way: the signal is already dequeued,
//! and it must not run the program's handler on our registers. We resume the thread without
//! it and hold it. Re-sent with `tgkill`, the handler would see `si_code` SI_TKILL and our
//! pid and uid: a `sigqueue()` value (`si_value`) and a POSIX timer's id and overrun would be
//! lost. So the signal's siginfo is read at that stop (PTRACE_GETSIGINFO) and kept with it,
//! and it is sent again with `rt_tgsigqueueinfo` and that siginfo, which the program then
//! receives as it was sent.
//!
//! The kernel lets a process forge only the codes a program may send itself: `si_code < 0`
//! other than SI_TKILL (SI_QUEUE, SI_TIMER, SI_MESGQ, SI_ASYNCIO, SI_SIGIO...). For the others
//! — `kill()` (SI_USER), `tgkill()` (SI_TKILL), the kernel's own (SI_KERNEL, SIGCHLD's codes,
//! faults) — it refuses (EPERM): those go with `tgkill`, and the handler sees SI_TKILL and our
//! pid (a kernel limit; the signal itself is neither lost nor duplicated).
//!
//! Order: queued signals of one number reach a handler in the order they were sent (FIFO, as
//! POSIX asks of real-time signals). A thread's held signals are sent again together, in the
//! order they were taken ([`HeldSignal::taken_before`]), into its own queue, which the kernel
//! empties before the process-wide one where later signals wait. Those held apart (nonstop's
//! sync-agent start-up) join the thread's others (`Tracee::hold`): sent on their own, ahead of
//! older ones, they came out of order.
//!
//! A signal met while the tool lets a thread go (its signal-delivery stop reported then) is not
//! held: the thread is resumed or detached with it, and the kernel keeps its siginfo.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Signals taken so far by this process: each one's number in that order.
static TAKEN: AtomicU64 = AtomicU64::new(0);

/// A held-back signal and the siginfo it came with.
#[derive(Clone, Copy)]
pub(crate) struct HeldSignal {
    sig: i32,
    /// None when it could not be read (the thread died meanwhile, say): sent with `tgkill`.
    info: Option<libc::siginfo_t>,
    /// When it was taken, among every signal taken (see [`TAKEN`]).
    taken: u64,
}

impl fmt::Debug for HeldSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldSignal")
            .field("sig", &self.sig)
            .field("si_code", &self.info.map(|i| i.si_code))
            .field("taken", &self.taken)
            .finish()
    }
}

impl HeldSignal {
    /// Takes signal `sig` from thread `tid`, which must be in the signal-delivery stop of that
    /// signal (the caller resumes it without the signal next): its siginfo is read now, the
    /// last moment it exists.
    pub(crate) fn take(tid: i32, sig: i32) -> HeldSignal {
        HeldSignal {
            sig,
            info: get_siginfo(tid).ok().filter(|i| i.si_signo == sig),
            taken: TAKEN.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Whether this signal was taken before `other` (both are sent again in that order).
    pub(crate) fn taken_before(&self, other: &HeldSignal) -> bool {
        self.taken < other.taken
    }

    /// Sends the signal again to thread `tid` of process `pid`: with its siginfo when the
    /// kernel lets us (see the module documentation), with `tgkill` otherwise. An error only
    /// when neither could queue it (the thread is gone).
    pub(crate) fn resend(&self, pid: i32, tid: i32) -> io::Result<()> {
        if let Some(info) = self.info.filter(|i| forgeable(i.si_code)) {
            // SAFETY: rt_tgsigqueueinfo only reads the siginfo_t `info` points to (a full,
            // initialized one, as the kernel gave it) and queues a signal to a thread of the
            // target.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_rt_tgsigqueueinfo,
                    pid,
                    tid,
                    self.sig,
                    &info as *const libc::siginfo_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            // Refused all the same (a kernel stricter than the rule above): not lost, at
            // least.
        }
        // SAFETY: tgkill takes plain integers and only sends a signal to a thread of the target.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, self.sig) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Whether the kernel lets another process send a signal with `si_code` (rt_tgsigqueueinfo's
/// check: no code a kernel or a `kill`/`tgkill` sets, which carry trusted sender fields).
fn forgeable(si_code: i32) -> bool {
    si_code < 0 && si_code != libc::SI_TKILL
}

/// The siginfo of the signal thread `tid` (in a signal-delivery stop) is about to take.
fn get_siginfo(tid: i32) -> io::Result<libc::siginfo_t> {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `data` points to a writable siginfo_t, which the kernel fills (128 bytes).
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGINFO,
            tid,
            0usize,
            &mut info as *mut libc::siginfo_t,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_codes_a_program_may_send_itself_are_forged() {
        const SI_TIMER: i32 = -2;
        const SI_MESGQ: i32 = -3;
        const SI_ASYNCIO: i32 = -4;
        const SI_SIGIO: i32 = -5;
        for code in [libc::SI_QUEUE, SI_TIMER, SI_MESGQ, SI_ASYNCIO, SI_SIGIO] {
            assert!(forgeable(code), "{code}");
        }
        // kill(), tgkill(), the kernel's (SI_KERNEL, a fault's, SIGCHLD's CLD_EXITED).
        for code in [libc::SI_USER, libc::SI_TKILL, libc::SI_KERNEL, 1, 2] {
            assert!(!forgeable(code), "{code}");
        }
    }
}

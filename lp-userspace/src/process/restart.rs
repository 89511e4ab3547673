//! Letting a stopped thread go back into the system call our stop interrupted, without losing
//! the EINTR of a signal that comes meanwhile.
//!
//! A thread blocked in an interruptible call (`read()`, `nanosleep()`...) that we stop leaves
//! the call with a restart code (-ERESTARTSYS and friends) and stops inside the kernel's signal
//! path. When it runs on with no signal to take, the kernel restarts the call: it puts the
//! thread's `rip` back on its `syscall` instruction and returns to user mode, which enters the
//! call again. A signal that comes in between — microseconds, longer when the thread loses its
//! CPU on the way — finds the thread *outside* the call: its handler runs, and the call is then
//! entered again and waits on. The program never left its `read()`, yet a signal without
//! SA_RESTART did not end it: the EINTR is lost (tests/e2e_borrowed_signals.rs makes the
//! fixture send a signal exactly then). Without a tracer the kernel never restarts a blocked
//! call without a signal, so this is ours to prevent.
//!
//! So such a thread is let go under PTRACE_SYSCALL and followed until it stops at a system
//! call's entry: the restarted one, back inside (from there a signal ends it as usual). A
//! signal that stops it first, at the restart point, is one that came in between: its
//! registers are put back as they were in our stop (the restart code, `rip` after the
//! `syscall`, the call's number), so that the kernel's delivery makes the decision it would
//! have made had the signal found the thread waiting — EINTR for a handler without SA_RESTART,
//! a restart with one.

use super::ptrace::{self, Regs, WaitStatus};
use super::{observe, ProcessError, Result, Tracee};
use std::time::{Duration, Instant};

/// How long a thread may take to get back into its system call before we stop following it
/// (it is then stopped and let go as before: the restart is the kernel's, unwatched). It needs
/// only a CPU: this is a bound for a thread that does not get one, or blocks on the way (a
/// page fault served by another thread, say).
const WALK_WAIT: Duration = Duration::from_millis(250);

/// What becomes of a thread let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// It runs on, still traced.
    Resume,
    /// It is detached.
    Detach,
    /// It is detached, but once followed back into its system call it runs on instead, traced
    /// until the tracer thread exits, when the kernel detaches it without a stop (see
    /// `with_tracer_thread`): PTRACE_DETACH wakes the stopped thread with the signal-pending
    /// flag set, which ends the call it is about to enter at once (-ERESTARTSYS, no signal):
    /// one more restart, unwatched. Only for a tracer thread that exits next.
    Leave,
}

/// A thread let go that must still be seen back inside the call our stop interrupted
/// ([`Tracee::finish_let_go`]).
#[derive(Debug)]
pub(super) struct Walk {
    /// Its registers in our stop: the call's number, its restart code, `rip` after the call.
    interrupted: Regs,
    how: Release,
}

/// The restart codes of an interrupted call that a signal's handler may turn into EINTR
/// (-ERESTARTNOINTR is always restarted: nothing to lose).
const ERESTARTSYS: i64 = -512;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

/// Whether a thread stopped with `regs` is inside a system call that the kernel restarts when
/// the thread runs on without a signal.
fn restart_pending(regs: &Regs) -> bool {
    (regs.orig_rax as i64) >= 0
        && matches!(
            regs.rax as i64,
            ERESTARTSYS | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
        )
}

impl Tracee {
    /// Lets the stopped thread `tid` go (`how`), delivering `sig`. When it goes back into an
    /// interrupted system call it is followed there: its reports go to [`Tracee::walk_on`]
    /// (through `handle_report`) and the caller must [`Tracee::finish_let_go`], after letting
    /// the other threads go (the way back of one may need another).
    pub(super) fn let_go(&mut self, tid: i32, sig: i32, how: Release) -> Result<()> {
        if sig == 0 {
            if let Ok(regs) = ptrace::get_regs(tid) {
                if restart_pending(&regs) && ptrace::syscall(tid).is_ok() {
                    self.walks.insert(
                        tid,
                        Walk {
                            interrupted: regs,
                            how,
                        },
                    );
                    return Ok(());
                }
            }
        }
        self.let_go_plainly(tid, sig, how)
    }

    /// Resumes or detaches `tid` with `sig`, as ptrace does.
    fn let_go_plainly(&mut self, tid: i32, sig: i32, how: Release) -> Result<()> {
        let r = match how {
            Release::Resume => ptrace::cont(tid, sig),
            Release::Detach | Release::Leave => ptrace::detach(tid, sig),
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => self.gone_while_let_go(tid, how),
            Err(e) => Err(ProcessError::from_ptrace(
                match how {
                    Release::Resume => "CONT",
                    Release::Detach | Release::Leave => "DETACH",
                },
                self.pid,
                tid,
                e,
            )),
        }
    }

    /// Follows the threads let go ([`Tracee::let_go`]) until each is inside its system call
    /// again (see the module documentation), and lets them go for good.
    pub(super) fn finish_let_go(&mut self) -> Result<()> {
        let deadline = Instant::now() + WALK_WAIT;
        let mut pause = Duration::from_micros(10);
        let mut first_err = None;
        while !self.walks.is_empty() {
            match ptrace::wait(-1, true) {
                Ok(Some((who, st))) => {
                    if self.walks.contains_key(&who) || self.threads.contains_key(&who) {
                        if let Err(e) = self.handle_report(who, st) {
                            first_err.get_or_insert(e);
                        }
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    for (tid, walk) in std::mem::take(&mut self.walks) {
                        if let Err(e) = self.gone_while_let_go(tid, walk.how) {
                            first_err.get_or_insert(e);
                        }
                    }
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(ProcessError::from_ptrace("WAIT", self.pid, -1, e));
                    break;
                }
            }
            if Instant::now() >= deadline {
                // Not back within WALK_WAIT: stopped and let go unwatched.
                for (tid, walk) in std::mem::take(&mut self.walks) {
                    if let Err(e) = self.abandon_walk(tid, walk.how) {
                        first_err.get_or_insert(e);
                    }
                }
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        first_err.map_or(Ok(()), Err)
    }

    /// One report `st` of thread `tid` on its way back ([`Tracee::let_go`]).
    pub(super) fn walk_on(&mut self, tid: i32, walk: Walk, st: WaitStatus) -> Result<()> {
        let Walk { interrupted, how } = walk;
        match st {
            // At a call's entry: the restarted one, inside again (or, after a signal delivered
            // to a handler, a call of that handler).
            WaitStatus::Syscall if how == Release::Leave => match ptrace::cont(tid, 0) {
                Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                    Err(ProcessError::from_ptrace("CONT", self.pid, tid, e))
                }
                _ => Ok(()),
            },
            WaitStatus::Syscall => self.let_go_plainly(tid, 0, how),
            WaitStatus::Signal(sig) => {
                if let Ok(mut regs) = ptrace::get_regs(tid) {
                    // Restarted already: the signal came in between. Back to the state of a
                    // thread that waits in the call (a page fault on the way leaves orig_rax
                    // at -1: the call's number goes back too).
                    if regs.rip == interrupted.rip.wrapping_sub(2) {
                        regs.rip = interrupted.rip;
                        regs.rax = interrupted.rax;
                        regs.orig_rax = interrupted.orig_rax;
                        let _ = ptrace::set_regs(tid, &regs);
                    }
                }
                // A handler runs: the kernel decides now, with those registers.
                if observe::process_signal_mask(self.pid, &["SigCgt"]) & observe::bit(sig) != 0 {
                    return self.let_go_plainly(tid, sig, how);
                }
                // Ignored (restarted again), a stop, or death: followed on.
                match ptrace::syscall_delivering(tid, sig) {
                    Ok(()) => {
                        self.walks.insert(tid, Walk { interrupted, how });
                        Ok(())
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        self.gone_while_let_go(tid, how)
                    }
                    Err(e) => Err(ProcessError::from_ptrace("SYSCALL", self.pid, tid, e)),
                }
            }
            // A group stop (SIGSTOP) or another event: left in it, as ptrace would leave a
            // thread we had resumed; detached there, it stays stopped.
            WaitStatus::EventStop | WaitStatus::OtherEvent(_) => match how {
                Release::Resume => {
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.stopped = true;
                    }
                    Ok(())
                }
                Release::Detach | Release::Leave => self.let_go_plainly(tid, 0, how),
            },
            WaitStatus::Gone => self.gone_while_let_go(tid, how),
        }
    }

    /// Stops a thread that did not get back into its call in time and lets it go unwatched.
    fn abandon_walk(&mut self, tid: i32, how: Release) -> Result<()> {
        if ptrace::interrupt(tid).is_err() {
            return self.gone_while_let_go(tid, how);
        }
        match self.wait_for(tid)? {
            WaitStatus::Gone => self.gone_while_let_go(tid, how),
            WaitStatus::Signal(s) => self.let_go_plainly(tid, s, how),
            _ => self.let_go_plainly(tid, 0, how),
        }
    }

    fn gone_while_let_go(&mut self, tid: i32, how: Release) -> Result<()> {
        match how {
            Release::Resume => self.thread_gone(tid),
            Release::Detach | Release::Leave => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calls_a_handler_may_interrupt_are_followed() {
        // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
        let mut regs: Regs = unsafe { std::mem::zeroed() };
        regs.orig_rax = libc::SYS_read as u64;
        for (code, followed) in [(-512i64, true), (-513, false), (-514, true), (-516, true)] {
            regs.rax = code as u64;
            assert_eq!(restart_pending(&regs), followed, "{code}");
        }
        regs.rax = -4i64 as u64; // EINTR: done, nothing to restart
        assert!(!restart_pending(&regs));
        regs.rax = -512i64 as u64;
        regs.orig_rax = u64::MAX; // not in a system call (a fault, an interrupt)
        assert!(!restart_pending(&regs));
    }
}

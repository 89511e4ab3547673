//! Function calls run inside the target by borrowing one of its stopped threads: its general
//! and extended (x87/SSE/AVX) registers are saved, it is sent to the function with the
//! arguments in the SysV registers and a return address in our resume stub (`stub.rs`), it
//! runs until it stops at the stub's system call, and every register is restored exactly.
//!
//! Only the borrowed thread runs our call; the others keep running (or stay stopped), so a
//! lock the callee needs is released by whoever holds it. A call that does not return within
//! its timeout (e.g. the borrowed thread itself held that lock) is abandoned: the thread is
//! stopped and put back exactly where it was.

use super::error::{ProcessError, Result};
use super::ptrace::{self, Regs, WaitStatus};
use super::Tracee;
use std::time::{Duration, Instant};

/// Bytes left untouched below the borrowed thread's stack pointer (the SysV red zone is 128;
/// the rest is a margin for frames being built there).
const STACK_GAP: u64 = 512;

/// Size of the buffer for the thread's extended state (XSAVE area: 2.7 KiB with AVX-512).
const XSTATE_MAX: usize = 8192;

/// NT_X86_XSTATE: the regset holding x87, SSE, AVX and later state.
const NT_X86_XSTATE: libc::c_int = 0x202;

/// Signals raised by the instruction a thread executes: delivering one during our call would
/// kill the thread (or run a handler on our frame), so the call is abandoned instead.
const SYNCHRONOUS: [i32; 4] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];

/// The extended register state of a stopped thread, as the kernel gave it.
struct XState(Vec<u8>);

fn get_xstate(tid: i32) -> std::io::Result<XState> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, writable and XSTATE_MAX long; the kernel writes at most
    // iov_len bytes and shortens iov_len to what it wrote.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(iov.iov_len);
    Ok(XState(buf))
}

fn set_xstate(tid: i32, x: &XState) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: x.0.as_ptr() as *mut libc::c_void,
        iov_len: x.0.len(),
    };
    // SAFETY: `iov` describes the bytes GETREGSET returned; the kernel only reads them.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where a remote function call returns.
#[derive(Debug, Clone, Copy)]
enum CallEnd {
    /// Our stub's call return (the return address), stopped at its system call (rip there).
    Stub(u64, u64),
    /// An `int3` byte: the thread stops with SIGTRAP there.
    Trap(u64),
}

impl CallEnd {
    fn return_address(self) -> u64 {
        match self {
            CallEnd::Stub(ret, _) => ret,
            CallEnd::Trap(trap) => trap,
        }
    }
}

/// The registers that make a thread stopped with `saved` enter `func` with `args`, its stack
/// pointer at `ret_slot` (which holds the return address).
pub(crate) fn prepare(saved: &Regs, func: u64, args: &[u64], ret_slot: u64) -> Regs {
    let mut regs = *saved;
    regs.rip = func;
    regs.rsp = ret_slot;
    regs.rax = 0;
    // Not an interrupted system call: the kernel must not restart one under us.
    regs.orig_rax = u64::MAX;
    let slots = [
        &mut regs.rdi,
        &mut regs.rsi,
        &mut regs.rdx,
        &mut regs.rcx,
        &mut regs.r8,
        &mut regs.r9,
    ];
    for (slot, &v) in slots.into_iter().zip(args) {
        *slot = v;
    }
    // The ABI wants the direction flag clear at a call; no single-stepping either.
    regs.eflags &= !((1 << 10) | (1 << 8));
    regs
}

/// Where the return address goes below `rsp`: at function entry `rsp + 8` is 16-aligned.
pub(crate) fn return_slot(rsp: u64) -> u64 {
    ((rsp - STACK_GAP) & !15) - 8
}

impl Tracee {
    /// Calls `func(args...)` (at most 6 integer arguments) inside the target and returns its
    /// `rax`. The call returns into our resume stub (see `stub.rs`), where the tool stops the
    /// thread at a system call; should the tool be killed meanwhile, the stub gives the thread
    /// its own registers back by itself. `trap` (the address of an `int3` byte in executable
    /// memory that no thread runs otherwise) is the return address instead only when the
    /// thread's extended state does not fit the stub's slot. The borrowed thread's registers,
    /// general and extended, are restored exactly, whatever happens.
    pub fn call_function(
        &mut self,
        what: &str,
        func: u64,
        args: &[u64],
        trap: u64,
        timeout: Duration,
    ) -> Result<u64> {
        assert!(args.len() <= 6, "at most 6 register arguments");
        let slot = self.stub_slot()?;
        let tid = self.borrowable_thread()?;
        // The stub ends the call with a getpid (the callee's own system calls are not vetted).
        self.vet_syscall(tid, libc::SYS_getpid, [0; 6], slot.call_return_stop())?;
        let saved = self.regs(tid)?;
        let xstate = get_xstate(tid)
            .map_err(|e| ProcessError::from_ptrace("GETREGSET", self.pid, tid, e))?;
        let end = if slot.guard_xstate(&self.mem, &xstate.0)? {
            slot.guard(&self.mem, &saved)?;
            CallEnd::Stub(slot.call_return(), slot.call_return_stop())
        } else {
            CallEnd::Trap(trap)
        };
        let ret_slot = return_slot(saved.rsp);
        self.mem
            .write(ret_slot, &end.return_address().to_le_bytes())?;
        self.set_regs(tid, &prepare(&saved, func, args, ret_slot))?;
        super::stop_point::reached("remote-call");
        let outcome = self.run_call(tid, what, end, timeout);
        // Put the thread back exactly as it was, whatever happened (unless it is gone).
        if let Some(t) = self.threads.get_mut(&tid) {
            // Returned through the stub: it sits in a syscall-exit stop, where an interrupted
            // call of its own needs fix_restart (as after a remote system call).
            if matches!(end, CallEnd::Stub(..)) {
                t.after_remote_syscall = true;
            }
            self.set_regs(tid, &saved)?;
            set_xstate(tid, &xstate)
                .map_err(|e| ProcessError::from_ptrace("SETREGSET", self.pid, tid, e))?;
        }
        outcome
    }

    /// A thread to run a call on, left stopped. Preferred: one blocked in a system call other
    /// than futex (sleeping, reading...): it holds no lock of libc's or libgcc's that our call
    /// could need (a thread stopped inside malloc would deadlock on itself when the callee
    /// allocates). Threads looked at and not chosen are let go again.
    fn borrowable_thread(&mut self) -> Result<i32> {
        let first = self.stop_any()?;
        if self.idle_in_syscall(first) {
            return Ok(first);
        }
        for tid in self.threads() {
            let was_stopped = self.threads.get(&tid).is_some_and(|t| t.stopped);
            if tid == first || self.stop_thread(tid).is_err() {
                continue;
            }
            if self.idle_in_syscall(tid) {
                return Ok(tid);
            }
            if !was_stopped {
                self.resume_thread(tid)?;
            }
        }
        Ok(first)
    }

    fn idle_in_syscall(&self, tid: i32) -> bool {
        self.regs(tid).is_ok_and(|r| {
            let nr = r.orig_rax as i64;
            nr >= 0 && nr != libc::SYS_futex
        })
    }

    /// Lets `tid` run the call until it returns to `end`; returns its result then. The thread
    /// is stopped (and marked so) when this returns, unless it is gone.
    fn run_call(&mut self, tid: i32, what: &str, end: CallEnd, timeout: Duration) -> Result<u64> {
        let deadline = crate::deadline::after(timeout);
        // Through the stub the end is a system call: the thread runs under PTRACE_SYSCALL,
        // and the callee's own system calls are let through.
        let syscall_stops = matches!(end, CallEnd::Stub(..));
        let mut result = None;
        self.set_running(tid, syscall_stops)?;
        loop {
            let report = match ptrace::wait(-1, true) {
                Ok(r) => r,
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    self.threads.clear();
                    return Err(ProcessError::Exited(self.pid));
                }
                Err(e) => return Err(ProcessError::from_ptrace("WAIT", self.pid, tid, e)),
            };
            let Some((who, st)) = report else {
                if Instant::now() >= deadline {
                    self.interrupt_call(tid)?;
                    return Err(self.call_error(
                        tid,
                        format!("{what} did not return within {timeout:?}; abandoned"),
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            };
            if who != tid {
                if self.threads.contains_key(&who) {
                    self.handle_report(who, st)?;
                }
                continue;
            }
            match st {
                WaitStatus::Syscall if syscall_stops => {
                    let regs = self.regs(tid)?;
                    if let CallEnd::Stub(_, stop) = end {
                        if regs.rip == stop {
                            // Entry: the result is in rdi. Exit: done, the stub's system call
                            // (getpid) over.
                            if let Some(r) = result {
                                self.mark_stopped(tid);
                                return Ok(r);
                            }
                            result = Some(regs.rdi);
                        }
                    }
                    self.set_running(tid, syscall_stops)?;
                }
                WaitStatus::Signal(libc::SIGTRAP) => {
                    let regs = self.regs(tid)?;
                    self.mark_stopped(tid);
                    if let CallEnd::Trap(trap) = end {
                        if regs.rip == trap + 1 {
                            return Ok(regs.rax);
                        }
                    }
                    return Err(self
                        .call_error(tid, format!("{what} stopped on a trap at {:#x}", regs.rip)));
                }
                WaitStatus::Signal(sig) if SYNCHRONOUS.contains(&sig) => {
                    let rip = self.regs(tid).map(|r| r.rip).unwrap_or(0);
                    self.mark_stopped(tid);
                    return Err(
                        self.call_error(tid, format!("{what} faulted (signal {sig}) at {rip:#x}"))
                    );
                }
                WaitStatus::Signal(sig) => {
                    // Asynchronous: it belongs to the thread's own context, delivered later.
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.deferred.push(super::HeldSignal::take(tid, sig));
                    }
                    self.set_running(tid, syscall_stops)?;
                }
                WaitStatus::EventStop | WaitStatus::OtherEvent(_) | WaitStatus::Syscall => {
                    self.set_running(tid, syscall_stops)?;
                }
                WaitStatus::Gone => {
                    self.thread_gone(tid)?;
                    return Err(ProcessError::Exited(self.pid));
                }
            }
        }
    }

    /// Resumes `tid` (stopped) without a signal; until its next system call stop too when
    /// `syscall_stops`.
    fn set_running(&mut self, tid: i32, syscall_stops: bool) -> Result<()> {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.stopped = false;
        }
        let r = if syscall_stops {
            ptrace::syscall(tid)
        } else {
            ptrace::cont(tid, 0)
        };
        r.map_err(|e| ProcessError::from_ptrace("CONT", self.pid, tid, e))
    }

    fn mark_stopped(&mut self, tid: i32) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.stopped = true;
        }
    }

    /// Stops a thread that is still running our call (a timeout).
    fn interrupt_call(&mut self, tid: i32) -> Result<()> {
        ptrace::interrupt(tid)
            .map_err(|e| ProcessError::from_ptrace("INTERRUPT", self.pid, tid, e))?;
        // The first report is the stop: the interrupt's, or a signal that came before it.
        match self.wait_for(tid)? {
            WaitStatus::EventStop | WaitStatus::OtherEvent(_) | WaitStatus::Syscall => {}
            WaitStatus::Signal(sig) => {
                if !SYNCHRONOUS.contains(&sig) && sig != libc::SIGTRAP {
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.deferred.push(super::HeldSignal::take(tid, sig));
                    }
                }
            }
            WaitStatus::Gone => {
                self.thread_gone(tid)?;
                return Err(ProcessError::Exited(self.pid));
            }
        }
        self.mark_stopped(tid);
        Ok(())
    }

    fn call_error(&self, tid: i32, what: String) -> ProcessError {
        ProcessError::Unexpected {
            pid: self.pid,
            tid,
            what,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_slot_aligns_the_entry_stack_and_skips_the_red_zone() {
        for rsp in [0x7fff_0000u64, 0x7fff_0008, 0x7fff_0003, 0x7fff_1237] {
            let slot = return_slot(rsp);
            assert_eq!((slot + 8) % 16, 0, "rsp {rsp:#x}");
            assert!(slot + 8 <= rsp - 128, "red zone of {rsp:#x} kept");
        }
    }

    #[test]
    fn prepare_sets_the_sysv_argument_registers() {
        // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
        let mut saved: Regs = unsafe { std::mem::zeroed() };
        saved.eflags = 0x746; // DF and TF set among others
        saved.orig_rax = 35;
        let r = prepare(&saved, 0x1000, &[1, 2, 3, 4, 5, 6], 0x7ff8);
        assert_eq!([r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9], [1, 2, 3, 4, 5, 6]);
        assert_eq!((r.rip, r.rsp, r.orig_rax), (0x1000, 0x7ff8, u64::MAX));
        assert_eq!(r.eflags & ((1 << 10) | (1 << 8)), 0);
    }
}

//! Thin, checked wrappers over the ptrace requests we use. Nothing here keeps state.

use std::io;

/// Registers of a thread, as ptrace sees them.
pub type Regs = libc::user_regs_struct;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches to `tid` without stopping it. Syscall-stops (only ever asked for by
/// [`syscall`]) are told apart from SIGTRAPs (PTRACE_O_TRACESYSGOOD).
pub fn seize(tid: i32) -> io::Result<()> {
    let options = libc::PTRACE_O_TRACESYSGOOD as usize;
    // SAFETY: PTRACE_SEIZE takes no pointers; addr/data are plain integers.
    check(unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, options) }).map(drop)
}

/// Resumes a stopped thread until its next system call entry or exit (a syscall-stop, which
/// is no signal: unlike a single-step's trap it never touches the thread's SIGTRAP action).
pub fn syscall(tid: i32) -> io::Result<()> {
    syscall_delivering(tid, 0)
}

/// [`syscall`], delivering `sig` when the thread is in a signal-delivery stop.
pub fn syscall_delivering(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: PTRACE_SYSCALL takes no pointers; the signal is an integer in `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_SYSCALL, tid, 0usize, sig as usize) }).map(drop)
}

/// Asks a seized thread to stop (it reports PTRACE_EVENT_STOP).
pub fn interrupt(tid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_INTERRUPT takes no pointers.
    check(unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) }).map(drop)
}

/// Resumes a stopped thread, delivering `sig` when it is in a signal-delivery stop.
pub fn cont(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: PTRACE_CONT takes the signal as an integer in `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0usize, sig as usize) }).map(drop)
}

/// Executes one instruction of a stopped thread.
pub fn single_step(tid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_SINGLESTEP takes no pointers.
    check(unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, tid, 0usize, 0usize) }).map(drop)
}

/// Detaches from a stopped thread, which then runs on.
pub fn detach(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: PTRACE_DETACH takes the signal as an integer in `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0usize, sig as usize) }).map(drop)
}

/// Reads the general-purpose registers of a stopped thread.
pub fn get_regs(tid: i32) -> io::Result<Regs> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    // SAFETY: `data` points to a properly sized, writable user_regs_struct.
    check(unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0usize, &mut regs as *mut Regs) })?;
    Ok(regs)
}

/// Writes the general-purpose registers of a stopped thread.
pub fn set_regs(tid: i32, regs: &Regs) -> io::Result<()> {
    // SAFETY: `data` points to a valid user_regs_struct that the kernel only reads.
    check(unsafe { libc::ptrace(libc::PTRACE_SETREGS, tid, 0usize, regs as *const Regs) }).map(drop)
}

/// Why a thread reported to `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Stopped by PTRACE_INTERRUPT or a group stop (PTRACE_EVENT_STOP).
    EventStop,
    /// About to receive signal `0` (signal-delivery stop).
    Signal(i32),
    /// Another ptrace event stop (clone, exec, exit): treated as stopped.
    OtherEvent(i32),
    /// A syscall-entry or syscall-exit stop (after [`syscall`]).
    Syscall,
    /// The thread exited or was killed.
    Gone,
}

/// Waits for `tid` (or any traced thread when `tid` is -1). `nohang`: return None at once if
/// nothing is pending.
pub fn wait(tid: i32, nohang: bool) -> io::Result<Option<(i32, WaitStatus)>> {
    let mut status = 0;
    // __WNOTHREAD: only our own tracees. Without it, another thread of this process that
    // traces another target (tests, the Python bindings) would steal our reports and we theirs.
    let flags = libc::__WALL | libc::__WNOTHREAD | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: `status` is a valid, writable int.
        let ret = unsafe { libc::waitpid(tid, &mut status, flags) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        if ret == 0 {
            return Ok(None);
        }
        let st = if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            WaitStatus::Gone
        } else if libc::WIFSTOPPED(status) {
            let event = (status >> 16) & 0xff;
            if event == libc::PTRACE_EVENT_STOP {
                WaitStatus::EventStop
            } else if event != 0 {
                WaitStatus::OtherEvent(event)
            } else if libc::WSTOPSIG(status) == libc::SIGTRAP | 0x80 {
                WaitStatus::Syscall
            } else {
                WaitStatus::Signal(libc::WSTOPSIG(status))
            }
        } else {
            continue;
        };
        return Ok(Some((ret, st)));
    }
}

//! Errors of process control. Each one names the process/thread and the problem in one line.

use std::io;

/// What can go wrong while controlling a target process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The PID does not name a running process.
    #[error("process {0} does not exist")]
    NoSuchProcess(i32),
    /// The target is the calling process itself.
    #[error("process {0} is livepatch itself: a process cannot patch itself through ptrace")]
    IsSelf(i32),
    /// The kernel refused to let us trace or read the process.
    #[error("no permission to trace process {0} (needs root or CAP_SYS_PTRACE; see /proc/sys/kernel/yama/ptrace_scope)")]
    Permission(i32),
    /// Another tracer (a debugger, strace, another livepatch) holds the process: ptrace allows
    /// one tracer per thread.
    #[error("process {pid} is already traced by process {tracer} ({name}): detach it first")]
    AlreadyTraced {
        /// The process.
        pid: i32,
        /// The tracer's pid.
        tracer: i32,
        /// The tracer's command name.
        name: String,
    },
    /// Every thread of the target went away while we worked on it.
    #[error("process {0} exited while being patched")]
    Exited(i32),
    /// A ptrace request failed for another reason.
    #[error("ptrace {op} on thread {tid} failed: {err}")]
    Ptrace {
        /// The request (e.g. "SEIZE").
        op: &'static str,
        /// The thread.
        tid: i32,
        /// The OS error.
        err: io::Error,
    },
    /// Reading or writing the target's memory failed.
    #[error("cannot {op} {len} bytes at {addr:#x} in process {pid}: {err}")]
    Memory {
        /// "read" or "write".
        op: &'static str,
        /// The process.
        pid: i32,
        /// Start address.
        addr: u64,
        /// Length of the access.
        len: usize,
        /// The OS error.
        err: io::Error,
    },
    /// A system call run inside the target returned an error.
    #[error("{name} inside process {pid} failed: {err}")]
    RemoteSyscall {
        /// The system call's name.
        name: &'static str,
        /// The process.
        pid: i32,
        /// The errno the target got.
        err: io::Error,
    },
    /// A system call livepatch was about to run inside the target would not get through the
    /// seccomp filters of the thread it runs on: it was not made.
    #[error("{message}")]
    Seccomp {
        /// The process.
        pid: i32,
        /// The thread the call would have run on.
        tid: i32,
        /// The system call.
        call: &'static str,
        /// One line: what the filter would do, and that the call was not made.
        message: String,
    },
    /// No `syscall` instruction could be found in the target's executable mappings.
    #[error("no syscall instruction found in process {0}'s code")]
    NoSyscallInstruction(i32),
    /// livepatch could not start a thread of its own (a limit on threads: `ulimit -u`, a
    /// cgroup's pids.max). The target was not touched.
    #[error(
        "cannot start a thread of livepatch: {0} (limit on processes/threads: ulimit -u, pids.max)"
    )]
    ThreadStart(io::Error),
    /// A thread did not stop where we expected it to.
    #[error("thread {tid} of process {pid}: {what}")]
    Unexpected {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// What happened instead.
        what: String,
    },
}

impl ProcessError {
    /// Maps a ptrace failure to the error a user understands.
    pub(crate) fn from_ptrace(op: &'static str, pid: i32, tid: i32, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPERM) => match tracer_of(pid, tid) {
                Some(tracer) => ProcessError::AlreadyTraced {
                    pid,
                    tracer,
                    name: std::fs::read_to_string(format!("/proc/{tracer}/comm"))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_else(|_| "gone".into()),
                },
                None => ProcessError::Permission(pid),
            },
            // The thread vanished under us: the process was killed or exited (its exit may
            // still be under way: the leader turns zombie after its threads are gone).
            Some(libc::ESRCH) if exiting(pid) => ProcessError::Exited(pid),
            _ => ProcessError::Ptrace { op, tid, err },
        }
    }
}

/// Whether process `pid` is gone or becomes so within a moment.
fn exiting(pid: i32) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    loop {
        if super::is_gone_or_zombie(pid) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// The pid of the process tracing thread `tid` of `pid`, if any (`TracerPid` in its status).
fn tracer_of(pid: i32, tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let tracer: i32 = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()?;
    (tracer != 0).then_some(tracer)
}

/// Result alias of process control.
pub type Result<T> = std::result::Result<T, ProcessError>;

//! The one error type of process patching (`lp_userspace::Error`): every failure of apply,
//! revert and status, with a [`ErrorKind`] that the CLI maps to an exit code and the Python
//! bindings to an exception class. `Display` is the one line printed after `livepatch: error: `.

use crate::process::ProcessError;
use crate::state::StateError;

/// Coarse class of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ErrorKind {
    /// A thread is inside a function being switched (stop mode timed out).
    Busy,
    /// The build-id or the bytes of a function differ from what the patch expects.
    Mismatch,
    /// Not allowed to trace or read the process or a file.
    Permission,
    /// No such process, or it exited meanwhile.
    ProcessGone,
    /// The patch file is truncated, corrupt or of an unknown version.
    PatchFormat,
    /// A file that should be ELF is not.
    NotElf,
    /// The same patch is applied already.
    AlreadyApplied,
    /// No such patch id, or nothing applied.
    NotFound,
    /// Revert of a patch that another patch stacks on.
    NotTop,
    /// The patch cannot be applied safely (site, registers, linking).
    Unsupported,
    /// An I/O error.
    Io,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// The process exit code the CLI uses for this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Other | ErrorKind::Io => 1,
            ErrorKind::Busy => 3,
            ErrorKind::Mismatch => 4,
            ErrorKind::ProcessGone => 5,
            ErrorKind::Permission => 6,
            ErrorKind::PatchFormat | ErrorKind::NotElf => 7,
            ErrorKind::AlreadyApplied => 8,
            ErrorKind::NotFound | ErrorKind::NotTop => 9,
            ErrorKind::Unsupported => 10,
        }
    }
}

/// An error of apply / revert / status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Process control failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The in-target state is unreadable.
    #[error(transparent)]
    State(StateError),
    /// A thread stayed inside a function being switched until the timeout.
    #[error("busy: thread {tid} is in function {function} (gave up after {waited_ms} ms)")]
    Busy {
        /// The thread.
        tid: u32,
        /// The function (name).
        function: String,
        /// How long we retried.
        waited_ms: u64,
    },
    /// Verification refused the patch.
    #[error("{0}")]
    Mismatch(String),
    /// A file is not what it should be (patch file, ELF).
    #[error("{0}")]
    Format(String, ErrorKind),
    /// The patch is applied already.
    #[error("patch {id} is already applied to process {pid}")]
    AlreadyApplied {
        /// Patch id.
        id: String,
        /// Process.
        pid: i32,
    },
    /// No such patch.
    #[error("{0}")]
    NotFound(String),
    /// Revert of a lower patch.
    #[error("{0}")]
    NotTop(String),
    /// The patch cannot be applied safely.
    #[error("{0}")]
    Unsupported(String),
    /// The switch stopped part-way and could neither finish nor undo its writes (our sync
    /// agent stopped in the middle of them): the target is left as a killed livepatch leaves
    /// it — its state marked unfinished, the patch memory kept — for the next apply or revert
    /// to finish.
    #[error("{0}")]
    Unfinished(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl From<StateError> for Error {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Process(p) => Error::Process(p),
            e => Error::State(e),
        }
    }
}

impl From<crate::patchfile::PatchFileError> for Error {
    fn from(e: crate::patchfile::PatchFileError) -> Self {
        let kind = match e {
            crate::patchfile::PatchFileError::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::PatchFormat,
        };
        Error::Format(e.to_string(), kind)
    }
}

impl From<crate::elf::ElfError> for Error {
    fn from(e: crate::elf::ElfError) -> Self {
        let kind = match e {
            crate::elf::ElfError::Io { .. } => ErrorKind::Io,
            crate::elf::ElfError::NotElf(_) => ErrorKind::NotElf,
            _ => ErrorKind::Unsupported,
        };
        Error::Format(e.to_string(), kind)
    }
}

impl From<crate::pack::PackError> for Error {
    fn from(e: crate::pack::PackError) -> Self {
        use crate::elf::ElfError;
        use crate::pack::PackError;
        let kind = match &e {
            PackError::Target(ElfError::NotElf(_)) | PackError::Object(ElfError::NotElf(_)) => {
                ErrorKind::NotElf
            }
            PackError::Target(ElfError::Io { .. }) | PackError::Object(ElfError::Io { .. }) => {
                ErrorKind::Io
            }
            PackError::Link(_) => ErrorKind::Unsupported,
            // Bad input: wrong names, nothing to replace, not an object, no build-id.
            _ => ErrorKind::PatchFormat,
        };
        Error::Format(e.to_string(), kind)
    }
}

impl From<crate::kernel::KernelError> for Error {
    fn from(e: crate::kernel::KernelError) -> Self {
        use crate::kernel::KernelError as K;
        let kind = match &e {
            K::NoHeaders(_) | K::NotLoaded(_) => ErrorKind::NotFound,
            K::Format { .. } => ErrorKind::PatchFormat,
            K::Source { .. } | K::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::Other,
        };
        Error::Format(e.to_string(), kind)
    }
}

impl From<crate::maps::MapsError> for Error {
    fn from(e: crate::maps::MapsError) -> Self {
        match e {
            crate::maps::MapsError::Io { pid, .. } => {
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    Error::Process(ProcessError::Permission(pid))
                } else {
                    Error::Process(ProcessError::NoSuchProcess(pid))
                }
            }
            e => Error::Other(e.to_string()),
        }
    }
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Process(p) => match p {
                ProcessError::NoSuchProcess(_) | ProcessError::Exited(_) => ErrorKind::ProcessGone,
                ProcessError::Permission(_) | ProcessError::IsSelf(_) => ErrorKind::Permission,
                ProcessError::AlreadyTraced { .. } => ErrorKind::Busy,
                // A remote call the thread's seccomp filter would not let through: refused,
                // like the pre-flight check's refusal.
                ProcessError::Seccomp { .. } => ErrorKind::Unsupported,
                _ => ErrorKind::Other,
            },
            Error::State(_) => ErrorKind::Other,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Mismatch(_) => ErrorKind::Mismatch,
            Error::Format(_, k) => *k,
            Error::AlreadyApplied { .. } => ErrorKind::AlreadyApplied,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::NotTop(_) => ErrorKind::NotTop,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Other(_) | Error::Unfinished(_) => ErrorKind::Other,
        }
    }
}

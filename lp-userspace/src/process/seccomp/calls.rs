//! The system calls livepatch's operations run inside a target, with the arguments a filter
//! might test where they are fixed (0 where they depend on the run: addresses, lengths,
//! descriptors). Checked against the target's seccomp filters before an operation writes
//! anything (see `Tracee::check_seccomp`); each call is vetted again, with its real
//! arguments, as it is made (`Tracee::vet_syscall`). The sync agent's own calls are listed next to its
//! code (`sync_agent.rs`): a filter that stops it only means the ptrace sync is used.

use super::Call;
use crate::process::stub;

const R: u64 = libc::PROT_READ as u64;
const W: u64 = libc::PROT_WRITE as u64;
const X: u64 = libc::PROT_EXEC as u64;
const ANON: u64 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
const POPULATE: u64 = libc::MAP_POPULATE as u64;
const NO_FD: u64 = u64::MAX; // -1
const SIGTRAP: u64 = libc::SIGTRAP as u64;
/// MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE and MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE.
const REGISTER_SYNC_CORE: u64 = 1 << 6;
const SYNC_CORE: u64 = 1 << 5;

/// Both modes: the resume stub's area (`stub.rs`), the state's memfd (`state.rs`), the
/// patch's memory and its protections (`apply`), its removal (`revert`), and the return of a
/// function call through the stub (`__register_frame`, `debug_info.rs`).
const COMMON: &[Call] = &[
    Call::new(
        "mmap",
        libc::SYS_mmap,
        [0, stub::AREA_LEN, R | X, ANON, NO_FD, 0],
    ),
    Call::new(
        "memfd_create",
        libc::SYS_memfd_create,
        [0, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0],
    ),
    Call::new("ftruncate", libc::SYS_ftruncate, [0; 6]),
    Call::new(
        "mmap",
        libc::SYS_mmap,
        [0, 0, R | W, libc::MAP_PRIVATE as u64 | POPULATE, 0, 0],
    ),
    Call::new("close", libc::SYS_close, [0; 6]),
    Call::new(
        "mmap",
        libc::SYS_mmap,
        [
            0,
            0,
            R,
            ANON | libc::MAP_FIXED_NOREPLACE as u64 | POPULATE,
            NO_FD,
            0,
        ],
    ),
    Call::new("mprotect", libc::SYS_mprotect, [0, 0, R | X, 0, 0, 0]),
    Call::new("mprotect", libc::SYS_mprotect, [0, 0, R | W, 0, 0, 0]),
    Call::new("munmap", libc::SYS_munmap, [0; 6]),
    Call::new("getpid", libc::SYS_getpid, [0; 6]),
];

/// Nonstop mode's own: the trap area (a shared memfd mapping, its code page made r-x), the
/// SIGTRAP action, membarrier's registration and syncs through ptrace.
const NONSTOP: &[Call] = &[
    Call::new(
        "mmap",
        libc::SYS_mmap,
        [0, 0, R | W, libc::MAP_SHARED as u64 | POPULATE, 0, 0],
    ),
    Call::new(
        "rt_sigaction",
        libc::SYS_rt_sigaction,
        [SIGTRAP, 0, 0, 8, 0, 0],
    ),
    Call::new(
        "membarrier",
        libc::SYS_membarrier,
        [REGISTER_SYNC_CORE, 0, 0, 0, 0, 0],
    ),
    Call::new(
        "membarrier",
        libc::SYS_membarrier,
        [SYNC_CORE, 0, 0, 0, 0, 0],
    ),
];

/// What nonstop mode's SIGTRAP handler and its restorer (`trap_handler.rs`) call in the
/// target's threads that reach an `int3` of ours (and on the chain to the program's own
/// action); a test in `sync_agent.rs` checks this against the generated code.
pub const TRAP_HANDLER: &[Call] = &[
    Call::new("gettid", libc::SYS_gettid, [0; 6]),
    Call::new("rt_sigreturn", libc::SYS_rt_sigreturn, [0; 6]),
    Call::new(
        "rt_sigprocmask",
        libc::SYS_rt_sigprocmask,
        [libc::SIG_BLOCK as u64, 0, 0, 8, 0, 0],
    ),
    Call::new(
        "rt_sigaction",
        libc::SYS_rt_sigaction,
        [SIGTRAP, 0, 0, 8, 0, 0],
    ),
    Call::new("getpid", libc::SYS_getpid, [0; 6]),
    Call::new("tgkill", libc::SYS_tgkill, [0, 0, SIGTRAP, 0, 0, 0]),
];

/// The calls of an apply or a revert (which may finish a killed switch, and in nonstop mode
/// set up the trap area the same way) in the given mode.
pub fn for_operation(nonstop: bool) -> Vec<Call> {
    let mut calls = COMMON.to_vec();
    if nonstop {
        calls.extend_from_slice(NONSTOP);
        calls.extend_from_slice(TRAP_HANDLER);
    }
    calls
}

/// The name of a system call livepatch runs in a target, for messages ("system call" for one
/// not listed).
pub fn name_of(nr: i64) -> &'static str {
    match nr {
        libc::SYS_mmap => "mmap",
        libc::SYS_munmap => "munmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_memfd_create => "memfd_create",
        libc::SYS_ftruncate => "ftruncate",
        libc::SYS_close => "close",
        libc::SYS_close_range => "close_range",
        libc::SYS_getpid => "getpid",
        libc::SYS_gettid => "gettid",
        libc::SYS_membarrier => "membarrier",
        libc::SYS_rt_sigaction => "rt_sigaction",
        libc::SYS_rt_sigprocmask => "rt_sigprocmask",
        libc::SYS_tgkill => "tgkill",
        _ => "system call",
    }
}

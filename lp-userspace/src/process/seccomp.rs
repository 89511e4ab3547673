//! The target's seccomp filters, read and evaluated before livepatch runs a system call inside
//! it: a filter that kills (or traps, or fails) one of our remote calls would kill or disturb
//! the target, so the operation is refused before anything is written instead.
//!
//! `Seccomp:` in `/proc/PID/task/TID/status` says whether a thread is filtered at all (mode 0:
//! nothing more to do — the cost of the check for most targets is that read, for the one or
//! two threads our calls run on). Strict mode (1) allows read, write, exit and sigreturn only: refused. In filter
//! mode (2) the thread's filters are read with `PTRACE_SECCOMP_GET_FILTER` (the thread must be
//! ptrace-stopped; it needs CAP_SYS_ADMIN) and each of our calls is run through them
//! ([`bpf`]), combined as the kernel does (the most restrictive action wins). Only ALLOW and
//! LOG let a call through. A filter that cannot be read or evaluated is refused too: livepatch
//! cannot tell what it would do.
//!
//! That check runs once, before anything is written, on what is known then. Each remote system
//! call is vetted again as it is about to be made ([`Tracee::vet_syscall`], from
//! `run_syscall_on`): the filters of the thread it runs on (each thread's state read once and
//! kept: `Known`), with its real arguments. A call that would not pass is not made.

pub mod bpf;
pub mod calls;
pub(crate) mod prefetch;

use super::error::ProcessError;
use super::Tracee;
use bpf::{Insn, SeccompData, AUDIT_ARCH_X86_64};
use std::io;

/// `PTRACE_SECCOMP_GET_FILTER` (linux/ptrace.h).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// More filters than any stack the kernel accepts (each costs at least one instruction plus
/// four of accounting, against MAX_INSNS_PER_PATH = 32768).
const MAX_FILTERS: u64 = 32768 / 5 + 1;

/// A system call livepatch runs inside a target: its name (for the message), number, and the
/// arguments a filter may test (0 where the value is not known in advance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Name, e.g. "mmap".
    pub name: &'static str,
    /// System call number (x86-64).
    pub nr: i64,
    /// Arguments.
    pub args: [u64; 6],
}

impl Call {
    /// A call with known arguments (unknown ones 0).
    pub const fn new(name: &'static str, nr: i64, args: [u64; 6]) -> Call {
        Call { name, nr, args }
    }

    fn data(&self) -> SeccompData {
        self.data_at(0)
    }

    /// The data a filter sees for this call made from the `syscall` ending at `ip`.
    fn data_at(&self, ip: u64) -> SeccompData {
        SeccompData {
            nr: self.nr as u32,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: ip,
            args: self.args,
        }
    }
}

/// A thread's seccomp mode (`Seccomp:` in its status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No seccomp.
    Disabled,
    /// SECCOMP_MODE_STRICT.
    Strict,
    /// SECCOMP_MODE_FILTER.
    Filter,
}

/// The seccomp mode of thread `tid` of `pid` and its number of filters (`Seccomp:` and
/// `Seccomp_filters:` in its status); None when its status cannot be read (gone).
pub fn status(pid: i32, tid: i32) -> Option<(Mode, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    status_says(&status)
}

/// [`status`] of a status text already read.
fn status_says(status: &str) -> Option<(Mode, u32)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let mode = match field("Seccomp:")? {
        "0" => Mode::Disabled,
        "1" => Mode::Strict,
        _ => Mode::Filter,
    };
    let filters = field("Seccomp_filters:").and_then(|n| n.parse().ok());
    Some((mode, filters.unwrap_or(u32::MAX)))
}

/// The seccomp mode of thread `tid` of `pid`; None when its status cannot be read (gone).
pub fn mode(pid: i32, tid: i32) -> Option<Mode> {
    status(pid, tid).map(|(mode, _)| mode)
}

/// Why a thread's filters do not let livepatch's system calls through.
#[derive(Debug)]
pub enum Blocked {
    /// Strict mode.
    Strict,
    /// `PTRACE_SECCOMP_GET_FILTER` failed.
    Unreadable(io::Error),
    /// A filter is not a program this interpreter runs.
    Unknown,
    /// The filters answer `ret` for `call`.
    Call {
        /// The call.
        call: Call,
        /// The stack's answer.
        ret: u32,
    },
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocked::Strict => write!(
                f,
                "the target runs in seccomp strict mode (read, write, exit and sigreturn only): \
                 livepatch cannot run its system calls inside it"
            ),
            Blocked::Unreadable(e) => write!(
                f,
                "the target's seccomp filter cannot be read (PTRACE_SECCOMP_GET_FILTER: {e}): \
                 whether it allows livepatch's system calls is unknown"
            ),
            Blocked::Unknown => write!(
                f,
                "the target's seccomp filter is a program livepatch cannot evaluate: whether it \
                 allows livepatch's system calls is unknown"
            ),
            Blocked::Call { call, ret } => match ret & bpf::action::FULL_MASK {
                bpf::action::ERRNO => write!(
                    f,
                    "the target's seccomp filter would fail {} with errno {}, a system call \
                     livepatch runs inside it",
                    call.name,
                    ret & 0xffff
                ),
                _ => write!(
                    f,
                    "the target's seccomp filter would {} on {}, a system call livepatch runs \
                     inside it",
                    bpf::describe(*ret),
                    call.name
                ),
            },
        }
    }
}

/// An operation refused because of the target's seccomp filters, or the failure to find out.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filters do not let a call of ours through.
    #[error("{why} (process {pid}, thread {tid}); nothing was changed")]
    Refused {
        /// The process.
        pid: i32,
        /// The thread checked.
        tid: i32,
        /// What is in the way.
        why: Blocked,
    },
    /// Nonstop mode: the filters of a thread that may reach one of our `int3`s do not let
    /// the SIGTRAP handler's calls through.
    #[error(
        "{why} (process {pid}, thread {tid}, in which nonstop mode's trap handler may run); \
         the program was not changed: use --mode stop"
    )]
    Handler {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// What is in the way.
        why: Blocked,
    },
    /// Process control failed while checking.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

impl From<SeccompError> for crate::Error {
    fn from(e: SeccompError) -> Self {
        match e {
            SeccompError::Process(p) => crate::Error::Process(p),
            refused => crate::Error::Unsupported(refused.to_string()),
        }
    }
}

/// The filters of the ptrace-stopped thread `tid`, oldest first.
pub fn read_filters(tid: i32) -> Result<Vec<Vec<Insn>>, io::Error> {
    let mut filters = Vec::new();
    for index in 0..MAX_FILTERS {
        // SAFETY: a null buffer: the kernel only returns the filter's length.
        let len = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as usize,
                std::ptr::null_mut::<Insn>(),
            )
        };
        if len < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(filters);
            }
            return Err(e);
        }
        let mut prog = vec![Insn::default(); len as usize];
        // SAFETY: `prog` holds `len` instructions of the kernel's `struct sock_filter` layout
        // (Insn is repr(C), 8 bytes); the kernel writes exactly that filter's length, which
        // cannot change (a filter is immutable once attached).
        let got = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as usize,
                prog.as_mut_ptr(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        prog.truncate(got as usize);
        filters.push(prog);
    }
    Err(io::Error::from_raw_os_error(libc::E2BIG))
}

/// The stack's answer for `call` (`filters` oldest first); None when a filter cannot be
/// evaluated.
pub fn verdict(filters: &[Vec<Insn>], call: &Call) -> Option<u32> {
    verdict_on(filters, &call.data())
}

/// [`verdict`] for the data of one call.
fn verdict_on(filters: &[Vec<Insn>], data: &SeccompData) -> Option<u32> {
    // Newest first, as the kernel walks them: of two equally restrictive answers it keeps the
    // newer filter's (its errno, say).
    let rets: Option<Vec<u32>> = filters.iter().rev().map(|f| bpf::run(f, data)).collect();
    Some(bpf::combine(rets?))
}

/// The first of `calls` the filters of thread `tid` (ptrace-stopped, in filter mode) do not let
/// through, or what keeps us from knowing; None when all of them run.
pub fn first_blocked(tid: i32, calls: &[Call]) -> Option<Blocked> {
    let filters = match read_filters(tid) {
        Ok(f) => f,
        Err(e) => return Some(Blocked::Unreadable(e)),
    };
    for call in calls {
        match verdict(&filters, call) {
            None => return Some(Blocked::Unknown),
            Some(ret) if !bpf::allows(ret) => return Some(Blocked::Call { call: *call, ret }),
            Some(_) => {}
        }
    }
    None
}

/// Whether thread `tid` of `pid` (ptrace-stopped) may run every one of `calls`: its seccomp
/// mode, then its filters.
pub fn thread_allows(pid: i32, tid: i32, calls: &[Call]) -> bool {
    match mode(pid, tid) {
        Some(Mode::Disabled) => true,
        Some(Mode::Strict) | None => false,
        Some(Mode::Filter) => first_blocked(tid, calls).is_none(),
    }
}

/// What is known of one thread's seccomp state, read once per thread (`Tracee::seccomp`).
#[derive(Debug)]
pub(crate) enum Known {
    /// No seccomp (or the thread is gone: its call fails on its own).
    Disabled,
    /// Strict mode.
    Strict,
    /// Filter mode: `count` filters; their programs once read (the thread must be
    /// ptrace-stopped for that), or why they cannot be.
    Filter {
        count: u32,
        filters: Option<Result<Vec<Vec<Insn>>, String>>,
    },
}

impl Known {
    fn of(pid: i32, tid: i32) -> Known {
        Known::from_status(status(pid, tid))
    }

    /// What a [`status`] read says.
    fn from_status(status: Option<(Mode, u32)>) -> Known {
        match status {
            None | Some((Mode::Disabled, _)) => Known::Disabled,
            Some((Mode::Strict, _)) => Known::Strict,
            Some((Mode::Filter, count)) => Known::Filter {
                count,
                filters: None,
            },
        }
    }
}

/// The lowest descriptor number process `pid` has not open (what its next open or
/// memfd_create returns, unless another thread opens one first); 0 when /proc cannot tell.
pub(crate) fn lowest_free_fd(pid: i32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("{}/fd", super::proc_dir::dir(pid))) else {
        return 0;
    };
    let open: std::collections::BTreeSet<u64> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|fd| !open.contains(fd)).unwrap_or(0)
}

/// `LIVEPATCH_TRACE`: each vet's time and the running total, one line per call (the cost of
/// vetting every remote call, measured where it is paid).
fn vet_trace(nr: i64, tid: i32, took: std::time::Duration) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static TOTAL_NS: AtomicU64 = AtomicU64::new(0);
    static CALLS: AtomicU64 = AtomicU64::new(0);
    if !*TRACE.get_or_init(|| std::env::var_os("LIVEPATCH_TRACE").is_some()) {
        return;
    }
    let ns = took.as_nanos() as u64;
    let total = TOTAL_NS.fetch_add(ns, Ordering::Relaxed) + ns;
    let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    eprintln!(
        "livepatch: trace: seccomp vet of {} on thread {tid}: {ns} ns (all {calls} vets: {} us)",
        calls::name_of(nr),
        total / 1000
    );
}

/// What strict mode lets through: read, write, exit, rt_sigreturn.
const STRICT_ALLOWS: [i64; 4] = [
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_exit,
    libc::SYS_rt_sigreturn,
];

/// The one-line refusal of `call` on thread `tid` of `pid`, `why` it would not get through.
fn refusal(pid: i32, tid: i32, call: &Call, why: &Blocked) -> ProcessError {
    let name = call.name;
    let what = match why {
        Blocked::Strict => format!("kill process {pid} on {name} (strict mode)"),
        Blocked::Unreadable(e) => {
            format!("do what to {name} in process {pid}? It cannot be read ({e})")
        }
        Blocked::Unknown => {
            format!("do what to {name} in process {pid}? livepatch cannot evaluate it")
        }
        Blocked::Call { ret, .. } if ret & bpf::action::FULL_MASK == bpf::action::ERRNO => {
            format!("fail {name} with errno {} in process {pid}", ret & 0xffff)
        }
        Blocked::Call { ret, .. } if bpf::describe(*ret) == "kill the process" => {
            format!("kill process {pid} on {name}")
        }
        Blocked::Call { ret, .. } => format!("{} on {name} in process {pid}", bpf::describe(*ret)),
    };
    ProcessError::Seccomp {
        pid,
        tid,
        call: name,
        message: format!(
            "the seccomp filter of thread {tid} would {what}, a system call livepatch runs \
             inside it; livepatch did not make it"
        ),
    }
}

/// Test knob: `LIVEPATCH_DEBUG_SKIP_SECCOMP_CHECK=1` skips the refusal (the filter is still
/// noted), so that `tests/e2e_seccomp.rs` can show what a remote call the check missed does: the
/// apply fails with "exited", not with a bogus result.
pub const SKIP_CHECK_VAR: &str = "LIVEPATCH_DEBUG_SKIP_SECCOMP_CHECK";

impl Tracee {
    /// The seccomp state of traced thread `tid`, its status read the first time.
    fn known(&mut self, tid: i32) -> &mut Known {
        let pid = self.pid;
        self.seccomp
            .entry(tid)
            .or_insert_with(|| Known::of(pid, tid))
    }

    /// Whether a remote call on `tid` may meet a filter (its SIGSYS is then looked for).
    pub(super) fn seccomp_filtered(&self, tid: i32) -> bool {
        !matches!(self.seccomp.get(&tid), None | Some(Known::Disabled))
    }

    /// A traced thread known to run without seccomp (a remote call or the check read its
    /// status), if any.
    pub(super) fn known_unfiltered(&self) -> Option<i32> {
        self.threads
            .keys()
            .copied()
            .find(|tid| matches!(self.seccomp.get(tid), Some(Known::Disabled)))
    }

    /// The first of `calls` the filters of `tid` (ptrace-stopped, in filter mode) do not let
    /// through, their programs read once and kept; None when all of them run.
    fn first_blocked_cached(&mut self, tid: i32, calls: &[Call]) -> Option<Blocked> {
        let Known::Filter { filters, .. } = self.known(tid) else {
            return None;
        };
        let filters = filters.get_or_insert_with(|| read_filters(tid).map_err(|e| e.to_string()));
        let filters = match filters {
            Ok(f) => f,
            Err(e) => return Some(Blocked::Unreadable(io::Error::other(e.clone()))),
        };
        for call in calls {
            match verdict(filters, call) {
                None => return Some(Blocked::Unknown),
                Some(ret) if !bpf::allows(ret) => return Some(Blocked::Call { call: *call, ret }),
                Some(_) => {}
            }
        }
        None
    }

    /// Vets system call `nr(args)`, about to be made from the `syscall` ending at `ip` on the
    /// ptrace-stopped thread `tid`, against that thread's seccomp state: its status is read
    /// the first time (without seccomp that is all it ever costs), its filters the first time
    /// a call is vetted in filter mode, and the call is run through them with its real
    /// arguments. Anything but ALLOW or LOG: the call must not be made
    /// ([`ProcessError::Seccomp`], one line naming the thread and the call).
    pub(crate) fn vet_syscall(
        &mut self,
        tid: i32,
        nr: i64,
        args: [u64; 6],
        ip: u64,
    ) -> Result<(), ProcessError> {
        let t0 = std::time::Instant::now();
        let r = self.vet_syscall_untimed(tid, nr, args, ip);
        vet_trace(nr, tid, t0.elapsed());
        r
    }

    fn vet_syscall_untimed(
        &mut self,
        tid: i32,
        nr: i64,
        args: [u64; 6],
        ip: u64,
    ) -> Result<(), ProcessError> {
        let pid = self.pid;
        let call = Call::new(calls::name_of(nr), nr, args);
        let why = match self.known(tid) {
            Known::Disabled => return Ok(()),
            _ if std::env::var_os(SKIP_CHECK_VAR).is_some() => return Ok(()),
            Known::Strict if STRICT_ALLOWS.contains(&nr) => return Ok(()),
            Known::Strict => Blocked::Strict,
            Known::Filter { filters, .. } => {
                let filters =
                    filters.get_or_insert_with(|| read_filters(tid).map_err(|e| e.to_string()));
                match filters {
                    Err(e) => Blocked::Unreadable(io::Error::other(e.clone())),
                    Ok(filters) => match verdict_on(filters, &call.data_at(ip)) {
                        None => Blocked::Unknown,
                        Some(ret) if bpf::allows(ret) => return Ok(()),
                        Some(ret) => Blocked::Call { call, ret },
                    },
                }
            }
        };
        Err(refusal(pid, tid, &call, &why))
    }

    /// [`Tracee::vet_syscall`] on the thread the next remote call runs on (stopped for it),
    /// for a call made later whose arguments are known now. A thread without seccomp: no
    /// cost but its status read, which the call would make anyway.
    pub(crate) fn vet_ahead(&mut self, nr: i64, args: [u64; 6]) -> Result<(), ProcessError> {
        let tid = self.stopped_thread()?;
        let ip = self.stub.map_or(0, |s| s.syscall_insn() + 2);
        self.vet_syscall(tid, nr, args, ip)
    }

    /// Whether the thread the next remote call runs on is under seccomp (strict or filter).
    pub(crate) fn next_call_filtered(&mut self) -> Result<bool, ProcessError> {
        let tid = self.stopped_thread()?;
        Ok(!matches!(self.known(tid), Known::Disabled))
    }

    /// Refuses when a traced thread's seccomp filters would not let through one of the calls an
    /// apply or revert makes in the target ([`calls::for_operation`], nonstop or stop mode)
    /// on the threads that will be borrowed for them. Without seccomp that costs a status read
    /// per such thread (one or two); the filters of the thread borrowed first are read (it is
    /// stopped, and stays so for the calls), and those of the other only when their number
    /// differs. Run before the first remote call. In nonstop mode the threads our SIGTRAP
    /// handler may run in are checked too (see `check_handler_threads`).
    pub fn check_seccomp(&mut self, nonstop: bool) -> Result<(), SeccompError> {
        self.check_seccomp_then(nonstop, nonstop)
    }

    /// [`Tracee::check_seccomp`] for a nonstop apply, whose switch checks the threads its
    /// handler may run in later ([`Tracee::check_handler_threads_left`]), before its first
    /// `int3`: in its first look, while the sync agent maps the patch memory, when the tracer
    /// would only wait (one `status` read per thread, ~20 µs each here: 0.15-0.2 ms of an
    /// 8-thread target's apply were spent on them right after the attach, session 14). The
    /// seccomp reader (`prefetch.rs`) has that much longer to read them ahead, too.
    pub fn check_seccomp_handler_threads_later(&mut self) -> Result<(), SeccompError> {
        let r = self.check_seccomp_then(true, false);
        self.handler_threads_left = r.is_ok();
        r
    }

    /// The check of the handler's threads that [`Tracee::check_seccomp_handler_threads_later`]
    /// left, once; nothing when none was left.
    pub(crate) fn check_handler_threads_left(&mut self) -> Result<(), SeccompError> {
        if !std::mem::take(&mut self.handler_threads_left) {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let mut stopping = std::time::Duration::ZERO;
        let r = if std::env::var_os(SKIP_CHECK_VAR).is_none() {
            self.check_handler_threads(&mut stopping)
        } else {
            Ok(())
        };
        self.seccomp_prefetch = None;
        if std::env::var_os("LIVEPATCH_TRACE").is_some() {
            eprintln!(
                "livepatch: trace: seccomp of the handler's threads checked in {} us ({} us of \
                 it stopping threads; {} threads' states read ahead by another thread)",
                t0.elapsed().as_micros(),
                stopping.as_micros(),
                self.seccomp_read_ahead
            );
        }
        r
    }

    /// [`Tracee::check_seccomp`], with the handler's threads checked or not.
    fn check_seccomp_then(
        &mut self,
        nonstop: bool,
        handler_threads: bool,
    ) -> Result<(), SeccompError> {
        let t0 = std::time::Instant::now();
        let mut stopping = std::time::Duration::ZERO;
        let mut r = self.check_seccomp_timed(&calls::for_operation(nonstop), &mut stopping);
        if handler_threads && r.is_ok() && std::env::var_os(SKIP_CHECK_VAR).is_none() {
            r = self.check_handler_threads(&mut stopping);
        }
        if handler_threads || r.is_err() {
            self.seccomp_prefetch = None;
        }
        if std::env::var_os("LIVEPATCH_TRACE").is_some() {
            eprintln!(
                "livepatch: trace: seccomp checked ({} threads) in {} us ({} us of it stopping \
                 a thread, which its first remote call would do otherwise; {} threads' states read \
                 ahead by another thread)",
                self.threads.len(),
                t0.elapsed().as_micros(),
                stopping.as_micros(),
                self.seccomp_read_ahead
            );
        }
        r
    }

    /// Nonstop mode: our SIGTRAP handler runs in whichever thread reaches one of our `int3`s,
    /// under that thread's own filters (a thread may have sandboxed itself, without TSYNC).
    /// Every thread's status is read (nonstop mode reads /proc for every thread anyway); a
    /// thread in strict mode is refused, and one in filter mode whose number of filters differs
    /// from every stack vetted so far is seized and stopped for a moment, its filters read and
    /// the handler's calls ([`calls::TRAP_HANDLER`]) run through them. A thread created later
    /// inherits its creator's filters, which are checked (or it installs its own: not seen).
    ///
    /// The threads are listed here. Their states were mostly read ahead, on a thread of ours,
    /// during the attach (`prefetch.rs`: at most [`prefetch::FRESH`] ago); the others are read
    /// now. Either is what the thread had at one moment before the first `int3`, as any read
    /// here is: the threads run on, and one that sandboxes itself after its read is not seen,
    /// whenever that read was.
    fn check_handler_threads(
        &mut self,
        stopping: &mut std::time::Duration,
    ) -> Result<(), SeccompError> {
        let mut vetted: Vec<u32> = self
            .seccomp
            .values()
            .filter_map(|k| match k {
                Known::Filter {
                    count,
                    filters: Some(Ok(_)),
                } => Some(*count),
                _ => None,
            })
            .collect();
        let prefetch::Ahead {
            states: mut ahead,
            mut stats,
            by_reader,
        } = self
            .seccomp_prefetch
            .take()
            .map(prefetch::Prefetch::finish)
            .unwrap_or_default();
        self.seccomp_read_ahead = by_reader;
        // The `stat` files opened meanwhile go with the look's files, for the switch.
        for files in &mut self.looked {
            if let Some(stat) = stats.remove(&files.tid()) {
                files.set_stat(stat);
            }
        }
        for tid in super::observe::tasks(self.pid) {
            if self.seccomp.contains_key(&tid) {
                continue; // checked already, against every call of the operation
            }
            let known = match ahead.remove(&tid) {
                Some(seen) => Known::from_status(Some(seen)),
                None => Known::of(self.pid, tid),
            };
            let why = match known {
                Known::Disabled => continue,
                Known::Filter { count, .. } if vetted.contains(&count) => continue,
                Known::Strict => Blocked::Strict,
                known @ Known::Filter { count, .. } => {
                    let traced = self.threads.contains_key(&tid);
                    if !traced {
                        match super::ptrace::seize(tid) {
                            Ok(()) => {}
                            Err(e) if super::seized_a_dead_thread(self.pid, tid, &e) => continue,
                            Err(e) => {
                                return Err(
                                    ProcessError::from_ptrace("SEIZE", self.pid, tid, e).into()
                                )
                            }
                        }
                        self.threads.insert(tid, Default::default());
                    }
                    self.seccomp.insert(tid, known);
                    let t0 = std::time::Instant::now();
                    let stopped = self.stop_thread(tid);
                    *stopping += t0.elapsed();
                    let blocked = match stopped {
                        Ok(()) if self.threads.contains_key(&tid) => {
                            self.first_blocked_cached(tid, calls::TRAP_HANDLER)
                        }
                        _ => None, // gone meanwhile
                    };
                    if !traced && self.threads.contains_key(&tid) {
                        let detached = self.detach_thread(tid);
                        self.threads.remove(&tid);
                        detached?;
                    }
                    stopped?;
                    match blocked {
                        Some(why) => why,
                        None => {
                            vetted.push(count);
                            continue;
                        }
                    }
                }
            };
            return Err(SeccompError::Handler {
                pid: self.pid,
                tid,
                why,
            });
        }
        Ok(())
    }

    /// [`Tracee::check_seccomp`] for any list of calls.
    pub fn check_seccomp_calls(&mut self, calls: &[Call]) -> Result<(), SeccompError> {
        let mut stopping = std::time::Duration::ZERO;
        self.check_seccomp_timed(calls, &mut stopping)
    }

    /// [`Tracee::check_seccomp_calls`], adding the time spent stopping threads to `stopping`.
    fn check_seccomp_timed(
        &mut self,
        calls: &[Call],
        stopping: &mut std::time::Duration,
    ) -> Result<(), SeccompError> {
        let borrow = match self.threads.iter().find(|(_, t)| t.stopped) {
            Some((&tid, _)) => tid,
            None if self.threads.contains_key(&self.pid) => self.pid,
            None => self.threads.keys().next().copied().unwrap_or(self.pid),
        };
        // The threads our calls run on: the one borrowed first, and once every thread is
        // stopped (stop mode's switch) the first stopped, the lowest tid. Reading every traced
        // thread's status would cost ~20 us per thread of every stop-mode apply, seccomp or
        // not. (A thread that takes their place when both exit meanwhile is not checked.)
        let mut order = vec![borrow];
        order.extend(self.threads.keys().next().filter(|&&tid| tid != borrow));
        let mut stacks_read: Vec<u32> = Vec::new();
        for tid in order {
            let seen = match self.known(tid) {
                Known::Disabled => None,
                Known::Strict => Some((Mode::Strict, 0)),
                Known::Filter { count, .. } => Some((Mode::Filter, *count)),
            };
            if std::env::var_os(SKIP_CHECK_VAR).is_some() {
                continue;
            }
            let why = match seen {
                None | Some((Mode::Disabled, _)) => continue,
                Some((Mode::Strict, _)) => Blocked::Strict,
                // Filters are inherited at clone and a filter installed with TSYNC goes to
                // every thread: a thread with as many filters as one already read has its
                // stack (only a program giving its threads different filters of equal count
                // without TSYNC differs). Any other stack is read too, its thread stopped for
                // the moment (reading all of them cost 1.2 ms more per stop-mode apply of a
                // two-thread target: the second thread's stop and its way back into its call).
                Some((Mode::Filter, count)) if stacks_read.contains(&count) => continue,
                Some((Mode::Filter, count)) => {
                    let was_stopped = self.threads.get(&tid).is_some_and(|t| t.stopped);
                    let t0 = std::time::Instant::now();
                    self.stop_thread(tid)?;
                    *stopping += t0.elapsed();
                    if !self.threads.contains_key(&tid) {
                        continue; // exited meanwhile
                    }
                    let blocked = self.first_blocked_cached(tid, calls);
                    if !was_stopped && tid != borrow {
                        self.resume_thread(tid)?;
                    }
                    stacks_read.push(count);
                    match blocked {
                        Some(why) => why,
                        None => continue,
                    }
                }
            };
            return Err(SeccompError::Refused {
                pid: self.pid,
                tid,
                why,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::bpf::*;
    use super::*;

    fn on_nr(nr: i64, ret: u32) -> Vec<Insn> {
        vec![
            Insn::stmt(LD | W | ABS, 0),
            Insn::jump(JMP | JEQ | K, nr as u32, 0, 1),
            Insn::stmt(RET | K, ret),
            Insn::stmt(RET | K, action::ALLOW),
        ]
    }

    #[test]
    fn a_stack_answers_with_its_most_restrictive_filter() {
        let mmap = Call::new("mmap", libc::SYS_mmap, [0; 6]);
        let close = Call::new("close", libc::SYS_close, [0; 6]);
        let stack = vec![
            on_nr(libc::SYS_mmap, action::ERRNO | 1),
            on_nr(libc::SYS_mmap, action::KILL_PROCESS),
            on_nr(libc::SYS_close, action::LOG),
        ];
        assert_eq!(verdict(&stack, &mmap), Some(action::KILL_PROCESS));
        assert_eq!(verdict(&stack, &close), Some(action::LOG));
        assert_eq!(verdict(&[], &mmap), Some(action::ALLOW));
        // Equal actions: the newer filter's data, as the kernel keeps it.
        let errnos = vec![
            on_nr(libc::SYS_mmap, action::ERRNO | 1),
            on_nr(libc::SYS_mmap, action::ERRNO | 13),
        ];
        assert_eq!(verdict(&errnos, &mmap), Some(action::ERRNO | 13));
        // One filter that cannot be evaluated makes the stack unknown.
        let bad = vec![stack[0].clone(), vec![Insn::stmt(LD | W | ABS, 0)]];
        assert_eq!(verdict(&bad, &close), None);
    }

    #[test]
    fn a_vet_refusal_is_one_line_naming_thread_process_and_call() {
        let munmap = Call::new("munmap", libc::SYS_munmap, [0; 6]);
        let kill = Blocked::Call {
            call: munmap,
            ret: action::KILL_PROCESS,
        };
        assert_eq!(
            refusal(42, 43, &munmap, &kill).to_string(),
            "the seccomp filter of thread 43 would kill process 42 on munmap, a system call \
             livepatch runs inside it; livepatch did not make it"
        );
        let errno = Blocked::Call {
            call: munmap,
            ret: action::ERRNO | 1,
        };
        assert!(refusal(42, 43, &munmap, &errno)
            .to_string()
            .contains("would fail munmap with errno 1 in process 42"));
        for why in [
            Blocked::Strict,
            Blocked::Unknown,
            Blocked::Unreadable(io::Error::from_raw_os_error(libc::EACCES)),
            Blocked::Call {
                call: munmap,
                ret: action::TRAP,
            },
        ] {
            let e = refusal(42, 43, &munmap, &why).to_string();
            assert!(
                !e.contains('\n') && e.contains("munmap") && e.contains("thread 43"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_lowest_free_descriptor_is_the_one_the_next_open_gets() {
        // A process with exactly 0, 1 and 2 open (ours lists its own directory descriptor).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start sleep");
        let free = lowest_free_fd(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(free, 3);
        assert_eq!(lowest_free_fd(-1), 0, "no such process");
    }

    #[test]
    fn a_refusal_is_one_line_naming_the_call() {
        let e = SeccompError::Refused {
            pid: 42,
            tid: 43,
            why: Blocked::Call {
                call: Call::new("mmap", libc::SYS_mmap, [0; 6]),
                ret: action::KILL_PROCESS,
            },
        };
        assert_eq!(
            e.to_string(),
            "the target's seccomp filter would kill the process on mmap, a system call livepatch \
             runs inside it (process 42, thread 43); nothing was changed"
        );
        let errno = Blocked::Call {
            call: Call::new("membarrier", libc::SYS_membarrier, [0; 6]),
            ret: action::ERRNO | 1,
        };
        assert!(errno
            .to_string()
            .contains("would fail membarrier with errno 1"));
        for why in [
            Blocked::Strict,
            Blocked::Unknown,
            Blocked::Unreadable(io::Error::from_raw_os_error(libc::EACCES)),
            errno,
        ] {
            assert!(!why.to_string().contains('\n'), "{why}");
        }
    }
}

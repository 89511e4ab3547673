//! Process control: seize every thread of a target, stop them all at one synchronization
//! point, read and write their registers and the target's memory, run system calls inside the
//! target, and detach leaving every thread running as it was.
//!
//! The target is never stopped by [`Tracee::attach`]: threads are seized (traced without a
//! stop) so that allocation and other slow preparation can borrow one thread at a time, and the
//! whole-process stop ([`Tracee::stop_all`]) lasts only as long as the switch itself.

mod borrow;
mod capabilities;
mod error;
mod gaps;
mod held_signal;
pub(crate) mod maps_text;
mod mem;
pub mod observe;
pub(crate) mod proc_dir;
pub mod ptrace;
pub(crate) mod realtime;
pub mod remote_call;
mod restart;
pub mod seccomp;
pub mod stop_point;
pub(crate) mod stub;
mod syscall;
pub(crate) mod vma_query;

pub use error::{ProcessError, Result};
pub use gaps::find_free_near;
pub use mem::Memory;
pub use ptrace::Regs;

pub(crate) use held_signal::HeldSignal;
use ptrace::WaitStatus;
use restart::{Release, Walk};
use std::collections::BTreeMap;
use std::io;

/// Decides what to do with a thread that stopped on an `int3` at `addr` (the address of the
/// int3 byte): `Some(new_rip)` to send it there, `None` when the trap is not ours.
pub type TrapHook = Box<dyn FnMut(u64) -> Option<u64>>;

#[derive(Debug, Default)]
struct Thread {
    stopped: bool,
    /// The thread sits in the syscall-exit stop of a remote system call, its own registers
    /// restored as the kernel left them: an interrupted call of its own must be restarted
    /// when it runs again (see [`Tracee::fix_restart`]).
    after_remote_syscall: bool,
    /// Signals that arrived while we had the thread busy (with their siginfo); delivered when
    /// we let it go.
    deferred: Vec<HeldSignal>,
}

/// The look for the thread a nonstop operation borrows ([`Tracee::attach_one`]), begun before
/// the tracee is opened: its first step (300 µs, see `borrow.rs`) runs beside the work that
/// comes before the attach — the target's module located, the orphan check, the lock —
/// instead of after it. It stops nothing and changes nothing in the process.
pub struct BorrowLook {
    pid: i32,
    look: borrow::Look,
    /// The threads' seccomp states, read meanwhile on a thread of ours, for nonstop mode's
    /// check of them.
    prefetch: Option<seccomp::prefetch::Prefetch>,
    /// Kept open for the look and the checks before the tracee keeps it (`KeptStatm`).
    statm: proc_dir::KeptStatm,
}

impl BorrowLook {
    /// Starts looking at the threads of `pid` (a process that is gone or out of reach gives
    /// an empty look; the attach then reports what is wrong).
    pub fn start(pid: i32) -> BorrowLook {
        // The look's clock starts first: what follows counts as look time.
        let look = borrow::Look::start(pid);
        let statm = proc_dir::KeptStatm::open(pid);
        let prefetch = seccomp::prefetch::Prefetch::start(pid);
        BorrowLook {
            pid,
            look,
            prefetch,
            statm,
        }
    }
}

/// A traced process.
pub struct Tracee {
    pid: i32,
    mem: Memory,
    threads: BTreeMap<i32, Thread>,
    syscall_insn: Option<u64>,
    /// The slot of our resume stub this invocation uses (see `stub.rs`), once known.
    stub: Option<stub::Slot>,
    /// This invocation created the stub's area (see [`Tracee::remove_stub_if_created`]).
    stub_created: bool,
    trap_hook: Option<TrapHook>,
    /// Number of int3 traps redirected by the hook (for reporting).
    pub traps_handled: usize,
    detached: bool,
    release_on_drop: bool,
    /// Only one thread is traced ([`Tracee::attach_one`]): a thread that exits is replaced by
    /// another, and the others are never seized.
    single: bool,
    /// Dropped once the threads are let go, before the lock below (see
    /// [`Tracee::keep_until_unlock`]). (Fields drop in their order.)
    until_unlock: Vec<Box<dyn std::any::Any>>,
    /// Held while a single-thread tracee exists (see [`Tracee::attach_one`]).
    _lock: Option<std::os::fd::OwnedFd>,
    /// Threads let go on their way back into a system call our stop interrupted, followed
    /// until they are inside it (restart.rs).
    walks: BTreeMap<i32, Walk>,
    /// The seccomp state of each thread a remote call ran on (or was checked): read once per
    /// thread, then every remote system call is vetted against it before it is made
    /// (`seccomp.rs`), and a filtered thread's call is checked for the filter's SIGSYS after.
    seccomp: BTreeMap<i32, seccomp::Known>,
    /// The files the borrow's look opened (single-thread tracee), kept for the switch's own
    /// looks at the threads ([`Tracee::take_looked_files`]).
    looked: Vec<observe::ThreadFiles>,
    /// The threads' seccomp states being read ahead during the attach (single-thread tracee),
    /// for nonstop mode's check of the other threads (`seccomp/prefetch.rs`).
    seccomp_prefetch: Option<seccomp::prefetch::Prefetch>,
    /// How many of those states the reading thread read (for the trace).
    seccomp_read_ahead: usize,
    /// Nonstop mode's check of the threads its handler may run in is left to the switch's
    /// first look ([`Tracee::check_seccomp_handler_threads_later`]).
    handler_threads_left: bool,
    /// The process's `statm`, read at every listing of its threads (`proc_dir::main_exited`).
    _statm: proc_dir::KeptStatm,
}

impl std::fmt::Debug for Tracee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracee")
            .field("pid", &self.pid)
            .field("threads", &self.threads.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Memory protection / mapping flags re-exported for callers of [`Tracee::mmap`].
pub mod prot {
    /// PROT_READ
    pub const READ: u64 = libc::PROT_READ as u64;
    /// PROT_WRITE
    pub const WRITE: u64 = libc::PROT_WRITE as u64;
    /// PROT_EXEC
    pub const EXEC: u64 = libc::PROT_EXEC as u64;
}

fn list_tasks(pid: i32) -> Result<Vec<i32>> {
    let dir =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|err| match err.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => ProcessError::Permission(pid),
            _ => ProcessError::NoSuchProcess(pid),
        })?;
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    Ok(tids)
}

impl Tracee {
    /// Seizes every thread of `pid` (threads keep running). Threads created while we seize
    /// are picked up by rescanning until the set is stable. The per-process lock of
    /// [`Tracee::attach_one`] is taken too: ptrace's one-tracer rule alone keeps a nonstop
    /// livepatch out only while its one traced thread is seized, not while it re-picks one.
    pub fn attach(pid: i32) -> Result<Tracee> {
        let mut t = Tracee::open(pid, false, || lock_process_patiently(pid).map(Some))?;
        loop {
            while t.seize_new()? > 0 {}
            if !t.threads.is_empty() {
                return Ok(t);
            }
            // Every thread listed exited before its seize: the process too, or it lives on
            // in threads started since (see `thread_gone`), listed again.
            if proc_dir::exited(pid) {
                return Err(ProcessError::NoSuchProcess(pid));
            }
        }
    }

    /// A tracee of `pid` with no thread seized yet, after the checks every attach makes (the
    /// process exists, runs, and is not us); `lock` is taken after them.
    fn open(
        pid: i32,
        single: bool,
        lock: impl FnOnce() -> Result<Option<std::os::fd::OwnedFd>>,
    ) -> Result<Tracee> {
        if pid <= 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(ProcessError::NoSuchProcess(pid));
        }
        if proc_dir::exited(pid) {
            return Err(ProcessError::Exited(pid));
        }
        if pid as u32 == std::process::id() {
            return Err(ProcessError::IsSelf(pid));
        }
        let statm = proc_dir::KeptStatm::open(pid);
        let lock = lock()?;
        let mem = Memory::open(pid)?;
        maps_text::track(pid);
        Ok(Tracee {
            pid,
            mem,
            threads: BTreeMap::new(),
            syscall_insn: None,
            stub: None,
            stub_created: false,
            trap_hook: None,
            traps_handled: 0,
            detached: false,
            release_on_drop: false,
            single,
            until_unlock: Vec::new(),
            _lock: lock,
            walks: BTreeMap::new(),
            seccomp: BTreeMap::new(),
            looked: Vec::new(),
            seccomp_prefetch: None,
            seccomp_read_ahead: 0,
            handler_threads_left: false,
            _statm: statm,
        })
    }

    /// Seizes ONE thread of `pid`, to borrow for system calls (nonstop mode): the others are
    /// never traced, so they never stop for us. Preferred: a thread blocked in a system call
    /// other than futex (it was not running anyway, and holds no libc lock), then any thread
    /// blocked in a system call, then the main thread, and a thread blocked in a call that a
    /// stop ends with EINTR (`epoll_wait`...) last; within each, the one least likely to
    /// want a CPU soon by a short look and by its life so far, and not one that blocks SIGTRAP
    /// (see `borrow.rs` for the look and when it ends).
    ///
    /// ptrace's one-tracer rule no longer keeps a second livepatch out (it would seize another
    /// thread), so a per-process lock is taken too: an abstract unix socket named after the
    /// pid, released by the kernel when we close it or die.
    pub fn attach_one(pid: i32) -> Result<Tracee> {
        Tracee::attach_one_looked(BorrowLook::start(pid))
    }

    /// [`Tracee::attach_one`] with a look begun earlier ([`BorrowLook::start`]): an apply
    /// begins it before it locates the target module, whose time then counts as look time.
    pub fn attach_one_looked(begun: BorrowLook) -> Result<Tracee> {
        let BorrowLook {
            pid,
            look,
            prefetch,
            statm: _statm,
        } = begun;
        let mut t = Tracee::open(pid, true, || lock_process_patiently(pid).map(Some))?;
        t.seccomp_prefetch = prefetch;
        t.seize_one(look)?;
        Ok(t)
    }

    /// Seizes the best thread to borrow (see [`Tracee::attach_one`]), looked for by `look`
    /// (another look when the thread picked is gone before it is seized).
    fn seize_one(&mut self, look: borrow::Look) -> Result<()> {
        let mut look = Some(look);
        for _ in 0..100 {
            let look = look.take().unwrap_or_else(|| borrow::Look::start(self.pid));
            let picked = match borrow_forced(self.pid) {
                Some(tid) => Some(tid),
                None => look.pick(),
            };
            let Some(tid) = picked else {
                // Every thread looked at is gone: the process too, or it has others now.
                if proc_dir::exited(self.pid) {
                    return Err(ProcessError::Exited(self.pid));
                }
                continue;
            };
            match ptrace::seize(tid) {
                Ok(()) => {
                    self.threads.insert(tid, Thread::default());
                    self.looked = look.into_files();
                    // Kept (two descriptors each) only while they leave 256 under the
                    // descriptor limit for the preparation (ELF files, /proc reads); the
                    // switch keeps what its own budget allows (`descriptor_budget`, whose
                    // count of the open descriptors is a directory read: not made here).
                    if 2 * self.looked.len() + 256 > observe::descriptor_limit() {
                        self.looked.clear();
                    }
                    return Ok(());
                }
                Err(e) if seized_a_dead_thread(self.pid, tid, &e) => continue,
                Err(e) => return Err(ProcessError::from_ptrace("SEIZE", self.pid, tid, e)),
            }
        }
        Err(ProcessError::Exited(self.pid))
    }

    /// Seizes every other thread too (a single-thread tracee becomes an ordinary one).
    pub fn attach_rest(&mut self) -> Result<()> {
        self.single = false;
        while self.seize_new()? > 0 {}
        Ok(())
    }

    /// Whether only one thread is traced.
    pub fn is_single(&self) -> bool {
        self.single
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The target's memory.
    pub fn mem(&self) -> &Memory {
        &self.mem
    }

    /// Thread ids currently traced.
    pub fn threads(&self) -> Vec<i32> {
        self.threads.keys().copied().collect()
    }

    /// The files the borrow's look opened for each thread it looked at ([`Tracee::attach_one`];
    /// none after the first call, or for another tracee): descriptors on the threads
    /// themselves, which read fresh values at each read and nothing once their thread is gone
    /// (`observe::ThreadFiles`), so a nonstop switch's first look at the threads reads them
    /// instead of opening two files per thread again (its `Threads` checks each kept entry
    /// still reads, as it does for its own).
    pub(crate) fn take_looked_files(&mut self) -> Vec<observe::ThreadFiles> {
        std::mem::take(&mut self.looked)
    }

    /// Installs the handler for `int3` traps taken by traced threads (nonstop mode).
    pub fn set_trap_hook(&mut self, hook: Option<TrapHook>) {
        self.trap_hook = hook;
    }

    /// Drops what [`Tracee::keep_until_unlock`] kept now: a sync agent told to exit is waited
    /// for (at most a second), so that a look at the process's threads does not find it.
    pub(crate) fn drop_kept(&mut self) {
        self.until_unlock.clear();
    }

    fn seize_new(&mut self) -> Result<usize> {
        // A sync agent told to exit is gone first: it is no thread of the program to seize.
        self.drop_kept();
        let mut added = 0;
        for tid in list_tasks(self.pid)? {
            if self.threads.contains_key(&tid) {
                continue;
            }
            match ptrace::seize(tid) {
                Ok(()) => {
                    self.threads.insert(tid, Thread::default());
                    added += 1;
                }
                // The thread exited between the listing and the seize.
                Err(e) if seized_a_dead_thread(self.pid, tid, &e) => {}
                Err(e) => return Err(ProcessError::from_ptrace("SEIZE", self.pid, tid, e)),
            }
        }
        Ok(added)
    }

    /// Thread `tid` has exited (and is reaped). An error only when the process has exited.
    ///
    /// Every thread traced may be gone while the process lives on in threads started since
    /// (review 10, H1: a main thread that exited, threads that each live a few milliseconds).
    /// A thread we hold stopped cannot exit on its own: only running ones are gone, so none
    /// the caller is using. The set is left empty then, not refilled here: a thread seized
    /// now would be running, and callers take every traced thread for stopped once
    /// [`Tracee::stop_all`] has returned; the threads the process has now are seized (and
    /// stopped) by the next [`Tracee::stop_all`] or [`Tracee::stop_any`], as at the attach.
    fn thread_gone(&mut self, tid: i32) -> Result<()> {
        self.threads.remove(&tid);
        let alive = !proc_dir::exited(self.pid);
        // The one borrowed thread exited, not the process: borrow another.
        if self.single && self.threads.is_empty() && alive {
            return self.seize_one(borrow::Look::start(self.pid));
        }
        if !alive {
            self.threads.clear();
            return Err(ProcessError::Exited(self.pid));
        }
        Ok(())
    }

    /// Handles one wait report of `tid`. Returns true when the thread is now stopped for us.
    fn handle_report(&mut self, tid: i32, status: WaitStatus) -> Result<bool> {
        if let Some(walk) = self.walks.remove(&tid) {
            self.walk_on(tid, walk, status)?;
            return Ok(false);
        }
        match status {
            WaitStatus::EventStop | WaitStatus::OtherEvent(_) | WaitStatus::Syscall => {
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.stopped = true;
                }
                Ok(true)
            }
            WaitStatus::Gone => {
                self.thread_gone(tid)?;
                Ok(false)
            }
            WaitStatus::Signal(libc::SIGTRAP) if self.redirect_trap(tid)? => Ok(false),
            WaitStatus::Signal(sig) => {
                // Not ours: deliver it now, as if we had never been there.
                ptrace::cont(tid, sig)
                    .map_err(|e| ProcessError::from_ptrace("CONT", self.pid, tid, e))?;
                Ok(false)
            }
        }
    }

    /// A thread stopped with SIGTRAP: if it is one of our int3 sites, move it on and resume
    /// it with the signal suppressed.
    fn redirect_trap(&mut self, tid: i32) -> Result<bool> {
        let Some(hook) = self.trap_hook.as_mut() else {
            return Ok(false);
        };
        let mut regs = match ptrace::get_regs(tid) {
            Ok(r) => r,
            Err(_) => return Ok(false),
        };
        let Some(dest) = hook(regs.rip.wrapping_sub(1)) else {
            return Ok(false);
        };
        regs.rip = dest;
        ptrace::set_regs(tid, &regs)
            .map_err(|e| ProcessError::from_ptrace("SETREGS", self.pid, tid, e))?;
        ptrace::cont(tid, 0).map_err(|e| ProcessError::from_ptrace("CONT", self.pid, tid, e))?;
        self.traps_handled += 1;
        Ok(true)
    }

    /// Waits for the next report of `tid`. Reports of other threads that arrive meanwhile are
    /// handled on the spot: waiting on one tid alone can deadlock when the process dies (a
    /// thread-group leader's exit is reported only after every other thread was reaped).
    fn wait_for(&mut self, tid: i32) -> Result<WaitStatus> {
        let mut looked = false;
        loop {
            // Our thread first: with many threads trapping (nonstop mode), a plain wait on any
            // thread can keep returning theirs and starve the one we wait for.
            match ptrace::wait(tid, true) {
                Ok(Some((_, st))) => return Ok(st),
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {}
                Err(e) => return Err(ProcessError::from_ptrace("WAIT", self.pid, tid, e)),
            }
            // A main thread that exited while traced (pthread_exit, the others running on) is
            // reported only with the whole process: it would be waited for forever (a stop
            // asked of it never comes). Looked at once, before the first blocking wait: a
            // thread that has reported already costs nothing, and the other threads' reports
            // while it stops cost no /proc read each (in a stop window). (A main thread that
            // exits after that look is not seen: a window of microseconds, in which it must
            // be on its way out while a stop is asked of it.) Told by its address space, let go
            // on the way out before it becomes a zombie (`proc_dir::main_exited`: a `pread` of
            // the `statm` the tracee keeps open, where its `stat` would be opened at each remote
            // call).
            if tid == self.pid
                && !std::mem::replace(&mut looked, true)
                && proc_dir::main_exited(self.pid)
            {
                return Ok(WaitStatus::Gone);
            }
            match ptrace::wait(-1, false) {
                Ok(Some((who, st))) if who == tid => return Ok(st),
                Ok(Some((who, st))) => {
                    if self.threads.contains_key(&who) {
                        self.handle_report(who, st)?;
                    }
                }
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(WaitStatus::Gone),
                Err(e) => return Err(ProcessError::from_ptrace("WAIT", self.pid, tid, e)),
            }
        }
    }

    /// Waits until `tid`, asked to stop (PTRACE_INTERRUPT), is stopped for us.
    fn wait_stopped(&mut self, tid: i32) -> Result<()> {
        while self.threads.get(&tid).is_some_and(|t| !t.stopped) {
            let st = self.wait_for(tid)?;
            let signal_stop = matches!(st, WaitStatus::Signal(_));
            self.handle_report(tid, st)?;
            // Any ptrace stop spends a pending interrupt (`ptrace_stop`): a thread that was
            // already on its way to take a signal when asked stops for the signal instead,
            // and once continued with it would never stop for us (review 12, L3: a window of
            // a few instructions). Asked again; when the interrupt came during that stop it
            // is still pending, and asking again changes nothing.
            if signal_stop && self.threads.get(&tid).is_some_and(|t| !t.stopped) {
                let _ = ptrace::interrupt(tid);
            }
        }
        Ok(())
    }

    /// Stops one thread (for borrowing it to run system calls).
    pub fn stop_thread(&mut self, tid: i32) -> Result<()> {
        let Some(t) = self.threads.get(&tid) else {
            return Err(ProcessError::Unexpected {
                pid: self.pid,
                tid,
                what: "not traced".into(),
            });
        };
        if t.stopped {
            return Ok(());
        }
        match ptrace::interrupt(tid) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                // Exited meanwhile: reap it.
            }
            Err(e) => return Err(ProcessError::from_ptrace("INTERRUPT", self.pid, tid, e)),
        }
        self.wait_stopped(tid)
    }

    /// Stops one thread, preferring one known to run without seccomp (a thread a remote call
    /// already ran on: nonstop mode's borrowed thread, once every thread is traced), then the
    /// main thread; returns its tid.
    pub fn stop_any(&mut self) -> Result<i32> {
        loop {
            let tid = if let Some(tid) = self.known_unfiltered() {
                tid
            } else if self.threads.contains_key(&self.pid) {
                self.pid
            } else {
                match self.threads.keys().next() {
                    Some(&t) => t,
                    // Every thread traced exited: the process too, or it has others now.
                    None if proc_dir::exited(self.pid) => {
                        return Err(ProcessError::Exited(self.pid))
                    }
                    None => {
                        while self.seize_new()? > 0 {}
                        continue;
                    }
                }
            };
            self.stop_thread(tid)?;
            if self.threads.contains_key(&tid) {
                return Ok(tid);
            }
        }
    }

    /// Stops every thread of the process at one point, including threads created meanwhile.
    pub fn stop_all(&mut self) -> Result<()> {
        loop {
            let running: Vec<i32> = self
                .threads
                .iter()
                .filter(|(_, t)| !t.stopped)
                .map(|(&tid, _)| tid)
                .collect();
            if running.is_empty() {
                // A thread may have cloned before it stopped: seize the newcomers, stopped in
                // the next round. So are the threads of a process whose every traced thread
                // exited while it ran (see `thread_gone`): it lives on in others.
                if self.seize_new()? > 0 {
                    continue;
                }
                if !self.threads.is_empty() {
                    return Ok(());
                }
                if proc_dir::exited(self.pid) {
                    return Err(ProcessError::Exited(self.pid));
                }
                continue;
            }
            for &tid in &running {
                match ptrace::interrupt(tid) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(ProcessError::from_ptrace("INTERRUPT", self.pid, tid, e)),
                }
            }
            for tid in running {
                self.wait_stopped(tid)?;
            }
        }
    }

    /// Lets one stopped thread run again.
    pub fn resume_thread(&mut self, tid: i32) -> Result<()> {
        self.start_resume(tid)?;
        self.finish_let_go()
    }

    /// [`Tracee::resume_thread`] up to the thread's way back into a system call our stop
    /// interrupted, which the caller follows ([`Tracee::finish_let_go`]).
    fn start_resume(&mut self, tid: i32) -> Result<()> {
        let Some(t) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        if !t.stopped {
            return Ok(());
        }
        self.fix_restart(tid)?;
        let Some(t) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        t.stopped = false;
        // Signals held back while we used the thread: taken when it leaves the stop, through
        // the kernel's own delivery (and restart decision). (A thread gone takes nothing.)
        for held in std::mem::take(&mut t.deferred) {
            let _ = held.resend(self.pid, tid);
        }
        self.let_go(tid, 0, Release::Resume)
    }

    /// Lets every stopped thread run again. Threads borrowed for remote system calls go last:
    /// each first takes a round trip through a stop of its own (`fix_restart`), which the
    /// others need not wait for (in stop mode they would stay stopped past the window). Threads
    /// going back into an interrupted system call are followed there once all run (the way
    /// back of one may need another: restart.rs).
    pub fn resume_all(&mut self) -> Result<()> {
        let mut first_err = None;
        let (borrowed, plain): (Vec<i32>, Vec<i32>) = self.threads().into_iter().partition(|t| {
            self.threads
                .get(t)
                .is_some_and(|t| t.stopped && t.after_remote_syscall)
        });
        for tid in plain.into_iter().chain(borrowed) {
            if let Err(e) = self.start_resume(tid) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.finish_let_go() {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Services pending reports without blocking: int3 traps (nonstop mode) and signals to
    /// forward. Returns how many reports were handled.
    pub fn poll_events(&mut self) -> Result<usize> {
        let mut n = 0;
        loop {
            match ptrace::wait(-1, true) {
                Ok(Some((tid, st))) => {
                    n += 1;
                    if !self.threads.contains_key(&tid) {
                        continue;
                    }
                    self.handle_report(tid, st)?;
                }
                Ok(None) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(n),
                Err(e) => return Err(ProcessError::from_ptrace("WAIT", self.pid, -1, e)),
            }
        }
    }

    /// Whether thread `tid` has a SIGTRAP queued that it has not taken yet (nonstop mode uses
    /// this to know that no thread is between an int3 and its report).
    pub fn sigtrap_pending(&self, tid: i32) -> bool {
        observe::signal_in(self.pid, tid, libc::SIGTRAP, &["SigPnd", "ShdPnd"])
    }

    /// Where thread `tid` is blocked in a system call, without stopping it: the user
    /// instruction pointer from /proc/PID/task/TID/syscall, or `None` when it is running (or
    /// not in a system call). A thread blocked in a system call resumes at that address.
    pub fn blocked_in_syscall_at(&self, tid: i32) -> Option<u64> {
        let text =
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/syscall", self.pid)).ok()?;
        let fields: Vec<&str> = text.split_whitespace().collect();
        let nr: i64 = fields.first()?.parse().ok()?;
        if nr < 0 || fields.len() < 9 {
            return None;
        }
        u64::from_str_radix(fields.last()?.trim_start_matches("0x"), 16).ok()
    }

    /// Registers of a stopped thread.
    pub fn regs(&self, tid: i32) -> Result<Regs> {
        ptrace::get_regs(tid).map_err(|e| ProcessError::from_ptrace("GETREGS", self.pid, tid, e))
    }

    /// Sets registers of a stopped thread.
    pub fn set_regs(&self, tid: i32, regs: &Regs) -> Result<()> {
        ptrace::set_regs(tid, regs)
            .map_err(|e| ProcessError::from_ptrace("SETREGS", self.pid, tid, e))
    }

    /// Runs system call `nr` inside the target on a stopped thread; returns the raw result.
    /// The thread runs it from our resume stub (see `stub.rs`): should this tool be killed
    /// meanwhile, the thread goes back to its own code by itself.
    pub fn syscall_raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        let slot = self.stub_slot()?;
        let tid = self.stopped_thread()?;
        let r = self.run_syscall_on(tid, slot.syscall_insn(), Some(slot), nr, args);
        if matches!(r, Err(ProcessError::Exited(_))) {
            self.threads.clear();
        }
        r
    }

    /// A stopped thread to borrow (stopping one when none is).
    pub(crate) fn stopped_thread(&mut self) -> Result<i32> {
        match self.threads.iter().find(|(_, t)| t.stopped) {
            Some((&tid, _)) => Ok(tid),
            None => self.stop_any(),
        }
    }

    /// The stub slot of this invocation: the process's area found again, or created by the
    /// one remote system call that runs unguarded (an `mmap` through a `syscall` instruction
    /// of the target's own code: nothing of ours exists yet).
    pub(crate) fn stub_slot(&mut self) -> Result<stub::Slot> {
        if let Some(s) = self.stub {
            return Ok(s);
        }
        let slot = match stub::locate(self.pid, &self.mem) {
            Some(area) => stub::take_slot(self.pid, &self.mem, area)?,
            None => {
                let insn = match self.syscall_insn {
                    Some(a) => a,
                    None => {
                        let a = syscall::find_syscall_instruction(self.pid, &self.mem)?;
                        self.syscall_insn = Some(a);
                        a
                    }
                };
                let tid = self.stopped_thread()?;
                let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
                let args = [
                    0,
                    stub::AREA_LEN,
                    prot::READ | prot::EXEC,
                    flags,
                    u64::MAX,
                    0,
                ];
                let r = self.run_syscall_on(tid, insn, None, libc::SYS_mmap, args);
                if matches!(r, Err(ProcessError::Exited(_))) {
                    self.threads.clear();
                }
                let r = r?;
                if (-4095..0).contains(&r) {
                    return Err(ProcessError::RemoteSyscall {
                        name: "mmap",
                        pid: self.pid,
                        err: io::Error::from_raw_os_error(-r as i32),
                    });
                }
                self.stub_created = true;
                maps_text::changed(self.pid);
                stub::install(&self.mem, r as u64)?
            }
        };
        self.stub = Some(slot);
        Ok(slot)
    }

    /// Clears the busy mark of this invocation's stub slot (the threads are being let go).
    fn release_stub_slot(&mut self) {
        if let Some(slot) = self.stub.take() {
            let _ = stub::release(&self.mem, slot);
        }
    }

    /// Unmaps the stub's area if this invocation created it: an operation that failed leaves
    /// the process as it was. Like its creation, the `munmap` runs unguarded (the `syscall`
    /// of the area cannot unmap the code that follows it).
    pub fn remove_stub_if_created(&mut self) {
        let Some(slot) = self.stub.filter(|_| self.stub_created) else {
            return;
        };
        let (Some(insn), Ok(tid)) = (self.syscall_insn, self.stopped_thread()) else {
            return;
        };
        let args = [slot.area(), stub::AREA_LEN, 0, 0, 0, 0];
        if self
            .run_syscall_on(tid, insn, None, libc::SYS_munmap, args)
            .is_ok_and(|r| r == 0)
        {
            self.stub = None;
            self.stub_created = false;
        }
    }

    /// Runs system call `nr` on the stopped thread `tid` through the `syscall` at `insn`;
    /// `guard`: the stub slot `insn` belongs to, which is told the thread's own context first.
    fn run_syscall_on(
        &mut self,
        tid: i32,
        insn: u64,
        guard: Option<stub::Slot>,
        nr: i64,
        args: [u64; 6],
    ) -> Result<i64> {
        // Not made at all when the thread's seccomp filters would not let it through.
        self.vet_syscall(tid, nr, args, insn + 2)?;
        let mut saved = self.regs(tid)?;
        if let Some(slot) = guard {
            slot.guard(&self.mem, &saved)?;
        }
        let filtered = self.seccomp_filtered(tid);
        self.set_regs(tid, &syscall::prepare(&saved, insn, nr, args))?;
        if guard.is_some() {
            stop_point::reached_with("remote-syscall", nr);
        }
        let mut stepped = self.step_past(tid, insn, &mut saved, guard);
        if stepped.is_ok() && filtered && observe::sigsys_forced(self.pid, tid) {
            // A filter that kills on this call skips it, puts the call's number back in rax
            // (its "result") and forces a SIGSYS that no tracer can hold back: the process is
            // as good as gone. (vet_syscall refuses beforehand the calls it can evaluate.)
            stepped = Err(ProcessError::Exited(self.pid));
        }
        if nr == libc::SYS_munmap {
            // Perhaps the state or the stub's area (see maps_text).
            maps_text::changed(self.pid);
        }
        // Restore whatever happened: the thread must continue exactly where it was (or where
        // a trap it took meanwhile sends it).
        let after = stepped.and_then(|()| self.regs(tid));
        if let Some(t) = self.threads.get_mut(&tid) {
            // The registers as the kernel left them; whether its interrupted system call is
            // restarted by hand is decided when the thread runs again (fix_restart).
            t.after_remote_syscall = true;
            self.set_regs(tid, &saved)?;
        }
        Ok(after?.rax as i64)
    }

    /// Thread `tid` was run through a system call of ours by its caller (the sync agent's
    /// clone, see `SyncAgent::start`) and sits in its syscall-exit stop, its own registers
    /// restored: as after [`Tracee::syscall_raw`], an interrupted call of its own is restarted
    /// when it runs again ([`Tracee::fix_restart`]). (Marked before its first resume, so a
    /// caller that gives up half-way errs on the side of the extra round trip, which is
    /// harmless: an interrupt and a continue from the stop it sits in.)
    pub(crate) fn runs_syscall_of_ours(&mut self, tid: i32) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.after_remote_syscall = true;
        }
    }

    /// Called right before thread `tid` runs its own code again. After a remote system call
    /// it sits in a syscall-exit stop, its own registers restored, from which the kernel
    /// resumes the registers as they are and restarts nothing: a call of its own that our
    /// stop interrupted would return -ERESTARTSYS (512) and friends to the program.
    ///
    /// So the thread is sent back into the kind of stop it was taken from: PTRACE_INTERRUPT
    /// (on a thread already stopped it takes effect when the current stop ends), resumed from
    /// the syscall-exit stop, it stops again in get_signal (PTRACE_EVENT_STOP) before returning
    /// to user mode, its registers untouched. Resuming it from there runs the kernel's own
    /// signal delivery and system call restart: EINTR for a handler without SA_RESTART, a
    /// restart with no signal to take — exactly as after our first interrupt. (Restarting the
    /// call by hand instead, as earlier versions did, lost the EINTR of a signal arriving
    /// between the decision and the thread's re-entry into its call — a window as long as the
    /// thread's wake-up, which on a loaded machine is milliseconds.)
    fn fix_restart(&mut self, tid: i32) -> Result<()> {
        let Some(t) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        if !std::mem::take(&mut t.after_remote_syscall) {
            return Ok(());
        }
        match ptrace::interrupt(tid) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return self.thread_gone(tid),
            Err(e) => return Err(ProcessError::from_ptrace("INTERRUPT", self.pid, tid, e)),
        }
        match ptrace::cont(tid, 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return self.thread_gone(tid),
            Err(e) => return Err(ProcessError::from_ptrace("CONT", self.pid, tid, e)),
        }
        if let Some(t) = self.threads.get_mut(&tid) {
            t.stopped = false;
        }
        self.wait_stopped(tid)
    }

    /// Executes one instruction of the stopped thread `tid` (it stays stopped). Used with no
    /// int3 of ours in place (stop mode): a SIGTRAP the thread had pending is kept for later.
    pub fn single_step(&mut self, tid: i32) -> Result<()> {
        self.fix_restart(tid)?;
        let before = self.regs(tid)?.rip;
        loop {
            ptrace::single_step(tid)
                .map_err(|e| ProcessError::from_ptrace("SINGLESTEP", self.pid, tid, e))?;
            match self.wait_for(tid)? {
                WaitStatus::Signal(libc::SIGTRAP) if self.regs(tid)?.rip != before => return Ok(()),
                WaitStatus::Signal(sig) => {
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.deferred.push(HeldSignal::take(tid, sig));
                    }
                }
                WaitStatus::Gone => {
                    self.thread_gone(tid)?;
                    return Err(ProcessError::Exited(self.pid));
                }
                WaitStatus::EventStop | WaitStatus::OtherEvent(_) | WaitStatus::Syscall => {}
            }
        }
    }

    /// Runs `tid` through the `syscall` instruction at `insn`, from its entry stop to its
    /// exit stop (PTRACE_SYSCALL: a single-step's trap would be a forced SIGTRAP, which resets
    /// a SIG_IGN or blocked SIGTRAP of the target to SIG_DFL). A signal that was pending on
    /// the thread is reported before the system call: it belongs to the thread's own context
    /// `saved`. A SIGTRAP of one of our int3 sites is redirected there (the thread took the
    /// trap before we borrowed it); any other signal is kept for later delivery.
    fn step_past(
        &mut self,
        tid: i32,
        insn: u64,
        saved: &mut Regs,
        guard: Option<stub::Slot>,
    ) -> Result<()> {
        let mut entered = false;
        loop {
            ptrace::syscall(tid)
                .map_err(|e| ProcessError::from_ptrace("SYSCALL", self.pid, tid, e))?;
            match self.wait_for(tid)? {
                WaitStatus::Syscall => {
                    let rip = self.regs(tid)?.rip;
                    if rip != insn + 2 {
                        return Err(ProcessError::Unexpected {
                            pid: self.pid,
                            tid,
                            what: format!(
                                "remote syscall stopped at {rip:#x}, expected {:#x}",
                                insn + 2
                            ),
                        });
                    }
                    if entered {
                        return Ok(());
                    }
                    entered = true;
                }
                WaitStatus::Signal(libc::SIGTRAP) => {
                    // A SIGTRAP the thread had pending.
                    let dest = self
                        .trap_hook
                        .as_mut()
                        .and_then(|hook| hook(saved.rip.wrapping_sub(1)));
                    match dest {
                        Some(d) => {
                            saved.rip = d;
                            self.traps_handled += 1;
                            // Where the thread resumes without us, too.
                            if let Some(slot) = guard {
                                slot.guard(&self.mem, saved)?;
                            }
                        }
                        None => {
                            if let Some(t) = self.threads.get_mut(&tid) {
                                t.deferred.push(HeldSignal::take(tid, libc::SIGTRAP));
                            }
                        }
                    }
                }
                // A signal arrived before our instruction ran: keep it for later.
                WaitStatus::Signal(sig) => {
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.deferred.push(HeldSignal::take(tid, sig));
                    }
                }
                WaitStatus::Gone => {
                    self.thread_gone(tid)?;
                    return Err(ProcessError::Exited(self.pid));
                }
                WaitStatus::EventStop | WaitStatus::OtherEvent(_) => {}
            }
        }
    }

    /// Runs a system call inside the target and turns a negative result into an error.
    pub fn syscall(&mut self, name: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let r = self.syscall_raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(ProcessError::RemoteSyscall {
                name,
                pid: self.pid,
                err: io::Error::from_raw_os_error(-r as i32),
            });
        }
        Ok(r as u64)
    }

    /// `mmap` inside the target. `fixed_noreplace` puts the mapping exactly at `addr` or fails.
    pub fn mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: u64,
        flags: i32,
        fd: i64,
        offset: u64,
    ) -> Result<u64> {
        self.syscall(
            "mmap",
            libc::SYS_mmap,
            [addr, len, prot, flags as u64, fd as u64, offset],
        )
    }

    /// `munmap` inside the target.
    pub fn munmap(&mut self, addr: u64, len: u64) -> Result<()> {
        self.syscall("munmap", libc::SYS_munmap, [addr, len, 0, 0, 0, 0])
            .map(drop)
    }

    /// `mprotect` inside the target.
    pub fn mprotect(&mut self, addr: u64, len: u64, prot: u64) -> Result<()> {
        self.syscall("mprotect", libc::SYS_mprotect, [addr, len, prot, 0, 0, 0])
            .map(drop)
    }

    /// Creates a memfd named `name` inside the target, sized `len`, maps it shared
    /// read/write there, closes the descriptor, and returns the mapping's address.
    pub fn map_memfd(&mut self, name: &str, len: u64) -> Result<u64> {
        self.map_memfd_as(name, len, libc::MAP_SHARED)
    }

    /// [`Tracee::map_memfd`], mapped private: the pages (written through /proc/PID/mem, which
    /// copies them on write) belong to this process alone, and a child forked from it gets a
    /// copy of their contents at the fork instead of sharing them.
    pub fn map_memfd_private(&mut self, name: &str, len: u64) -> Result<u64> {
        self.map_memfd_as(name, len, libc::MAP_PRIVATE)
    }

    fn map_memfd_as(&mut self, name: &str, len: u64, sharing: i32) -> Result<u64> {
        let tid = self.stop_any()?;
        // A filter may test close's descriptor: the close that ends this is vetted now, with
        // the descriptor memfd_create will return (the lowest free one), before anything is
        // made. (Each call is vetted again as it is made.)
        if self.next_call_filtered()? {
            let fd = seccomp::lowest_free_fd(self.pid);
            self.vet_ahead(libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        }
        // Scratch space for the name: below the stopped thread's stack pointer, past the red
        // zone; the bytes there are restored afterwards.
        let rsp = self.regs(tid)?.rsp;
        let scratch = (rsp - 1024) & !15;
        let mut name_bytes = name.as_bytes().to_vec();
        name_bytes.push(0);
        let saved = self.mem.read_vec(scratch, name_bytes.len())?;
        self.mem.write(scratch, &name_bytes)?;
        let fd = self.syscall(
            "memfd_create",
            libc::SYS_memfd_create,
            [scratch, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0],
        );
        self.mem.write(scratch, &saved)?;
        let fd = fd?;
        let close = |t: &mut Tracee| match t.syscall("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])
        {
            // Refused by a filter after all (the descriptor was not the one foreseen): the
            // same through close_range, if that passes.
            Err(ProcessError::Seccomp { .. }) => {
                t.syscall("close_range", libc::SYS_close_range, [fd, fd, 0, 0, 0, 0])
            }
            r => r,
        };
        if let Err(e) = self.syscall("ftruncate", libc::SYS_ftruncate, [fd, len, 0, 0, 0, 0]) {
            let _ = close(self);
            return Err(e);
        }
        let addr = self.mmap(
            0,
            len,
            prot::READ | prot::WRITE,
            sharing | libc::MAP_POPULATE,
            fd as i64,
            0,
        );
        // A mapping of livepatch's own (the state, nonstop's area): see maps_text.
        maps_text::changed(self.pid);
        let _ = close(self);
        addr
    }

    /// Registers the process for membarrier SYNC_CORE ([`Tracee::sync_cores`] does it at its
    /// first use otherwise). Cheap once registered; the first time it waits for every CPU to
    /// pass a scheduling point (150 ms was seen on a loaded machine), which nonstop mode
    /// spends before its first `int3` rather than inside the window.
    pub fn register_sync_cores(&mut self) -> Result<()> {
        const REGISTER_SYNC_CORE: u64 = 1 << 6; // MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE
        self.syscall(
            "membarrier",
            libc::SYS_membarrier,
            [REGISTER_SYNC_CORE, 0, 0, 0, 0, 0],
        )
        .map(drop)
    }

    /// Makes every thread execute a serializing instruction (membarrier SYNC_CORE run inside
    /// the target), so that code written meanwhile is seen by all of them. Registers the
    /// process for SYNC_CORE the first time (EPERM). Without SYNC_CORE (EINVAL: a kernel
    /// without it) it fails: a plain membarrier orders memory but does not serialize
    /// instruction fetch, which cross-modified code needs.
    pub fn sync_cores(&mut self) -> Result<()> {
        const REGISTER_SYNC_CORE: u64 = 1 << 6; // MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE
        const SYNC_CORE: u64 = 1 << 5; // MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE
        let t0 = std::time::Instant::now();
        let r = self.syscall_raw(libc::SYS_membarrier, [SYNC_CORE, 0, 0, 0, 0, 0])?;
        if std::env::var_os("LIVEPATCH_TRACE").is_some() {
            eprintln!(
                "livepatch: trace: membarrier -> {r} in {} us",
                t0.elapsed().as_micros()
            );
        }
        if r == -(libc::EPERM as i64) {
            self.syscall(
                "membarrier",
                libc::SYS_membarrier,
                [REGISTER_SYNC_CORE, 0, 0, 0, 0, 0],
            )?;
            self.syscall(
                "membarrier",
                libc::SYS_membarrier,
                [SYNC_CORE, 0, 0, 0, 0, 0],
            )?;
        } else if r < 0 {
            return Err(ProcessError::RemoteSyscall {
                name: "membarrier",
                pid: self.pid,
                err: io::Error::from_raw_os_error(-r as i32),
            });
        }
        Ok(())
    }

    /// Lets every thread go: stopped ones are detached where they are, running ones are
    /// stopped briefly first (ptrace can only detach a stopped thread). Signals that arrived
    /// while we held a thread are re-queued to it.
    pub fn detach(mut self) -> Result<()> {
        self.detach_all()
    }

    /// Lets every thread go without stopping the running ones again: stopped threads are
    /// detached where they are (one going back into a system call our stop interrupted is
    /// followed into it first, and then runs on: restart.rs); running threads stay traced
    /// until the calling thread exits, when the kernel detaches them (exit_ptrace). Only for a thread that exits right after:
    /// see [`with_tracer_thread`]. Much faster than [`Tracee::detach`] on a busy process,
    /// whose running threads would each have to be stopped first.
    pub fn release(mut self) -> Result<()> {
        self.release_all()
    }

    /// Keeps `thing` until the threads are let go (the tracee released or dropped), and drops it
    /// then, before the per-process lock is given up: a nonstop switch's sync agent, told to
    /// exit, whose exit is waited for there — beside the release of the borrowed thread, not
    /// before it — and still before another livepatch may find it alive. (Dropped sooner when
    /// more threads are seized — [`Tracee::attach_rest`] must not find such an agent — or
    /// threads are looked at: [`Tracee::drop_kept`].)
    pub(crate) fn keep_until_unlock(&mut self, thing: Box<dyn std::any::Any>) {
        self.until_unlock.push(thing);
    }

    /// Makes dropping this tracee [`Tracee::release`] it instead of detaching (for use inside
    /// [`with_tracer_thread`]).
    pub fn release_on_drop(&mut self) {
        self.release_on_drop = true;
    }

    fn release_all(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        self.release_stub_slot();
        let mut first_err = None;
        for tid in self.threads() {
            if self.threads.get(&tid).is_some_and(|t| t.stopped) {
                if let Err(e) = self.fix_restart(tid) {
                    first_err.get_or_insert(e);
                }
            }
            let Some(t) = self.threads.get_mut(&tid) else {
                continue;
            };
            let deferred = std::mem::take(&mut t.deferred);
            let stopped = t.stopped;
            for held in deferred {
                let _ = held.resend(self.pid, tid);
            }
            if stopped {
                if let Err(e) = self.let_go(tid, 0, Release::Leave) {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.finish_let_go() {
            first_err.get_or_insert(e);
        }
        self.threads.clear();
        first_err.map_or(Ok(()), Err)
    }

    fn detach_all(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        self.release_stub_slot();
        let mut first_err = None;
        for tid in self.threads() {
            if let Err(e) = self.start_detach(tid) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.finish_let_go() {
            first_err.get_or_insert(e);
        }
        self.threads.clear();
        first_err.map_or(Ok(()), Err)
    }

    /// Detaches one thread (stopping it first when it runs), its held-back signals re-queued.
    fn detach_thread(&mut self, tid: i32) -> Result<()> {
        let started = self.start_detach(tid);
        let walked = self.finish_let_go();
        started.and(walked)
    }

    /// [`Tracee::detach_thread`] up to the thread's way back into a system call our stop
    /// interrupted, which the caller follows ([`Tracee::finish_let_go`]).
    fn start_detach(&mut self, tid: i32) -> Result<()> {
        let stopped = self.threads.get(&tid).map(|t| t.stopped).unwrap_or(true);
        let mut sig = 0;
        if !stopped {
            if ptrace::interrupt(tid).is_err() {
                return Ok(());
            }
            match self.wait_for(tid) {
                Ok(WaitStatus::Signal(s)) => sig = s,
                Ok(WaitStatus::Gone) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
        let fixed = self.fix_restart(tid);
        let deferred = self
            .threads
            .get_mut(&tid)
            .map(|t| std::mem::take(&mut t.deferred))
            .unwrap_or_default();
        for held in deferred {
            let _ = held.resend(self.pid, tid);
        }
        let let_go = self.let_go(tid, sig, Release::Detach);
        fixed.and(let_go)
    }

    /// Holds `signal`, taken from thread `tid` by someone else than this tracee (nonstop's
    /// sync-agent start-up), with the signals the tracee holds for that thread: all are sent
    /// again when the thread is let go, in the order they were taken (a list of its own, sent
    /// before or after them, would reorder queued signals of one number). Sent again at once
    /// when `tid` is no longer traced.
    pub(crate) fn hold(&mut self, tid: i32, signal: HeldSignal) {
        let Some(t) = self.threads.get_mut(&tid) else {
            let _ = signal.resend(self.pid, tid);
            return;
        };
        let at = t
            .deferred
            .iter()
            .position(|d| signal.taken_before(d))
            .unwrap_or(t.deferred.len());
        t.deferred.insert(at, signal);
    }

    /// Makes a tracee of every thread ([`Tracee::attach_rest`]) a single-thread one again:
    /// every thread but one stopped thread (the one borrowed so far) is detached.
    pub fn keep_one(&mut self) -> Result<()> {
        let keep = self.stopped_thread()?;
        let mut first_err = None;
        for tid in self.threads() {
            if tid == keep {
                continue;
            }
            if let Err(e) = self.detach_thread(tid) {
                first_err.get_or_insert(e);
            }
            self.threads.remove(&tid);
        }
        self.single = true;
        first_err.map_or(Ok(()), Err)
    }
}

/// Whether PTRACE_SEIZE of thread `tid` of `pid` failed with `err` because the thread has
/// exited: ESRCH once it is reaped, EPERM before — the kernel refuses to attach to a task whose
/// exit state is set (a thread between its exit and its reaping, for a few microseconds; a
/// main thread that called pthread_exit, a zombie until the whole process ends). Such a thread
/// runs no code any more: it is skipped, not taken for a lack of permission (a nonstop revert
/// on a process whose threads come and go failed that way about once in 100-300, after its
/// switch: tests/e2e_nonstop_thread_churn.rs).
pub(crate) fn seized_a_dead_thread(pid: i32, tid: i32, err: &std::io::Error) -> bool {
    match err.raw_os_error() {
        Some(libc::ESRCH) => true,
        Some(libc::EPERM) => proc_dir::thread_exited(pid, tid),
        _ => false,
    }
}

/// Runs `f` (which creates, uses and releases a [`Tracee`]) on a thread of its own that exits
/// when `f` returns, so that the kernel detaches every thread still traced by it. Returns only
/// once that detach has happened: the next tracer (another apply, gdb) can attach at once.
pub fn with_tracer_thread<T: Send, E: From<ProcessError> + Send>(
    f: impl FnOnce() -> std::result::Result<T, E> + Send,
) -> std::result::Result<T, E> {
    with_tracer_thread_while(f, || {})
}

/// [`with_tracer_thread`], running `meanwhile` on the calling thread while the tracer thread
/// works (instead of a thread of its own that only waits). When no thread can be started (a
/// limit on threads), `meanwhile` still runs and the error is [`ProcessError::ThreadStart`]
/// (review session 4, S9: a panic).
pub fn with_tracer_thread_while<T: Send, E: From<ProcessError> + Send>(
    f: impl FnOnce() -> std::result::Result<T, E> + Send,
    meanwhile: impl FnOnce(),
) -> std::result::Result<T, E> {
    let (result, tracer_tid) = std::thread::scope(|s| {
        let tracer = std::thread::Builder::new()
            .name("livepatch-tracer".into())
            .spawn_scoped(s, || {
                // SAFETY: gettid has no arguments and cannot fail.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
                let r = f();
                crate::cli::trace_point("tracer returned");
                (r, tid)
            });
        crate::cli::trace_point("tracer started");
        meanwhile();
        crate::cli::trace_point("meanwhile done");
        match tracer {
            Ok(tracer) => tracer
                .join()
                .map(|(r, tid)| (r, Some(tid)))
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Err(e) => (Err(ProcessError::ThreadStart(e).into()), None),
        }
    });
    let Some(tracer_tid) = tracer_tid else {
        return result;
    };
    crate::cli::trace_point("tracer joined");
    wait_until_reaped(tracer_tid);
    crate::cli::trace_point("tracer reaped");
    result
}

/// Waits until our thread `tid` has left the kernel's thread list. `join` returns when the
/// thread's exit clears its tid word, which the kernel does *before* it detaches the thread's
/// tracees (exit_mm comes before exit_notify → exit_ptrace); a seize in that window fails
/// with EPERM. The thread is unlisted only after exit_ptrace, so its absence is the signal.
fn wait_until_reaped(tid: i32) {
    let path = format!("/proc/self/task/{tid}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut pause = std::time::Duration::from_micros(20);
    while std::path::Path::new(&path).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(2));
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.release_on_drop {
            let _ = self.release_all();
        } else {
            let _ = self.detach_all();
        }
        maps_text::untrack(self.pid);
    }
}

/// [`lock_process`], retried for a short while when the lock is taken but nobody traces the
/// process: the name of an abstract socket lives as long as any copy of its descriptor, and a
/// child forked by another thread of the previous holder (a test harness, a Python program)
/// keeps a copy until its exec closes it (CLOEXEC). Another livepatch really at work traces a
/// thread and is reported at once.
fn lock_process_patiently(pid: i32) -> Result<std::os::fd::OwnedFd> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    let mut pause = std::time::Duration::from_micros(100);
    loop {
        match lock_process(pid) {
            Err(ProcessError::Unexpected { what, .. })
                if what == LOCK_HELD && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

const LOCK_HELD: &str = "another livepatch is working on this process";

/// Takes the per-process livepatch lock: binds the abstract unix socket
/// `livepatch-lock-NS-PID` ([`lock_name`]). Busy: another livepatch works on the process.
///
/// Abstract socket names live in a network namespace — the one the socket was created in. A
/// livepatch in another namespace (`unshare -n`, a container agent sharing the host's pids)
/// must meet the same name (review session 4, S7: it ran beside one stopped mid-switch, and
/// the first one's commit dropped the second's record), so the socket is created in the
/// *target's* network namespace ([`lock_socket`]), and named from what every viewer of the
/// target agrees on, not the pid this tool sees.
fn lock_process(pid: i32) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    // The namespaces, read through a live thread (the main thread may have exited).
    let through = proc_dir::dir(pid);
    let owned = lock_socket(pid, &through)?;
    let fd = owned.as_raw_fd();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = lock_name(pid, &through);
    // sun_path[0] = 0: the abstract namespace (no file, gone with the socket).
    for (dst, b) in addr.sun_path[1..].iter_mut().zip(name.bytes()) {
        *dst = b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    let r = unsafe {
        libc::bind(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EADDRINUSE) {
            // The other livepatch traces one thread: name it as any other tracer.
            if let Some(tracer) = observe::tasks(pid)
                .into_iter()
                .map(|tid| observe::tracer_pid(pid, tid))
                .find(|&p| p != 0)
            {
                return Err(ProcessError::AlreadyTraced {
                    pid,
                    tracer,
                    name: std::fs::read_to_string(format!("/proc/{tracer}/comm"))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_else(|_| "gone".into()),
                });
            }
            return Err(ProcessError::Unexpected {
                pid,
                tid: pid,
                what: LOCK_HELD.into(),
            });
        }
        return Err(ProcessError::Unexpected {
            pid,
            tid: pid,
            what: format!("cannot take the livepatch lock: {err}"),
        });
    }
    Ok(owned)
}

/// The lock's name for process `pid`: `livepatch-lock-NS-PID` with NS the inode of its pid
/// namespace and PID its pid there (the last of /proc/PID/status's `NSpid`), which every
/// livepatch sees alike, whatever pid namespace it runs in (the pid it sees may differ).
/// `livepatch-lock-PID` when they cannot be read. `through`: [`proc_dir::dir`] of `pid`.
fn lock_name(pid: i32, through: &str) -> String {
    let ns_through = |through: &str| {
        std::fs::read_link(format!("{through}/ns/pid"))
            .ok()
            .and_then(|l| {
                let l = l
                    .to_str()?
                    .strip_prefix("pid:[")?
                    .strip_suffix(']')?
                    .to_string();
                l.parse::<u64>().ok()
            })
    };
    // A thread read through (the main thread has exited) may exit first, its namespace links
    // with it: another is tried, or two livepatches would take locks of different names
    // (review 10, H1: threads that live a few milliseconds).
    let own = format!("/proc/{pid}");
    let mut ns = ns_through(through);
    let mut through = through.to_string();
    for _ in 0..4 {
        if ns.is_some() || through == own {
            break;
        }
        through = proc_dir::dir(pid);
        ns = ns_through(&through);
    }
    let own_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))?
                .split_whitespace()
                .last()?
                .parse::<u32>()
                .ok()
        });
    match (ns, own_pid) {
        (Some(ns), Some(own)) => format!("livepatch-lock-{ns}-{own}"),
        _ => format!("livepatch-lock-{pid}"),
    }
}

/// A unix socket created in process `pid`'s network namespace, for the lock: made on a
/// short-lived thread that enters that namespace first (`setns` moves the calling thread
/// only, and a socket keeps the namespace it was created in). Where that is refused (no
/// privilege over the target's namespace), the socket is made in ours, as before: two
/// livepatches in different namespaces then do not see each other's lock. `through`:
/// [`proc_dir::dir`] of `pid`.
fn lock_socket(pid: i32, through: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let new_socket = || {
        // SAFETY: socket() takes no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        // SAFETY: fd is a fresh descriptor we own.
        (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    };
    // The usual case, the target in our own namespace, needs no thread.
    let ns_of = |path: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    };
    let ours = ns_of("/proc/self/ns/net");
    if ours.is_some() && ours == ns_of(&format!("{through}/ns/net")) {
        if let Some(fd) = new_socket() {
            return Ok(fd);
        }
    }
    let in_target = std::fs::File::open(format!("{through}/ns/net"))
        .ok()
        .and_then(|netns| {
            std::thread::scope(|s| {
                // A thread the system refuses (a thread or process limit): the socket is made
                // in our namespace, as when setns is refused (review session 6, 5: the
                // scope's own spawn panicked there).
                std::thread::Builder::new()
                    .spawn_scoped(s, || {
                        // SAFETY: setns takes a descriptor we own; it changes this thread's
                        // network namespace only, and the thread ends right after.
                        let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                        (entered == 0).then(new_socket).flatten()
                    })
                    .ok()?
                    .join()
                    .ok()
                    .flatten()
            })
        });
    in_target
        .or_else(new_socket)
        .ok_or_else(|| ProcessError::Unexpected {
            pid,
            tid: pid,
            what: format!("cannot create lock socket: {}", io::Error::last_os_error()),
        })
}

/// The variable of [`borrow_forced`].
const BORROW_COMM_VAR: &str = "LIVEPATCH_BORROW_COMM";

/// For tests only: `LIVEPATCH_BORROW_COMM=NAME` makes a thread of `pid` named NAME (its
/// `comm`, as `pthread_setname_np` sets it) the one [`Tracee::attach_one`] borrows, whatever
/// it is doing. Which thread is borrowed changes what a signal sent meanwhile meets (a worker
/// that blocks it, or the thread that waits for it): `tests/e2e_borrowed_signals.rs` forces
/// each. A process without such a thread is not affected; read here only.
fn borrow_forced(pid: i32) -> Option<i32> {
    let want = std::env::var_os(BORROW_COMM_VAR)?;
    observe::tasks(pid).into_iter().find(|tid| {
        std::fs::read(format!("/proc/{pid}/task/{tid}/comm"))
            .is_ok_and(|c| c.strip_suffix(b"\n").unwrap_or(&c) == want.as_encoded_bytes())
    })
}

/// The process no longer runs: gone, or every thread of it has exited (a zombie waiting to be
/// reaped). One whose main thread alone has exited runs on (see `proc_dir.rs`).
pub(crate) fn is_gone_or_zombie(pid: i32) -> bool {
    proc_dir::exited(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread that has exited and is not reaped (here a main thread that called
    /// pthread_exit: a zombie until the process ends) cannot be seized: EPERM, not ESRCH. It is
    /// told apart from a live thread that cannot be seized (here one we trace already: EPERM
    /// too), which stays an error.
    #[test]
    fn a_seize_refused_for_an_exited_thread_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = proc_dir::tests::spawn_with_exited_main_thread(dir.path());
        let pid = child.id() as i32;
        let worker = list_tasks(pid)
            .unwrap()
            .into_iter()
            .find(|&t| t != pid)
            .expect("the worker");
        let (dead, live) = std::thread::spawn(move || {
            let dead = ptrace::seize(pid).expect_err("a zombie cannot be seized");
            assert_eq!(dead.raw_os_error(), Some(libc::EPERM));
            ptrace::seize(worker).expect("seize the worker");
            let again = ptrace::seize(worker).expect_err("seized twice");
            assert_eq!(again.raw_os_error(), Some(libc::EPERM));
            let verdicts = (
                seized_a_dead_thread(pid, pid, &dead),
                seized_a_dead_thread(pid, worker, &again),
            );
            let _ = ptrace::detach(worker, 0);
            verdicts
        })
        .join()
        .unwrap();
        assert!(dead, "the exited main thread is taken for a gone thread");
        assert!(!live, "a live thread's EPERM stays an error");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Review N10: a stop-mode tracee holds the same per-process lock as a nonstop one, so
    /// that a nonstop livepatch cannot start on the process meanwhile (and the other way).
    #[test]
    fn attach_takes_the_per_process_lock() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let pid = child.id() as i32;
        let t = with_tracer_thread(|| {
            let t = Tracee::attach(pid)?;
            let held = lock_process(pid).is_err();
            t.detach()?;
            Ok::<_, ProcessError>(held)
        })
        .expect("attach and detach");
        assert!(t, "the lock was free while a stop-mode tracee existed");
        assert!(lock_process(pid).is_ok(), "the lock outlived the tracee");
        let _ = child.kill();
        let _ = child.wait();
    }
}

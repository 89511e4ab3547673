//! Looking at a target's threads without stopping them: what /proc tells about each thread's
//! activity, CPU time and signals. Nonstop mode relies on these so that it never has to stop
//! a running thread.

/// What a thread is doing, as far as /proc/PID/task/TID/syscall tells without stopping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// On a CPU or waiting for one: its registers cannot be seen without stopping it.
    Running,
    /// Not running: blocked in system call `syscall` (or, `None`, sleeping outside one: a
    /// page fault, a job-control stop), and it resumes in user mode at `pc`.
    Blocked {
        /// The system call number, if in one.
        syscall: Option<i64>,
        /// Its user stack pointer.
        sp: u64,
        /// Its user instruction pointer.
        pc: u64,
    },
}

/// The thread ids of process `pid` (empty when it is gone), but for a main thread that has
/// exited while the others run on (a zombie until the process ends, see `proc_dir.rs`): it
/// runs no code, and can be neither looked at nor borrowed.
pub fn tasks(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    if let Ok(main) = tids.binary_search(&pid) {
        if super::proc_dir::main_exited(pid) {
            tids.remove(main);
        }
    }
    tids
}

/// What thread `tid` of `pid` is doing, or `None` when it is gone.
pub fn activity(pid: i32, tid: i32) -> Option<Activity> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    Some(parse_syscall_line(&text))
}

fn parse_syscall_line(text: &str) -> Activity {
    let hex = |f: &str| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok();
    let mut fields = [""; 9];
    let mut n = 0;
    for f in text.split_whitespace() {
        if n == fields.len() {
            return Activity::Running;
        }
        fields[n] = f;
        n += 1;
    }
    let nr = fields[0].parse::<i64>().ok();
    match (nr, n) {
        // "NR arg1..arg6 sp pc" in a system call, "-1 sp pc" blocked outside one.
        (Some(nr), 9) if nr >= 0 => match (hex(fields[7]), hex(fields[8])) {
            (Some(sp), Some(pc)) => Activity::Blocked {
                syscall: Some(nr),
                sp,
                pc,
            },
            _ => Activity::Running,
        },
        (Some(-1), 3) => match (hex(fields[1]), hex(fields[2])) {
            (Some(sp), Some(pc)) => Activity::Blocked {
                syscall: None,
                sp,
                pc,
            },
            _ => Activity::Running,
        },
        _ => Activity::Running,
    }
}

/// A thread's /proc/PID/task/TID/schedstat: "runtime run_delay run_count".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedStat {
    /// CPU time consumed, in nanoseconds: updated by the scheduler at ticks and switches, so
    /// for a thread on a CPU it may lag, never lead.
    pub runtime_ns: u64,
    /// Time spent runnable, waiting for a CPU, in nanoseconds (updated at switches).
    pub run_delay_ns: u64,
    /// Times the thread was switched in (exact: bumped at every switch-in).
    pub run_count: u64,
}

/// One thread's /proc files, opened once and read again from offset 0 at each look (a
/// seq_file regenerates its text then): a look costs one read, not a path walk, an open and
/// a close. The files refer to the thread itself: once it is gone they read nothing, even if
/// its id is reused.
#[derive(Debug)]
pub struct ThreadFiles {
    pid: i32,
    tid: i32,
    syscall: Handle,
    schedstat: Handle,
    status: Option<std::fs::File>,
    /// The thread's `stat`, opened by another look for a later one to keep (see
    /// [`ThreadFiles::take_stat`]).
    stat: Option<std::fs::File>,
    /// Descriptors are kept (see [`ThreadFiles::by_path`] for the other way).
    kept: bool,
}

/// A /proc file of a thread: a descriptor kept open, or its path, opened at each read.
#[derive(Debug)]
enum Handle {
    Kept(std::fs::File),
    Path(String),
}

impl Handle {
    fn read<'a>(&self, buf: &'a mut [u8]) -> Option<&'a str> {
        match self {
            Handle::Kept(f) => read_at_start(f, buf),
            Handle::Path(p) => read_at_start(&std::fs::File::open(p).ok()?, buf),
        }
    }
}

impl ThreadFiles {
    /// Opens thread `tid` of `pid`; `None` when it is gone (or no descriptor is left).
    pub fn open(pid: i32, tid: i32) -> Option<ThreadFiles> {
        let open = |name: &str| std::fs::File::open(format!("/proc/{pid}/task/{tid}/{name}")).ok();
        Some(ThreadFiles {
            pid,
            tid,
            syscall: Handle::Kept(open("syscall")?),
            schedstat: Handle::Kept(open("schedstat")?),
            status: None,
            stat: None,
            kept: true,
        })
    }

    /// Thread `tid` of `pid` with no descriptor kept: each read opens its file, reads it and
    /// closes it (for a process with more threads than the tool may keep descriptors for:
    /// RLIMIT_NOFILE is 1024 for many users, and a thread whose files cannot be opened must
    /// not pass for a gone one — review 9, F1). Such a file names the thread by its id: one
    /// that ends and whose id is given to a new thread within the switch (the kernel hands
    /// ids out in turn up to pid_max) would be taken for it. `None` when it is gone.
    pub fn by_path(pid: i32, tid: i32) -> Option<ThreadFiles> {
        let path = |name: &str| format!("/proc/{pid}/task/{tid}/{name}");
        std::path::Path::new(&format!("/proc/{pid}/task/{tid}"))
            .exists()
            .then(|| ThreadFiles {
                pid,
                tid,
                syscall: Handle::Path(path("syscall")),
                schedstat: Handle::Path(path("schedstat")),
                status: None,
                stat: None,
                kept: false,
            })
    }

    /// The thread id.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Hands on the thread's `stat`, opened by another look (the attach's reads ahead, see
    /// `seccomp/prefetch.rs`): it must be this thread's, open on /proc/PID/task/TID/stat.
    pub(crate) fn set_stat(&mut self, stat: std::fs::File) {
        self.stat = Some(stat);
    }

    /// The thread's `stat` handed on with these files, if any (the switch's `Threads` keeps it
    /// open instead of opening it).
    pub(crate) fn take_stat(&mut self) -> Option<std::fs::File> {
        self.stat.take()
    }

    /// As [`activity`].
    pub fn activity(&self) -> Option<Activity> {
        let mut buf = [0u8; 256];
        Some(parse_syscall_line(self.syscall.read(&mut buf)?))
    }

    /// As [`runtime_ns`].
    pub fn runtime_ns(&self) -> Option<u64> {
        let mut buf = [0u8; 128];
        self.schedstat
            .read(&mut buf)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The thread's CPU time and run count (see [`SchedStat`]); `None` when it is gone.
    pub fn schedstat(&self) -> Option<SchedStat> {
        let mut buf = [0u8; 128];
        let mut f = self.schedstat.read(&mut buf)?.split_whitespace();
        let runtime_ns = f.next()?.parse().ok()?;
        let run_delay_ns = f.next()?.parse().ok()?;
        let run_count = f.next()?.parse().ok()?;
        Some(SchedStat {
            runtime_ns,
            run_delay_ns,
            run_count,
        })
    }

    /// As [`signal_in`] (the status file is opened at the first call).
    pub fn signal_in(&mut self, sig: i32, fields: &[&str]) -> bool {
        self.signal_mask(fields) & bit(sig) != 0
    }

    /// The union of the signal masks `fields` of the thread's status (0 when it is gone).
    pub fn signal_mask(&mut self, fields: &[&str]) -> u64 {
        if !self.kept {
            return std::fs::read_to_string(format!("/proc/{}/task/{}/status", self.pid, self.tid))
                .map_or(0, |s| masks(&s, fields));
        }
        if self.status.is_none() {
            self.status =
                std::fs::File::open(format!("/proc/{}/task/{}/status", self.pid, self.tid)).ok();
        }
        let Some(f) = &self.status else {
            return 0;
        };
        let mut buf = [0u8; 4096];
        read_at_start(f, &mut buf).map_or(0, |s| masks(s, fields))
    }
}

/// Threads whose files a look may keep open: a quarter of the descriptors the tool has left
/// under its RLIMIT_NOFILE (a nonstop switch keeps three per thread, four with its `status`),
/// less a margin for everything else the tool opens meanwhile (its own /proc reads, the
/// agent's, the patch's files). The others are read by path at each look: slower, never
/// skipped.
pub fn descriptor_budget() -> usize {
    let open = std::fs::read_dir("/proc/self/fd").map_or(1024, |d| d.count());
    descriptor_limit().saturating_sub(open + 128) / 4
}

/// The tool's RLIMIT_NOFILE (soft), at most 2^20; 0 when it cannot be read.
pub fn descriptor_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `lim` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur.min(1 << 20) as usize
}

fn read_at_start<'a>(f: &std::fs::File, buf: &'a mut [u8]) -> Option<&'a str> {
    use std::os::unix::fs::FileExt;
    let n = f.read_at(buf, 0).ok()?;
    if n == 0 {
        return None;
    }
    std::str::from_utf8(&buf[..n]).ok()
}

/// Signal `sig`'s bit in a /proc status mask.
pub fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// The union of the signal masks `fields` (e.g. "SigPnd", "SigBlk") of a /proc status text.
fn masks(status: &str, fields: &[&str]) -> u64 {
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| fields.contains(k))
        .filter_map(|(_, v)| u64::from_str_radix(v.trim(), 16).ok())
        .fold(0, |all, m| all | m)
}

/// The union of the signal masks `fields` of a /proc status text already read (e.g. through a
/// kept descriptor).
pub fn status_masks(status: &str, fields: &[&str]) -> u64 {
    masks(status, fields)
}

/// CPU time thread `tid` has consumed, in nanoseconds (/proc/PID/task/TID/schedstat; updated
/// by the scheduler at ticks and switches, so it may lag, never lead). `None` when gone.
pub fn runtime_ns(pid: i32, tid: i32) -> Option<u64> {
    schedstat(pid, tid).map(|s| s.runtime_ns)
}

/// Thread `tid`'s CPU time and run count (see [`SchedStat`]), read once; `None` when it is gone.
pub fn schedstat(pid: i32, tid: i32) -> Option<SchedStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    let mut f = text.split_whitespace();
    let runtime_ns = f.next()?.parse().ok()?;
    let run_delay_ns = f.next()?.parse().ok()?;
    let run_count = f.next()?.parse().ok()?;
    Some(SchedStat {
        runtime_ns,
        run_delay_ns,
        run_count,
    })
}

/// How long thread `tid` has existed, in nanoseconds (its start time, field 22 of its stat, in
/// clock ticks after boot, against the boot-time clock); `None` when it is gone.
pub fn age_ns(pid: i32, tid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses: field 3 on.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start_ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: clock_gettime fills the timespec it is given; sysconf takes a constant.
    let (now, hz) = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
        (
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64,
        )
    };
    Some(now.saturating_sub(start_ticks * (1_000_000_000 / hz)))
}

/// What one read of a thread's stat tells of its life ([`life`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Life {
    /// How long it has existed, in nanoseconds (as [`age_ns`]).
    pub age_ns: u64,
    /// The signals among 1–32 it blocks (field 32, the low half of its status SigBlk).
    pub blocked: u64,
    /// It runs under a real-time policy (field 41: SCHED_FIFO, SCHED_RR or SCHED_DEADLINE).
    pub realtime: bool,
}

/// Thread `tid`'s [`Life`], from one read of its stat; `None` when it is gone.
pub fn life(pid: i32, tid: i32) -> Option<Life> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let start_ticks: u64 = fields.nth(19)?.parse().ok()?;
    let blocked: u64 = fields.nth(9)?.parse().ok()?;
    let policy: i32 = fields.nth(8)?.parse().ok()?;
    Some(Life {
        age_ns: age_since(start_ticks),
        blocked,
        realtime: matches!(policy, libc::SCHED_FIFO | libc::SCHED_RR | SCHED_DEADLINE),
    })
}

/// Linux's SCHED_DEADLINE (not in every libc).
pub(super) const SCHED_DEADLINE: i32 = 6;

/// Nanoseconds since `start_ticks` clock ticks after boot.
fn age_since(start_ticks: u64) -> u64 {
    // SAFETY: clock_gettime fills the timespec it is given; sysconf takes a constant.
    let (now, hz) = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
        (
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64,
        )
    };
    now.saturating_sub(start_ticks * (1_000_000_000 / hz))
}

/// Whether signal `sig` is in one of the masks `fields` (e.g. "SigPnd", "ShdPnd", "SigBlk")
/// of thread `tid`'s status.
pub fn signal_in(pid: i32, tid: i32, sig: i32, fields: &[&str]) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .is_ok_and(|status| masks(&status, fields) & bit(sig) != 0)
}

/// Whether thread `tid` has a SIGSYS in its own pending set that it does not block: what a
/// seccomp filter's kill leaves on the calling thread (`force_sig_seccomp` queues it on the
/// thread, never the process-wide set, and unblocks it). A SIGSYS the thread blocks while it
/// waits in its set (sent by `tgkill`) is not one, even after a call the filter killed: the
/// kill unblocks it then (review 9, L1; checking the pending set alone, and only when it
/// had no SIGSYS before the call, missed that kill). An unblocked one pending before the call
/// is no trouble: the thread takes it (a signal stop, kept for later) on its way to the call.
pub fn sigsys_forced(pid: i32, tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).is_ok_and(|status| {
        let (pending, blocked) = (masks(&status, &["SigPnd"]), masks(&status, &["SigBlk"]));
        pending & !blocked & bit(libc::SIGSYS) != 0
    })
}

/// The union of the signal masks `fields` of process `pid`'s status (e.g. "SigCgt": the
/// signals it has handlers for); 0 when it is gone.
pub fn process_signal_mask(pid: i32, fields: &[&str]) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).map_or(0, |s| masks(&s, fields))
}

/// The pid of the process tracing thread `tid` of `pid`, or 0.
pub fn tracer_pid(pid: i32, tid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_lines() {
        assert_eq!(parse_syscall_line("running\n"), Activity::Running);
        assert_eq!(
            parse_syscall_line("230 0x1 0x0 0x7ffc 0x0 0x0 0x0 0x7ffd10 0x7f12345\n"),
            Activity::Blocked {
                syscall: Some(230),
                sp: 0x7ffd10,
                pc: 0x7f12345
            }
        );
        assert_eq!(
            parse_syscall_line("-1 0x7ffd10 0x401000\n"),
            Activity::Blocked {
                syscall: None,
                sp: 0x7ffd10,
                pc: 0x401000
            }
        );
    }

    #[test]
    fn this_thread_is_seen_running_and_a_sleeper_blocked() {
        let pid = std::process::id() as i32;
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        // A thread reading its own file is inside read(2): seen blocked in system call 0.
        assert!(matches!(
            activity(pid, me),
            Some(Activity::Blocked {
                syscall: Some(0),
                ..
            })
        ));
        assert!(runtime_ns(pid, me).is_some());
        // A spinning thread is seen running, and its CPU time grows.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stx, srx) = std::sync::mpsc::channel();
        let spin_stop = stop.clone();
        let spinner = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            stx.send(unsafe { libc::syscall(libc::SYS_gettid) } as i32)
                .unwrap();
            while !spin_stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let spin_tid = srx.recv().unwrap();
        let before = runtime_ns(pid, spin_tid).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while runtime_ns(pid, spin_tid).unwrap() == before {
            assert!(std::time::Instant::now() < deadline, "no CPU time seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(activity(pid, spin_tid), Some(Activity::Running));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.join().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ttx, trx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            // SAFETY: as above.
            ttx.send(unsafe { libc::syscall(libc::SYS_gettid) } as i32)
                .unwrap();
            let _ = rx.recv();
        });
        let tid = trx.recv().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !matches!(
            activity(pid, tid),
            Some(Activity::Blocked {
                syscall: Some(_),
                ..
            })
        ) {
            assert!(std::time::Instant::now() < deadline, "never seen blocked");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        tx.send(()).unwrap();
        h.join().unwrap();
        assert!(!signal_in(pid, me, libc::SIGTRAP, &["SigPnd", "ShdPnd"]));
        assert_eq!(tracer_pid(pid, me), 0);
    }

    #[test]
    fn kept_open_files_read_fresh_values_and_nothing_once_the_thread_is_gone() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::{Duration, Instant};
        let pid = std::process::id() as i32;
        let spin = std::sync::Arc::new(AtomicBool::new(false));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (ttx, trx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (s2, st2) = (spin.clone(), stop.clone());
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            ttx.send(unsafe { libc::syscall(libc::SYS_gettid) } as i32)
                .unwrap();
            let _ = go_rx.recv();
            s2.store(true, Ordering::SeqCst);
            while !st2.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let tid = trx.recv().unwrap();
        let files = ThreadFiles::open(pid, tid).unwrap();
        assert_eq!(files.tid(), tid);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Blocked in the channel's futex wait, with its stack pointer and pc.
        while !matches!(
            files.activity(),
            Some(Activity::Blocked {
                syscall: Some(nr), sp, pc
            }) if nr == libc::SYS_futex && sp != 0 && pc != 0
        ) {
            assert!(Instant::now() < deadline, "never seen blocked");
            std::thread::sleep(Duration::from_millis(1));
        }
        let asleep = files.schedstat().unwrap();
        go_tx.send(()).unwrap();
        while !spin.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Woken, so switched in once more: the run count moved.
        assert!(files.schedstat().unwrap().run_count > asleep.run_count);
        // The same descriptors now show it running, its CPU time growing.
        let before = files.runtime_ns().unwrap();
        while files.runtime_ns().unwrap() <= before + 1_000_000 {
            assert!(Instant::now() < deadline, "no CPU time seen");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(files.activity(), Some(Activity::Running));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        let mut files = files;
        let gone = Instant::now() + Duration::from_secs(5);
        while files.activity().is_some() {
            assert!(Instant::now() < gone, "a gone thread still reads");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(files.runtime_ns(), None);
        assert_eq!(files.schedstat(), None);
        assert!(!files.signal_in(libc::SIGTRAP, &["SigBlk"]));
    }
}

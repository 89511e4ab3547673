//! The target's threads as one nonstop switch looks at them: each thread's /proc files are
//! opened once, at the first look (the check of the signal masks, before anything is
//! written), and read again from offset 0 (`pread`) by every later look — the last look at
//! the signal masks before the first int3, every settle, the uninstall's wait — instead of a
//! path walk, an open and a close per file and look. On this project's 2-vCPU VM an open +
//! read + close of a thread's file costs 12-16 µs, a `pread` on a kept descriptor 1-7 µs
//! (`schedstat` 1, `syscall` 4, `stat` 7). A thread's `syscall` and `schedstat` are not even
//! opened there when the borrow's look (process/borrow.rs, at the attach) opened them: its
//! descriptors are handed on ([`Threads::with_files`]; at load 4-5 that first look took
//! ~100 µs instead of ~300 for an 8-thread target).
//!
//! The files refer to the thread itself (`observe::ThreadFiles`): once it is gone they read
//! nothing, even when its id is given to a new thread. [`Threads::current`] therefore checks
//! every kept entry whose id is listed again: one that no longer reads belongs to a gone
//! thread, and the id listed now may be a new thread's — its files are opened anew.

use crate::process::observe;
use std::collections::BTreeMap;
use std::fs::File;

/// One thread's kept files: `syscall` and `schedstat` (`observe::ThreadFiles`), and `stat`,
/// whose `signal` and `blocked` fields are the thread's own pending set and its mask — the
/// `SigPnd` and `SigBlk` of its `status` (the same words of the task, for signals 1-31), at
/// about half the cost of a read of `status` (7 µs against 12 µs here; `status` formats the
/// memory counters, the CPU lists and more).
pub(super) struct Thread {
    pub files: observe::ThreadFiles,
    /// Kept open, or `None`: opened at each read (see [`Threads::current`]).
    stat: Option<File>,
    stat_path: String,
}

/// A thread's signal words from its `stat` (signals 1-31 only: the kernel prints the low 31
/// bits of the first word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Signals {
    /// The thread's own pending set (`SigPnd`), not the process-wide one.
    pub pending: u64,
    /// Its mask (`SigBlk`).
    pub blocked: u64,
}

impl Thread {
    /// Its files kept open (`keep`, and descriptors left), or read by path at each look; `None`
    /// when it is gone.
    fn open(pid: i32, tid: i32, keep: bool) -> Option<Thread> {
        let stat_path = format!("/proc/{pid}/task/{tid}/stat");
        if keep {
            let kept = observe::ThreadFiles::open(pid, tid)
                .and_then(|files| Some((files, File::open(&stat_path).ok()?)));
            if let Some((files, stat)) = kept {
                return Some(Thread {
                    files,
                    stat: Some(stat),
                    stat_path,
                });
            }
        }
        // Not kept, or no descriptor left (EMFILE): a thread that is still there must be
        // looked at all the same — never taken for a gone one (review 9, F1).
        Some(Thread {
            files: observe::ThreadFiles::by_path(pid, tid)?,
            stat: None,
            stat_path,
        })
    }

    /// The text of the thread's `stat`, in `buf`; `None` when it is gone.
    fn stat<'a>(&self, buf: &'a mut [u8]) -> Option<&'a str> {
        match &self.stat {
            Some(f) => read_text(f, buf),
            None => read_text(&File::open(&self.stat_path).ok()?, buf),
        }
    }

    /// The thread's pending set and mask; `None` when it is gone.
    pub fn signals(&self) -> Option<Signals> {
        parse_stat_signals(self.stat(&mut [0u8; 1024])?)
    }

    /// Whether the thread has exited (a zombie, dead, or gone).
    fn exited(&self) -> bool {
        self.stat(&mut [0u8; 1024])
            .is_none_or(crate::process::proc_dir::stat_says_exited)
    }

    /// Whether signal `sig` (1-31) is in the thread's mask (false when it is gone).
    pub fn blocks(&self, sig: i32) -> bool {
        self.signals()
            .is_some_and(|s| s.blocked & observe::bit(sig) != 0)
    }

    /// Whether signal `sig` (1-31) is pending for the thread itself (false when it is gone).
    pub fn has_pending(&self, sig: i32) -> bool {
        self.signals()
            .is_some_and(|s| s.pending & observe::bit(sig) != 0)
    }

    /// The signals of `of` that the thread blocks: from `stat` when they are all below 32,
    /// else from `status` (its full 64-bit `SigBlk`).
    pub fn blocked_of(&mut self, of: u64) -> u64 {
        if of >> 31 == 0 {
            return self.signals().map_or(0, |s| s.blocked) & of;
        }
        self.files.signal_mask(&["SigBlk"]) & of
    }
}

/// The text of the /proc file `f` from its start, in `buf`; `None` when it reads nothing (its
/// thread or process is gone).
fn read_text<'a>(f: &File, buf: &'a mut [u8]) -> Option<&'a str> {
    use std::os::unix::fs::FileExt;
    let n = f.read_at(buf, 0).ok()?;
    if n == 0 {
        return None;
    }
    std::str::from_utf8(&buf[..n]).ok()
}

/// Fields 31 (`signal`) and 32 (`blocked`) of a /proc stat line, counted from 1. The command
/// name (field 2) may hold spaces and parentheses: fields are counted after its last `)`.
fn parse_stat_signals(stat: &str) -> Option<Signals> {
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    // `rest` starts at field 3.
    let pending = rest.nth(31 - 3)?.parse().ok()?;
    let blocked = rest.next()?.parse().ok()?;
    Some(Signals { pending, blocked })
}

/// The threads of one process, their files kept open for the whole switch; and the
/// process's own `status` and `stat`, opened at their first use.
pub(super) struct Threads {
    pid: i32,
    kept: BTreeMap<i32, Thread>,
    /// How many threads may have their files kept open (see `observe::descriptor_budget`).
    budget: usize,
    status: Option<std::io::Result<File>>,
    stat: Option<std::io::Result<File>>,
}

impl Threads {
    #[cfg(test)]
    pub fn new(pid: i32) -> Threads {
        Threads::with_files(pid, Vec::new())
    }

    /// The threads of `pid`, starting from `files` opened earlier (the borrow's look, see
    /// `Tracee::take_looked_files`): those threads' `syscall` and `schedstat` are not opened
    /// again, nor their `stat` when it came with them (the attach's reads ahead opened it:
    /// `seccomp/prefetch.rs`), else it is opened here. Each is checked at the first [`Threads::current`] like any
    /// kept entry: one whose thread is gone reads nothing and is dropped.
    pub fn with_files(pid: i32, files: Vec<observe::ThreadFiles>) -> Threads {
        let budget = observe::descriptor_budget();
        let mut kept = BTreeMap::new();
        for mut files in files.into_iter().take(budget) {
            let stat_path = format!("/proc/{pid}/task/{}/stat", files.tid());
            let opened = files.take_stat().map(Ok);
            let Ok(stat) = opened.unwrap_or_else(|| File::open(&stat_path)) else {
                continue; // gone, or no descriptor left: opened at the first look if listed
            };
            kept.insert(
                files.tid(),
                Thread {
                    files,
                    stat: Some(stat),
                    stat_path,
                },
            );
        }
        Threads {
            pid,
            kept,
            budget,
            status: None,
            stat: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// As `observe::process_signal_mask` (0 when the process is gone), through a kept
    /// descriptor.
    pub fn process_signal_mask(&mut self, fields: &[&str]) -> u64 {
        let pid = self.pid;
        let f = self
            .status
            .get_or_insert_with(|| File::open(format!("/proc/{pid}/status")));
        let mut buf = [0u8; 4096];
        f.as_ref()
            .ok()
            .and_then(|f| read_text(f, &mut buf))
            .map_or(0, |s| observe::status_masks(s, fields))
    }

    /// As `process::is_gone_or_zombie`, through kept descriptors: the main thread runs (its
    /// stat, the process's), or else a kept thread does — looked for among all the threads
    /// only when none does (`proc_dir.rs`: a main thread may exit before the others).
    pub fn process_gone(&mut self) -> bool {
        let pid = self.pid;
        let f = self
            .stat
            .get_or_insert_with(|| File::open(format!("/proc/{pid}/stat")));
        let mut buf = [0u8; 1024];
        let main_runs = f
            .as_ref()
            .ok()
            .and_then(|f| read_text(f, &mut buf))
            .is_some_and(|s| !crate::process::proc_dir::stat_says_exited(s));
        let runs = main_runs
            || self.kept.iter().any(|(&tid, t)| tid != pid && !t.exited())
            || !crate::process::proc_dir::exited(pid);
        !runs
    }

    /// The threads of the process now, in id order, except `skip`: /proc/PID/task listed
    /// again (threads come and go), the files of a thread not kept yet opened, those of a
    /// thread no longer listed dropped. A kept thread that reads nothing any more is gone;
    /// its id, listed, is a new thread's: opened anew.
    ///
    /// The check comes after the listing: a kept thread that still reads then was alive all
    /// along, so the id listed was its own (two live threads never share an id).
    pub fn current(&mut self, skip: &[i32]) -> Vec<i32> {
        let listed = observe::tasks(self.pid);
        // Only gone threads are dropped: an entry is never replaced while it reads (a wait
        // that looks its threads up by id later finds the same thread, or a gone one's id —
        // moved on either way).
        self.kept
            .retain(|tid, t| listed.binary_search(tid).is_ok() || t.files.schedstat().is_some());
        let mut now = Vec::with_capacity(listed.len());
        for tid in listed {
            if skip.contains(&tid) {
                continue;
            }
            let alive = self
                .kept
                .get(&tid)
                .is_some_and(|t| t.files.schedstat().is_some());
            if !alive {
                self.kept.remove(&tid);
                let keep = self.kept.len() < self.budget;
                match Thread::open(self.pid, tid, keep) {
                    Some(t) => {
                        self.kept.insert(tid, t);
                    }
                    None => continue, // gone
                }
            }
            now.push(tid);
        }
        now
    }

    /// Thread `tid`'s files, if it was listed by the last [`Threads::current`].
    pub fn get(&mut self, tid: i32) -> Option<&mut Thread> {
        self.kept.get_mut(&tid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_signal_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis; signal = 16 (SIGTRAP pending:
        // bit 4), blocked = 65536 + 16.
        let line = "1234 (a) b) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 9 0 500 \
                    1000000 200 18446744073709551615 1 1 0 0 0 16 65552 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            parse_stat_signals(line),
            Some(Signals {
                pending: 16,
                blocked: 65552
            })
        );
        assert_eq!(parse_stat_signals("1234 (x) S 1"), None);
    }

    /// The same words as `status` reads, on a real thread of this process that blocks
    /// SIGTRAP and has it pending.
    #[test]
    fn stat_and_status_agree_on_a_thread_with_sigtrap_blocked_and_pending() {
        let pid = std::process::id() as i32;
        let (ttx, trx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // SAFETY: sigset_t is plain data that the calls fill and read; tgkill sends
            // SIGTRAP to this very thread, which blocks it: it stays pending until
            // sigtimedwait takes it.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTRAP);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                let tid = libc::syscall(libc::SYS_gettid) as i32;
                libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGTRAP);
                ttx.send(tid).unwrap();
                let _ = go_rx.recv();
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
            }
        });
        let tid = trx.recv().unwrap();
        let mut threads = Threads::new(pid);
        assert!(threads.current(&[]).contains(&tid));
        let t = threads.get(tid).unwrap();
        assert!(t.blocks(libc::SIGTRAP));
        assert!(t.has_pending(libc::SIGTRAP));
        assert_eq!(
            t.blocked_of(observe::bit(libc::SIGTRAP)),
            observe::bit(libc::SIGTRAP)
        );
        assert!(observe::signal_in(pid, tid, libc::SIGTRAP, &["SigBlk"]));
        assert!(observe::signal_in(pid, tid, libc::SIGTRAP, &["SigPnd"]));
        // Not skipped when asked, and this thread (reading) blocks nothing of the kind.
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        assert!(!threads.current(&[me]).contains(&me));
        go_tx.send(()).unwrap();
        h.join().unwrap();
        expect_dropped(&mut threads, tid);
    }

    /// Thread `tid` has ended: it is dropped at a next listing, and its kept files with it.
    fn expect_dropped(threads: &mut Threads, tid: i32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while threads.current(&[]).contains(&tid) {
            assert!(std::time::Instant::now() < deadline, "still listed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(threads.get(tid).is_none());
    }

    /// Files opened earlier (the borrow's look, a `stat` the attach opened) are read by the
    /// first look, and dropped with their thread once it is gone, like those opened here.
    #[test]
    fn files_handed_on_are_read_and_dropped_with_their_thread() {
        let pid = std::process::id() as i32;
        let (ttx, trx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            ttx.send(unsafe { libc::syscall(libc::SYS_gettid) } as i32)
                .unwrap();
            let _ = go_rx.recv();
        });
        let tid = trx.recv().unwrap();
        let mut files = observe::ThreadFiles::open(pid, tid).unwrap();
        // Its stat, opened ahead (the attach's reads ahead do): kept, not opened again.
        let stat = File::open(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stat);
        files.set_stat(stat);
        let mut threads = Threads::with_files(pid, vec![files]);
        assert!(threads.kept.contains_key(&tid), "not taken");
        let kept = threads.kept[&tid].stat.as_ref();
        assert_eq!(kept.map(std::os::fd::AsRawFd::as_raw_fd), Some(fd));
        assert!(threads.current(&[]).contains(&tid));
        let t = threads.get(tid).unwrap();
        assert!(t.signals().is_some() && t.files.schedstat().is_some());
        go_tx.send(()).unwrap();
        h.join().unwrap();
        expect_dropped(&mut threads, tid);
    }
}

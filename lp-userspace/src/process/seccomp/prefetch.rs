//! The threads' seccomp states read ahead, for nonstop mode's check of the threads its trap
//! handler may run in (`Tracee::check_handler_threads`): one `status` read per thread, 20-50 µs
//! each here (the kernel formats the whole file; no other file tells a thread's seccomp mode),
//! 250-450 µs of an 8-thread target's attach when the tracer made them all after the borrow.
//!
//! A thread started with the attach reads them while the tracer looks for the thread to borrow,
//! takes the lock and seizes it; the check then reads whatever that thread has not read yet
//! itself, and uses a state read ahead only when it is recent ([`FRESH`]). The thread runs
//! under SCHED_IDLE: on CPU time no other thread wants, so never in the way of the target's
//! threads (a thread of the target that wakes preempts it at once). Under the default policy
//! the tool's two threads ran at once on this 2-CPU machine, and the bench's longest call
//! overlapping a revert looked longer for it (A/B at load 5-8: medians 27-31 µs without it,
//! 28-76 µs with it, most runs above 40). The check never waits
//! for it: a read it has not finished (it may be starved of a CPU for long) is made again by
//! the check. It allocates nothing while it runs at that priority (see `Queue::read_all`).
//! Without a thread (a limit on threads) the check reads every state itself, as before.
//!
//! Only the reads move: what a state means and what the check does with it (stopping a thread
//! whose filters must be read: ptrace is per tracer thread) stay on the tracer.
//!
//! The same thread opens each thread's `stat` too (for the first [`MAX_STATS`] threads), which
//! a nonstop switch keeps open for its looks at the signal masks (`nonstop/threads.rs`) and
//! would open at its start, on the apply's path: the descriptors are handed on with the
//! borrow's look's files (`ThreadFiles::take_stat`). Like those, they refer to the thread
//! itself and read its values afresh at each read; no value read here is handed on.

use super::Mode;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A state read ahead is used when its read began at most this long before the check. The
/// attach takes 0.3-2 ms (the borrow's look, up to its last step); a read older than this
/// (an attach that waited for another livepatch's lock) is made again. The check's reads are
/// milliseconds old by the first `int3` anyway: a thread that sandboxes itself after its read
/// is not seen, whenever that read was (see `check_handler_threads`).
pub(crate) const FRESH: Duration = Duration::from_millis(5);

/// At most this many threads get their `stat` opened ahead (the borrow's look keeps the files
/// of as many: `borrow::MAX_LOOKED`), and only while four descriptors per thread leave 512
/// under the tool's limit.
const MAX_STATS: usize = 100;

/// One thread's state as read ahead: mode and filter count (`None`: its status could not be
/// read, gone), when the read began, and its `stat` opened (see the module's documentation).
type Read = (Option<(Mode, u32)>, Instant, Option<File>);

struct Queue {
    tids: Vec<i32>,
    /// Each thread's `status` path, and its `stat` path for the first [`MAX_STATS`] threads:
    /// made before the reader starts, which allocates nothing (see [`Queue::read_all`]).
    paths: Vec<(CString, Option<CString>)>,
    /// The index of the next thread the reader reads.
    next: AtomicUsize,
    /// What the reader read, by index in `tids` (each slot locked only to be filled or
    /// emptied; the check passes over one it finds locked).
    done: Vec<Mutex<Option<Read>>>,
}

/// A status text fits in this (1.4 KiB here); a longer one is read as far as it goes, and
/// the fields read come near its end: not read (`None`), the check reads it again.
const STATUS_MAX: usize = 4096;

impl Queue {
    /// The queue of process `pid`'s threads (listed now); `None` when a path cannot be made.
    fn of(pid: i32) -> Option<Queue> {
        let room = crate::process::observe::descriptor_limit().saturating_sub(512) / 4;
        let tids = crate::process::observe::tasks(pid);
        let path = |tid: i32, name: &str| CString::new(format!("/proc/{pid}/task/{tid}/{name}"));
        let paths = tids
            .iter()
            .enumerate()
            .map(|(i, &tid)| {
                let stat = (i < MAX_STATS.min(room)).then(|| path(tid, "stat").ok());
                Some((path(tid, "status").ok()?, stat.flatten()))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Queue {
            next: AtomicUsize::new(0),
            done: tids.iter().map(|_| Mutex::new(None)).collect(),
            tids,
            paths,
        })
    }

    /// Thread `i`'s state and `stat`, read with `buf` (at least [`STATUS_MAX`] bytes), through
    /// system calls that allocate nothing in this process.
    fn read(&self, i: usize, buf: &mut [u8]) -> Read {
        let (status, stat) = &self.paths[i];
        let open = |path: &CString| {
            // SAFETY: `path` is a NUL-terminated string that lives through the call.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            // SAFETY: a descriptor just opened, owned by nobody else.
            (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
        };
        let stat = stat.as_ref().and_then(open);
        let began = Instant::now();
        let state = open(status).and_then(|f| {
            let mut n = 0;
            while n < buf.len() {
                match f.read_at(&mut buf[n..], n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(_) => return None,
                }
            }
            super::status_says(std::str::from_utf8(&buf[..n]).ok()?)
        });
        (state, began, stat)
    }

    /// The reader: reads the threads in turn until the last, or until told to stop, under
    /// SCHED_IDLE. Nothing is allocated meanwhile (its buffer is made and touched first): a
    /// thread of so low a priority may wait long for a CPU, and must not do so holding a lock
    /// of this process that the tracer takes (malloc's, or the address space's, which an `mmap`
    /// takes). It goes back to its policy before it ends (the end frees its stack, under the
    /// C library's stack lock), so it reads nothing when it could not: a thread leaves
    /// SCHED_IDLE only with CAP_SYS_NICE or an RLIMIT_NICE that allows its nice value (the
    /// kernel's rule), as it could not enter it when refused.
    fn read_all(&self) {
        let mut buf = [0u8; STATUS_MAX];
        std::hint::black_box(&mut buf);
        let policy = |policy| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sched_setscheduler with pid 0 changes the calling thread only, from a
            // sched_param that lives through the call.
            unsafe { libc::sched_setscheduler(0, policy, &param) }
        };
        if !may_leave_idle() || policy(libc::SCHED_IDLE) != 0 {
            return; // not out of the way: the check reads them all, as without this thread
        }
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tids.len() {
                break;
            }
            let read = self.read(i, &mut buf);
            if let Ok(mut slot) = self.done[i].lock() {
                *slot = Some(read);
            }
        }
        policy(libc::SCHED_OTHER);
    }
}

/// Whether the calling thread, once under SCHED_IDLE, may go back to SCHED_OTHER: it has
/// CAP_SYS_NICE, or its RLIMIT_NICE allows its nice value (20 - nice).
fn may_leave_idle() -> bool {
    // SAFETY: getpriority takes no pointer; for PRIO_PROCESS and 0 Linux answers for the
    // calling thread. getrlimit fills the rlimit it is given.
    let (nice, lim) = unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if libc::getrlimit(libc::RLIMIT_NICE, &mut lim) != 0 {
            lim.rlim_cur = 0;
        }
        (nice, lim.rlim_cur)
    };
    if lim >= (20 - nice.clamp(-20, 19)) as u64 {
        return true;
    }
    crate::process::capabilities::has_sys_nice()
}

/// What the reads ahead found, by thread id.
#[derive(Default)]
pub(crate) struct Ahead {
    /// The seccomp states read recently enough ([`FRESH`]).
    pub(crate) states: BTreeMap<i32, (Mode, u32)>,
    /// The threads' `stat` files, open.
    pub(crate) stats: BTreeMap<i32, File>,
    /// How many threads the reader read (the others were read by [`Prefetch::finish`]).
    pub(crate) by_reader: usize,
}

/// The reads ahead of one attach.
pub(crate) struct Prefetch {
    queue: Arc<Queue>,
}

impl Prefetch {
    /// Starts reading the states of process `pid`'s threads (listed now) on a thread of its
    /// own; `None` when no thread can be started, or the process has one thread only.
    pub(crate) fn start(pid: i32) -> Option<Prefetch> {
        let queue = Arc::new(Queue::of(pid)?);
        if queue.tids.len() < 2 {
            // Its one thread is the one borrowed, whose state the check reads after the stop
            // anyway (`check_seccomp_timed`): no thread is started for nothing.
            return None;
        }
        let q = queue.clone();
        std::thread::Builder::new()
            .name("livepatch-seccomp".into())
            .stack_size(64 * 1024)
            .spawn(move || q.read_all())
            .ok()?;
        Some(Prefetch { queue })
    }

    /// What was read ahead: the reader is told to stop, and what it has not read is read here
    /// (a read under way on it too: it is not waited for). A state whose read began more than
    /// [`FRESH`] ago is left out (the check reads it again), as is a thread whose status could
    /// not be read.
    pub(crate) fn finish(self) -> Ahead {
        let q = &self.queue;
        q.next.store(usize::MAX / 2, Ordering::Relaxed);
        let mut ahead = Ahead::default();
        let mut buf = vec![0u8; STATUS_MAX];
        for (i, &tid) in q.tids.iter().enumerate() {
            let read = q.done[i]
                .try_lock()
                .ok()
                .and_then(|mut slot| slot.take())
                .inspect(|_| ahead.by_reader += 1)
                .unwrap_or_else(|| q.read(i, &mut buf));
            let (state, began, stat) = read;
            if let Some(stat) = stat {
                ahead.stats.insert(tid, stat);
            }
            if let Some(state) = state.filter(|_| began.elapsed() <= FRESH) {
                ahead.states.insert(tid, state);
            }
        }
        ahead
    }
}

impl Drop for Prefetch {
    /// Not finished (the attach failed): the reader is told there is nothing left (it ends
    /// after the read it may be making).
    fn drop(&mut self) {
        self.queue.next.store(usize::MAX / 2, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threads listed are read (by the reader, or by the check for what the reader has
    /// not read), and what is read is what a read of the status says (this thread, which lives
    /// throughout, is among them), with the thread's own `stat` open; a state read too long ago
    /// is left out, its `stat` kept.
    #[test]
    fn the_threads_are_read_ahead_and_old_reads_are_left_out() {
        let pid = std::process::id() as i32;
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        let p = Prefetch::start(pid).expect("a thread");
        assert!(p.queue.tids.contains(&me));
        let ahead = p.finish();
        assert_eq!(
            ahead.states.get(&me).copied(),
            super::super::status(pid, me)
        );
        let mut buf = [0u8; 512];
        let n = std::os::unix::fs::FileExt::read_at(&ahead.stats[&me], &mut buf, 0).unwrap();
        let stat = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(stat.starts_with(&format!("{me} (")), "{stat}");
        // Every slot filled as the reader fills it (no reader here), then too old.
        let p = Prefetch {
            queue: Arc::new(Queue::of(pid).unwrap()),
        };
        let mut buf = [0u8; STATUS_MAX];
        for i in 0..p.queue.tids.len() {
            let read = p.queue.read(i, &mut buf);
            *p.queue.done[i].lock().unwrap() = Some(read);
        }
        std::thread::sleep(FRESH + Duration::from_millis(1));
        let old = p.finish();
        assert!(old.states.is_empty(), "reads older than FRESH were kept");
        assert!(
            old.stats.contains_key(&me),
            "the files are kept whatever their age"
        );
    }

    /// What `may_leave_idle` says is what the kernel does: a thread told it may, enters
    /// SCHED_IDLE and leaves it again.
    #[test]
    fn a_thread_that_may_leave_idle_does() {
        std::thread::spawn(|| {
            if !may_leave_idle() {
                return; // nothing to check without the privilege
            }
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: as in `read_all`: this thread's own policy, from a live sched_param.
            unsafe {
                assert_eq!(libc::sched_setscheduler(0, libc::SCHED_IDLE, &param), 0);
                assert_eq!(libc::sched_setscheduler(0, libc::SCHED_OTHER, &param), 0);
                assert_eq!(libc::sched_getscheduler(0), libc::SCHED_OTHER);
            }
        })
        .join()
        .unwrap();
    }
}

//! The threads' seccomp states read ahead, for nonstop mode's check of the threads its trap
//! handler may run in (`Tracee::check_handler_threads`): one `status` read per thread, 20-50 µs
//! each here (the kernel formats the whole file; no other file tells a thread's seccomp mode),
//! 250-450 µs of an 8-thread target's attach when the tracer made them all after the borrow.
//!
//! A thread started with the attach reads them while the tracer looks for the thread to borrow,
//! takes the lock and seizes it; the check then takes what is left itself (both take the
//! threads from one queue, so the tracer never waits for more than the one read under way), and
//! uses a state read ahead only when it is recent ([`FRESH`]). Without a thread (a limit on
//! threads), the check reads every state itself, as before.
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
use std::fs::File;
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
    pid: i32,
    tids: Vec<i32>,
    /// The first this many threads get their `stat` opened.
    stats: usize,
    /// The index of the next thread to read, taken by whichever side reads next.
    next: AtomicUsize,
    done: Mutex<Vec<(i32, Read)>>,
}

impl Queue {
    /// Reads the states left in the queue, one at a time.
    fn drain(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&tid) = self.tids.get(i) else {
                return;
            };
            let stat = (i < self.stats)
                .then(|| File::open(format!("/proc/{}/task/{tid}/stat", self.pid)).ok())
                .flatten();
            let began = Instant::now();
            let state = super::status(self.pid, tid);
            self.done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((tid, (state, began, stat)));
        }
    }
}

/// What the reads ahead found, by thread id.
#[derive(Default)]
pub(crate) struct Ahead {
    /// The seccomp states read recently enough ([`FRESH`]).
    pub(crate) states: BTreeMap<i32, (Mode, u32)>,
    /// The threads' `stat` files, open.
    pub(crate) stats: BTreeMap<i32, File>,
}

/// The reads ahead of one attach.
pub(crate) struct Prefetch {
    queue: Arc<Queue>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Prefetch {
    /// Starts reading the states of process `pid`'s threads (listed now) on a thread of its
    /// own; `None` when no thread can be started.
    pub(crate) fn start(pid: i32) -> Option<Prefetch> {
        let room = crate::process::observe::descriptor_limit().saturating_sub(512) / 4;
        let queue = Arc::new(Queue {
            pid,
            tids: crate::process::observe::tasks(pid),
            stats: MAX_STATS.min(room),
            next: AtomicUsize::new(0),
            done: Mutex::new(Vec::new()),
        });
        let q = queue.clone();
        let reader = std::thread::Builder::new()
            .name("livepatch-seccomp".into())
            .stack_size(64 * 1024)
            .spawn(move || q.drain())
            .ok()?;
        Some(Prefetch {
            queue,
            reader: Some(reader),
        })
    }

    /// What was read ahead: those left are read here, and the read under way on the other
    /// thread is waited for. A state whose read began more than [`FRESH`] ago is left out (the
    /// check reads it again), as is a thread whose status could not be read.
    pub(crate) fn finish(mut self) -> Ahead {
        self.queue.drain();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let now = Instant::now();
        let done = std::mem::take(&mut *self.queue.done.lock().unwrap_or_else(|e| e.into_inner()));
        let mut ahead = Ahead::default();
        for (tid, (state, began, stat)) in done {
            if let Some(stat) = stat {
                ahead.stats.insert(tid, stat);
            }
            if let Some(state) = state.filter(|_| now.duration_since(began) <= FRESH) {
                ahead.states.insert(tid, state);
            }
        }
        ahead
    }
}

impl Drop for Prefetch {
    /// Not finished (the attach failed): the reader is told there is nothing left and not
    /// waited for (it ends after the one read it may be making).
    fn drop(&mut self) {
        self.queue.next.store(usize::MAX / 2, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threads listed are read by the reader and the finisher together, and what they
    /// read is what a read of the status says (this thread, which lives throughout, is among
    /// them), with the thread's own `stat` open; a state read too long ago is left out.
    #[test]
    fn the_threads_are_read_ahead_and_old_reads_are_left_out() {
        let pid = std::process::id() as i32;
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        let p = Prefetch::start(pid).expect("a thread");
        assert!(p.queue.tids.contains(&me));
        let listed = p.queue.tids.len();
        let queue = p.queue.clone();
        let ahead = p.finish();
        assert!(
            queue.next.load(Ordering::Relaxed) >= listed,
            "not all taken"
        );
        assert_eq!(
            ahead.states.get(&me).copied(),
            super::super::status(pid, me)
        );
        let mut buf = [0u8; 512];
        let n = std::os::unix::fs::FileExt::read_at(&ahead.stats[&me], &mut buf, 0).unwrap();
        let stat = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(stat.starts_with(&format!("{me} (")), "{stat}");
        let p = Prefetch::start(pid).expect("a thread");
        p.queue.drain();
        std::thread::sleep(FRESH + Duration::from_millis(1));
        let old = p.finish();
        assert!(old.states.is_empty(), "reads older than FRESH were kept");
        assert!(
            old.stats.contains_key(&me),
            "the files are kept whatever their age"
        );
    }
}

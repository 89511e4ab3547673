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

use super::Mode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A state read ahead is used when its read began at most this long before the check. The
/// attach takes 0.3-2 ms (the borrow's look, up to its last step); a read older than this
/// (an attach that waited for another livepatch's lock) is made again. The check's reads are
/// milliseconds old by the first `int3` anyway: a thread that sandboxes itself after its read
/// is not seen, whenever that read was (see `check_handler_threads`).
pub(crate) const FRESH: Duration = Duration::from_millis(5);

/// One thread's state as read ahead: mode and filter count (`None`: its status could not be
/// read, gone), and when the read began.
type Read = (Option<(Mode, u32)>, Instant);

struct Queue {
    pid: i32,
    tids: Vec<i32>,
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
            let began = Instant::now();
            let state = super::status(self.pid, tid);
            self.done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((tid, (state, began)));
        }
    }
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
        let queue = Arc::new(Queue {
            pid,
            tids: crate::process::observe::tasks(pid),
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

    /// The states read ahead, by thread id: those left are read here, and the read under way on
    /// the other thread is waited for. A state whose read began more than [`FRESH`] ago is left
    /// out (the check reads it again), as is a thread whose status could not be read.
    pub(crate) fn finish(mut self) -> std::collections::BTreeMap<i32, (Mode, u32)> {
        self.queue.drain();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let now = Instant::now();
        let done = std::mem::take(&mut *self.queue.done.lock().unwrap_or_else(|e| e.into_inner()));
        done.into_iter()
            .filter(|(_, (_, began))| now.duration_since(*began) <= FRESH)
            .filter_map(|(tid, (state, _))| Some((tid, state?)))
            .collect()
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
    /// them); a state read too long ago is left out.
    #[test]
    fn the_threads_are_read_ahead_and_old_reads_are_left_out() {
        let pid = std::process::id() as i32;
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        let p = Prefetch::start(pid).expect("a thread");
        assert!(p.queue.tids.contains(&me));
        let listed = p.queue.tids.len();
        let queue = p.queue.clone();
        let seen = p.finish();
        assert!(
            queue.next.load(Ordering::Relaxed) >= listed,
            "not all taken"
        );
        assert_eq!(seen.get(&me).copied(), super::super::status(pid, me));
        let p = Prefetch::start(pid).expect("a thread");
        p.queue.drain();
        std::thread::sleep(FRESH + Duration::from_millis(1));
        assert!(p.finish().is_empty(), "reads older than FRESH were kept");
    }
}

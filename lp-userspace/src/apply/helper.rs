//! A thread that helps an apply with the work it would otherwise start threads for: the
//! command line's second thread, which builds iced-x86's instruction tables first.
//!
//! A fresh `livepatch apply` started a thread for each piece of work off the tracer's path (the
//! warm-up, the perf map and gdb files): each start and end is a `clone`, a stack, a signal
//! stack and a malloc arena of its own, on the tracer's path and on two CPUs shared with the
//! target. The command line opens a [`Helper`] ([`Helper::open_for_apply`]: it claims the
//! building of the tables too) before it starts the one thread it starts, which builds the
//! tables and then runs what the apply queues ([`run_or_spawn`]), in order, while the main
//! thread applies as the tracer. Without a helper (a library caller, the Python bindings)
//! each piece of work gets a thread of its own, as before.

use super::iced_tables::{self, Tables};
use super::Mode;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};

type Job = Box<dyn FnOnce() + Send>;

/// Where [`run_or_spawn`] queues work, while a [`Helper`] is open.
static JOBS: Mutex<Option<Sender<Job>>> = Mutex::new(None);

fn jobs() -> MutexGuard<'static, Option<Sender<Job>>> {
    JOBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The helper's end of the queue.
pub struct Helper {
    jobs: Receiver<Job>,
    /// iced's tables up to this level, claimed for [`Helper::serve`] to build first.
    tables: Option<Tables>,
}

impl Helper {
    /// Opens the queue: from now on [`run_or_spawn`] queues its work for this helper (for the
    /// life of the process), to be run once [`Helper::serve`] is called.
    pub fn open() -> Helper {
        let (tx, rx) = channel();
        *jobs() = Some(tx);
        Helper {
            jobs: rx,
            tables: None,
        }
    }

    /// [`Helper::open`] for an apply in `mode` that is about to start: also claims the
    /// building of the instruction tables that apply needs, which [`Helper::serve`] builds
    /// before it runs any job. Claimed here, before the thread that serves is started, so that
    /// the apply (`apply_then_exit`) finds them claimed however early it gets there, and waits
    /// for them asleep instead of starting a thread of its own to build them (it did, when the
    /// thread that was to build them had not claimed them yet). Dropped without serving, the
    /// claim is given back: whoever needs the tables first builds them.
    pub fn open_for_apply(mode: Mode) -> Helper {
        let mut helper = Helper::open();
        if iced_tables::claim() {
            helper.tables = Some(match mode {
                Mode::Stop => Tables::All,
                // Nonstop mode's code assembler needs the encoder's too.
                Mode::Nonstop => Tables::Encoder,
            });
        }
        helper
    }

    /// Builds the claimed tables, if any, then runs the queued work, in order, for ever: the
    /// process ends on another thread (the apply's, see `apply_then_exit`). A job that panics
    /// is dropped (whoever waits for it sees its channel closed); the next one runs.
    pub fn serve(mut self) -> ! {
        if let Some(level) = self.tables.take() {
            iced_tables::build_claimed(level);
        }
        for job in self.jobs.iter() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
        loop {
            std::thread::park();
        }
    }
}

impl Drop for Helper {
    /// A helper that will not serve (its thread could not be started) gives its claim on the
    /// tables back; its queue closes with it, so jobs get threads of their own again.
    fn drop(&mut self) {
        if self.tables.take().is_some() {
            iced_tables::unclaim();
        }
    }
}

/// Has `job` run by the open [`Helper`], or else on a new thread named `name`.
pub(crate) fn run_or_spawn(name: &str, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let job: Job = Box::new(job);
    let job = match jobs().as_ref() {
        Some(queue) => match queue.send(job) {
            Ok(()) => return Ok(()),
            Err(unsent) => unsent.0,
        },
        None => job,
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(job)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a helper a job runs on a thread of its own; with one, on the helper, in order.
    #[test]
    fn jobs_run_on_the_helper_once_open() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = tx.clone();
        run_or_spawn("test-job", move || {
            t.send(std::thread::current().name().map(String::from))
                .unwrap()
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("test-job"));
        let helper = Helper::open();
        for i in 0..3 {
            let t = tx.clone();
            run_or_spawn("test-job", move || {
                t.send(Some(format!("{i} {:?}", std::thread::current().name())))
                    .unwrap()
            })
            .unwrap();
        }
        std::thread::Builder::new()
            .name("helper".into())
            .spawn(move || helper.serve())
            .unwrap();
        let got: Vec<_> = (0..3).map(|_| rx.recv().unwrap().unwrap()).collect();
        assert_eq!(
            got,
            [
                "0 Some(\"helper\")",
                "1 Some(\"helper\")",
                "2 Some(\"helper\")"
            ]
        );
        *jobs() = None;
    }
}

//! The tool's sleeps between its looks at the threads, made as short as asked.
//!
//! Linux lets a timer of an ordinary thread fire up to its "timer slack" late (50 µs by
//! default), to batch wake-ups. A nonstop switch sleeps 20-100 µs between its looks at the
//! threads (settle, uninstall): with the slack each sleep lasted up to 2.5x longer, and a
//! thread that is blocked only now and then (a loop that sleeps 50 µs per round) was caught
//! blocked later — every µs of the settle keeps `int3`s in place. While a [`Precise`] lives,
//! the calling thread's slack is 1 ns; it gets its own back when it is dropped (the thread
//! may be a library caller's). A real-time thread (the tracer, when it may be one:
//! `process/realtime.rs`) has no slack: nothing is changed then.

/// The calling thread's timer slack, held at 1 ns until this is dropped.
pub(super) struct Precise {
    saved: Option<libc::c_ulong>,
}

impl Precise {
    pub(super) fn start() -> Precise {
        // SAFETY: prctl with PR_GET_TIMERSLACK takes no pointer and returns the calling
        // thread's slack (or -1); PR_SET_TIMERSLACK takes a value.
        let saved = unsafe {
            let now = libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0);
            (now > 0 && libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) == 0)
                .then_some(now as libc::c_ulong)
        };
        Precise { saved }
    }
}

impl Drop for Precise {
    fn drop(&mut self) {
        if let Some(slack) = self.saved {
            // SAFETY: as in `start`: a value, no pointer.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, slack, 0, 0, 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slack_is_1_ns_while_held_and_given_back() {
        // SAFETY: as above.
        let get = || unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
        let before = get();
        {
            let _p = Precise::start();
            assert_eq!(get(), 1);
        }
        assert_eq!(get(), before);
    }
}

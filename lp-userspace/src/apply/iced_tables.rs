//! iced-x86's instruction tables, built once per process, off the tracer's path when possible.
//!
//! iced builds its decoder tables on the first decode and its encoder tables on the first
//! encode (about 0.6–0.8 ms of CPU each on this VM, measured with a program timing the first
//! decode and encode: the two are a third of a fresh CLI apply). A stop-mode apply needs only
//! the decoder's nearly always: lp-core copies the displaced instructions into trampolines
//! (`copy_trampoline`) and the thunks are encoded by hand; the encoder is built only for a
//! trampoline that must be re-encoded, and for nonstop mode's code ([`Tables::Encoder`]).
//! lp-core enables iced's
//! `no_std`, so both are behind a *spinning* `Once`: a thread that needs a table while another
//! builds it burns its CPU until the builder is done, and on two CPUs shared with the target
//! that spinner may be what keeps the builder from running.
//!
//! So an apply has its calling thread build them ([`claim`], then [`build_claimed`]) while its
//! tracer thread locates the module, attaches and reads the state and the old bytes (no table
//! needed), and the tracer, before its first decode ([`need`]`(`[`Tables::Decoder`]`)`) and its
//! first encode ([`Tables::All`]), sleeps on a condition variable until the builder got that
//! far, instead of spinning. A nonstop revert's warm-up thread builds them the same way. Without
//! a builder (a stop-mode revert, `pack`, a library caller) whoever needs a table first builds
//! it in place.

use std::sync::{Condvar, Mutex, MutexGuard};

/// How much of iced's tables exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tables {
    /// Nothing built yet.
    None,
    /// The decoder's (decoding, and lp-core's site validation, need only these).
    Decoder,
    /// All an apply's path uses in the common case: the decoder's, and instruction info's
    /// (static data, whose pages the clobber analysis touches).
    All,
    /// All, and the encoder's and block encoder's: nonstop mode's code assembler, and a
    /// trampoline that cannot be copied (which builds them in place when they are missing).
    Encoder,
}

struct State {
    built: Tables,
    /// A thread is building them now: others wait for it instead of spinning in iced.
    building: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    built: Tables::None,
    building: false,
});
static CHANGED: Condvar = Condvar::new();

fn lock() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Claims the building of the tables for a thread about to be started, which then calls
/// [`build_claimed`]; false when they exist or are being built. Claimed before the thread runs,
/// so that a [`need`] right after this call waits for that thread.
pub(crate) fn claim() -> bool {
    let mut s = lock();
    if s.built >= Tables::All || s.building {
        return false;
    }
    s.building = true;
    true
}

/// Builds the tables up to `level` on a thread of its own, started now, unless they exist or
/// are being built (for an apply whose calling thread is the tracer: `apply_then_exit`).
pub(crate) fn build_on_new_thread(level: Tables) {
    if !claim() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("livepatch-iced".into())
        .spawn(move || build_claimed(level));
    if spawned.is_err() {
        unclaim();
    }
}

/// Gives a [`claim`] back unused (the thread could not be started): the first [`need`]
/// builds in place.
pub(crate) fn unclaim() {
    lock().building = false;
    CHANGED.notify_all();
}

/// Returns once iced's tables are built up to `level`: at once when they are, after waiting
/// (asleep) for the thread building them, or after building them on this thread.
pub(crate) fn need(level: Tables) {
    let mut s = lock();
    loop {
        if s.built >= level {
            return;
        }
        if !s.building {
            s.building = true;
            drop(s);
            build_claimed(level);
            return;
        }
        s = CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
    }
}

/// Builds the tables up to `level` (this thread has claimed `building`), publishing each step.
pub(crate) fn build_claimed(level: Tables) {
    use lp_core::jump::REL32_JUMP_LEN;
    // push %rbp; mov %rsp,%rbp; mov -0x4(%rbp),%eax; pop %rbp; ret
    const CODE: &[u8] = &[0x55, 0x48, 0x89, 0xe5, 0x8b, 0x45, 0xfc, 0x5d, 0xc3];
    let publish = |built: Tables, done: bool| {
        let mut s = lock();
        s.built = s.built.max(built);
        if done {
            s.building = false;
        }
        drop(s);
        CHANGED.notify_all();
    };
    // A panic inside iced (not expected) must not leave waiters asleep for ever.
    let result = std::panic::catch_unwind(|| {
        let site = lp_core::site::validate_site(CODE, 0x1000, REL32_JUMP_LEN);
        if level == Tables::Decoder {
            return;
        }
        publish(Tables::Decoder, false);
        let mut out = [0u8; lp_core::trampoline::MAX_TRAMPOLINE_LEN];
        if let Ok(site) = &site {
            let _ = lp_core::trampoline::copy_trampoline(site, 0x2000, &mut out);
        }
        let _ = lp_core::clobber::registers_to_preserve(CODE, 0x1000, CODE, 0x3000);
        if level < Tables::Encoder {
            return;
        }
        publish(Tables::All, false);
        if let Ok(site) = &site {
            let _ = lp_core::trampoline::build_trampoline_reencoded(site, 0x2000, &mut out);
        }
    });
    match result {
        Ok(()) => publish(level, true),
        Err(_) => publish(Tables::None, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiting for the tables while a builder thread works returns with them built, whichever
    /// order the threads run in; asking again (or for less) returns at once.
    #[test]
    fn need_returns_once_the_tables_are_built() {
        let builder = claim().then(|| std::thread::spawn(|| build_claimed(Tables::All)));
        need(Tables::Decoder);
        assert!(lock().built >= Tables::Decoder);
        need(Tables::All);
        assert!(lock().built >= Tables::All);
        need(Tables::Decoder);
        assert!(
            !claim(),
            "no second builder once an apply's tables are built"
        );
        need(Tables::Encoder);
        assert_eq!(lock().built, Tables::Encoder);
        if let Some(b) = builder {
            b.join().unwrap();
        }
    }
}

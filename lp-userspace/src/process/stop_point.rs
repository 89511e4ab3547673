//! A debugging hook for the tests of a killed tool: `LIVEPATCH_DEBUG_STOP=POINT[:N]` makes the
//! tool stop itself (SIGSTOP) the N-th time (default 1) it reaches the named point, after
//! printing `livepatch: debug: stopped at POINT` on stderr, so that a test can SIGKILL it at
//! exactly the moment a kill is most harmful. Without the variable this is one cached
//! environment look-up per point reached; nothing else changes.
//!
//! Points: `remote-syscall` (a borrowed thread stopped with our system call's registers set;
//! `remote-syscall.NR`: system call number NR only; the stub-creating `mmap`, the one remote
//! call that cannot be guarded, is not a point),
//! `remote-call` (a borrowed thread stopped with a function call's registers set),
//! `orphan-looked` (apply, revert: the look for a sync agent a killed livepatch left made,
//! the process not yet attached),
//! `stop-window` (stop mode: before each attempt's stop of every thread, the threads seized
//! and running), `stop-resumed` (stop mode: the switch done and committed, every thread running
//! again, the caller's work after it not yet done),
//! `switch-written` (stop mode: every site written, the state not yet committed),
//! `revert-written` (the same in a revert: the record still says applied),
//! `dispatch-flag` (nonstop apply: every site leads to its dispatch, the flag not yet set),
//! `nonstop-sync` (nonstop: at each sync of an int3 window, the window's bytes as they were),
//! `uninstall` (nonstop: the switch done, no int3 of ours left, our SIGTRAP action not yet
//! given back),
//! `agent-start.N` (nonstop: the sync agent's start-up after its step N, see sync_agent.rs
//! `start_point`), `agent-call.NR` (nonstop: a system call of ours loaded in the sync agent's
//! page, not yet asked for: `agent-call.324` is the membarrier registration; `agent-call.9`, a
//! nonstop apply's preparation: the patch memory's mmap and mprotects, one program of the agent
//! it starts first, before its state is marked).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The variable naming the point.
pub const VAR: &str = "LIVEPATCH_DEBUG_STOP";

fn wanted() -> Option<&'static (String, usize)> {
    static WANTED: OnceLock<Option<(String, usize)>> = OnceLock::new();
    WANTED
        .get_or_init(|| {
            let v = std::env::var(VAR).ok()?;
            Some(match v.split_once(':') {
                Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
                None => (v, 1),
            })
        })
        .as_ref()
}

/// Marks `point` reached: stops the tool there when [`VAR`] names it (see the module docs).
pub fn reached(point: &str) {
    reached_with(point, "");
}

/// [`reached`], where [`VAR`] may also name the point as `POINT.DETAIL` (for a remote system
/// call, DETAIL is its number: `remote-syscall.324` is a membarrier).
pub fn reached_with(point: &str, detail: impl std::fmt::Display) {
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let Some((want, nth)) = wanted() else {
        return;
    };
    let detail = detail.to_string();
    let named = want == point
        || (!detail.is_empty()
            && want
                .strip_prefix(point)
                .and_then(|r| r.strip_prefix('.'))
                .is_some_and(|d| d == detail));
    if !named || SEEN.fetch_add(1, Ordering::SeqCst) + 1 != *nth {
        return;
    }
    eprintln!("livepatch: debug: stopped at {want}");
    // SAFETY: raise() takes a signal number and has no memory effects.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}

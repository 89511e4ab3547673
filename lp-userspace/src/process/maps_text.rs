//! `/proc/PID/maps` read once per traced process for what only livepatch maps into it.
//!
//! An apply looked for the state mapping (`state::read`, then `StateMap::open_or_create`, and
//! the stop-mode unwinder's `add_patch_cfi`) and for the resume stub's area (`stub::locate`) in
//! four reads of the maps: tens of microseconds of the target's kernel time each, more for
//! processes with many mappings. Those mappings are made and removed only by a livepatch that
//! traces the process, and while a [`super::Tracee`] of ours exists no other livepatch does
//! (ptrace's one tracer, and the per-process lock). So the text read first after attaching
//! stays true for them until this process makes or removes one of them itself: the tracee
//! reports that ([`changed`]: creating the stub's area or a memfd mapping, any `munmap`; nonstop
//! mode's trap area, found by its code page's protection, reports the `mprotect` that sets it
//! too), and the maps are read again at the next look. Other mappings of ours (the patch memory) and the
//! threads' own (`malloc`, `dlopen`) are not livepatch's state or stub, so a text that misses
//! them still finds exactly those.
//!
//! Anything else (modules, the threads' own mappings) changes while the threads run: such
//! look-ups read the maps themselves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A traced pid's text, if read since the last change, and the number of changes so far (a
/// text read while a change happened is not kept).
#[derive(Default)]
struct Traced {
    text: Option<Arc<str>>,
    changes: u64,
}

static TRACED: Mutex<BTreeMap<i32, Traced>> = Mutex::new(BTreeMap::new());

fn traced() -> MutexGuard<'static, BTreeMap<i32, Traced>> {
    TRACED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tracee of `pid` exists from now on (called once its lock is held).
pub(crate) fn track(pid: i32) {
    traced().insert(pid, Traced::default());
}

/// The tracee of `pid` is gone: later readers read the maps themselves.
pub(crate) fn untrack(pid: i32) {
    traced().remove(&pid);
}

/// We made or removed a mapping of livepatch's own in `pid` (or may have: any `munmap`): the
/// next reader reads the maps again. Called after the change is done.
pub(crate) fn changed(pid: i32) {
    if let Some(t) = traced().get_mut(&pid) {
        t.text = None;
        t.changes += 1;
    }
}

/// The text of `/proc/PID/maps` for finding livepatch's own mappings in `pid`: read once
/// while a tracee of `pid` exists (see the module doc), read afresh otherwise.
pub(crate) fn ours(pid: i32) -> std::io::Result<Arc<str>> {
    let changes = match traced().get(&pid) {
        Some(Traced {
            text: Some(text), ..
        }) => return Ok(text.clone()),
        Some(t) => Some(t.changes),
        None => None,
    };
    let text: Arc<str> = super::proc_dir::maps(pid)?.into();
    if let Some(t) = traced().get_mut(&pid) {
        // Not when a change of ours happened while we read: the text may predate it.
        if Some(t.changes) == changes && t.text.is_none() {
            t.text = Some(text.clone());
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While tracked, the text is read once and kept until a change of ours; untracked, each
    /// call reads the maps afresh.
    #[test]
    fn kept_while_tracked_until_changed() {
        let pid = std::process::id() as i32;
        const LEN: usize = 4096 * 3;
        track(pid);
        let before = ours(pid).unwrap();
        // SAFETY: a fresh anonymous private mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        assert!(Arc::ptr_eq(&before, &ours(pid).unwrap()), "read again");
        changed(pid);
        let after = ours(pid).unwrap();
        assert_ne!(
            *after, *before,
            "the new mapping does not show after a change"
        );
        untrack(pid);
        // SAFETY: `p` is the mapping made above, unmapped once.
        unsafe { libc::munmap(p, LEN) };
        assert_ne!(*ours(pid).unwrap(), *after, "untracked: not read afresh");
    }
}

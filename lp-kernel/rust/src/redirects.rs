//! The redirect table of the whole kernel, over static storage, and its C interface.

use core::ptr::addr_of_mut;

use lp_core::table::{EntryState, RedirectTable, Slot, TableError};
use lp_core::trap::{decide, TrapDecision};

use crate::ffi::{errno, report};

/// Patched function entries the kernel can hold at once.
const CAPACITY: usize = 256;

static mut STORAGE_A: [Slot; CAPACITY] = [Slot::EMPTY; CAPACITY];
static mut STORAGE_B: [Slot; CAPACITY] = [Slot::EMPTY; CAPACITY];

// SAFETY: the two arrays are statics used by this table only, for the module's lifetime, and
// `Slot::EMPTY` initialises them.
static TABLE: RedirectTable<'static> = unsafe {
    RedirectTable::from_raw_parts(
        addr_of_mut!(STORAGE_A) as *mut Slot,
        addr_of_mut!(STORAGE_B) as *mut Slot,
        CAPACITY,
    )
};

fn errno_of(e: &TableError) -> i32 {
    match e {
        TableError::Full { .. } | TableError::StackFull { .. } => errno::ENOSPC,
        TableError::NotFound { .. } => errno::ENOENT,
        TableError::NotTop { .. }
        | TableError::InTransition { .. }
        | TableError::StillActive { .. } => errno::EBUSY,
        TableError::DuplicatePatch { .. } => errno::EEXIST,
        _ => errno::EINVAL,
    }
}

/// `0` on success, else `-errno` with the reason in `msg`.
///
/// # Safety
/// `msg` is null or points to `len` writable bytes.
unsafe fn answer<T>(r: Result<T, TableError>, msg: *mut u8, len: usize) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => {
            // SAFETY: forwarded from the caller.
            unsafe { report(&e, msg, len) };
            -errno_of(&e)
        }
    }
}

/// The table is a static; nothing to set up (kept so the C side has one init point).
#[no_mangle]
pub extern "C" fn lp_rs_init() -> i32 {
    if TABLE.is_empty() {
        0
    } else {
        -errno::EINVAL
    }
}

/// The trap path (ftrace handler): where a call that reached `ip` goes. `0`: let the code at
/// `ip` run (not ours, or lp-core says "the original code": pending or reverting first patch).
#[no_mangle]
pub extern "C" fn lp_rs_redirect(ip: u64) -> u64 {
    match decide(&TABLE, ip) {
        TrapDecision::Redirect(new) => new,
        TrapDecision::Resume(_) | TrapDecision::NotOurs => 0,
    }
}

/// Stack `new_fn` (pending) on the function at `old`, for patch `patch_id`.
///
/// # Safety
/// `msg` is null or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn lp_rs_push(
    old: u64,
    new_fn: u64,
    patch_id: u32,
    msg: *mut u8,
    len: usize,
) -> i32 {
    // The original code resumes at the site itself: the ftrace handler just returns.
    // SAFETY: forwarded from the caller.
    unsafe { answer(TABLE.push(old, old, new_fn, patch_id), msg, len) }
}

/// Set the state of the top version at `old` (0 pending, 1 active, 2 reverting).
///
/// # Safety
/// `msg` is null or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn lp_rs_set_state(old: u64, state: u32, msg: *mut u8, len: usize) -> i32 {
    let state = match state {
        0 => EntryState::Pending,
        1 => EntryState::Active,
        2 => EntryState::Reverting,
        _ => return -errno::EINVAL,
    };
    let Some(top) = TABLE.lookup(old) else {
        // SAFETY: forwarded from the caller.
        return unsafe { answer::<()>(Err(TableError::NotFound { old }), msg, len) };
    };
    // SAFETY: forwarded from the caller.
    unsafe { answer(TABLE.set_state(old, top.patch_id, state), msg, len) }
}

/// Take `patch_id`'s version off `old`: through reverting when it is active. Only the top may
/// go (lp-core refuses otherwise, naming the patch on top).
///
/// # Safety
/// `msg` is null or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn lp_rs_pop(old: u64, patch_id: u32, msg: *mut u8, len: usize) -> i32 {
    if let Some(top) = TABLE.lookup(old) {
        if top.patch_id == patch_id && top.state == EntryState::Active {
            if let Err(e) = TABLE.set_state(old, patch_id, EntryState::Reverting) {
                // SAFETY: forwarded from the caller.
                return unsafe { answer::<()>(Err(e), msg, len) };
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { answer(TABLE.pop(old, patch_id), msg, len) }
}

/// Patch id of the top version at `old` (0: no entry).
#[no_mangle]
pub extern "C" fn lp_rs_top_patch(old: u64) -> u32 {
    TABLE.lookup(old).map_or(0, |r| r.patch_id)
}

/// Number of versions stacked at `old` (0: no entry).
#[no_mangle]
pub extern "C" fn lp_rs_depth(old: u64) -> u32 {
    TABLE.lookup(old).map_or(0, |r| r.depth as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg_of(buf: &[u8]) -> &str {
        let end = buf.iter().position(|&b| b == 0).unwrap();
        core::str::from_utf8(&buf[..end]).unwrap()
    }

    // One test walks the whole life of two stacked patches: the table is one static.
    #[test]
    fn stacked_patches_through_the_c_interface() {
        let mut msg = [0u8; 128];
        let (m, l) = (msg.as_mut_ptr(), msg.len());
        let old = 0xffff_ffff_8100_1000;
        // SAFETY (all calls below): `msg` is a writable buffer of `l` bytes.
        unsafe {
            assert_eq!(lp_rs_push(old, 0xa000, 1, m, l), 0);
            assert_eq!(lp_rs_redirect(old), 0, "pending: the original runs");
            assert_eq!(lp_rs_set_state(old, 1, m, l), 0);
            assert_eq!(lp_rs_redirect(old), 0xa000);
            assert_eq!(lp_rs_push(old, 0xb000, 2, m, l), 0);
            assert_eq!(
                lp_rs_redirect(old),
                0xa000,
                "patch 2 pending: patch 1 still runs"
            );
            assert_eq!(lp_rs_set_state(old, 1, m, l), 0);
            assert_eq!(
                (lp_rs_redirect(old), lp_rs_top_patch(old), lp_rs_depth(old)),
                (0xb000, 2, 2)
            );

            assert_eq!(lp_rs_pop(old, 1, m, l), -errno::EBUSY);
            assert!(
                msg_of(&msg).contains("patch 2 is stacked on it"),
                "{}",
                msg_of(&msg)
            );
            assert_eq!(lp_rs_redirect(old), 0xb000, "a refused pop changes nothing");

            assert_eq!(
                lp_rs_pop(old, 2, m, l),
                0,
                "active top: through reverting, then out"
            );
            assert_eq!(lp_rs_redirect(old), 0xa000);
            assert_eq!(lp_rs_pop(old, 1, m, l), 0);
            assert_eq!(
                (lp_rs_redirect(old), lp_rs_top_patch(old), lp_rs_depth(old)),
                (0, 0, 0)
            );

            assert_eq!(lp_rs_set_state(old, 1, m, l), -errno::ENOENT);
            assert_eq!(lp_rs_set_state(old, 7, m, l), -errno::EINVAL);
            assert_eq!(lp_rs_redirect(0x1234), 0, "not ours");
        }
    }
}

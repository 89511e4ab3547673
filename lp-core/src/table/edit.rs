//! The edits a writer makes to a sorted slot array, checked once and applied to both buffers.

use super::{EntryState, Slot, TableError, Version, MAX_DEPTH};

/// One change to the sorted array, already validated against the current entries.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Edit {
    /// Put a new entry at index `at` (shifting the rest up).
    Insert { at: usize, slot: Slot },
    /// Overwrite the entry at `at`.
    Replace { at: usize, slot: Slot },
    /// Take the entry at `at` out (shifting the rest down).
    Remove { at: usize },
}

/// Apply `edit` to `buf`, whose first `len` slots are the current entries; returns the new
/// length. Never panics for an edit produced by the checks below against the same `len`.
pub(crate) fn apply(buf: &mut [Slot], len: usize, edit: &Edit) -> usize {
    match *edit {
        Edit::Insert { at, slot } => {
            buf.copy_within(at..len, at + 1);
            buf[at] = slot;
            len + 1
        }
        Edit::Replace { at, slot } => {
            buf[at] = slot;
            len
        }
        Edit::Remove { at } => {
            buf.copy_within(at + 1..len, at);
            buf[len - 1] = Slot::EMPTY;
            len - 1
        }
    }
}

/// Index of `old` in the sorted entries, or where it would go. A binary search: measured
/// against an 8-ary search over the same 152-byte slots, it was faster both with hot caches and
/// for random sites among 100,000 (the k-ary probes touch more cache lines).
pub(crate) fn find(entries: &[Slot], old: u64) -> Result<usize, usize> {
    entries.binary_search_by_key(&old, Slot::old)
}

pub(crate) fn check_push(
    entries: &[Slot],
    capacity: usize,
    old: u64,
    resume: u64,
    version: Version,
) -> Result<Edit, TableError> {
    match find(entries, old) {
        Err(at) => {
            if entries.len() >= capacity {
                return Err(TableError::Full { capacity });
            }
            Ok(Edit::Insert {
                at,
                slot: Slot::first(old, resume, version),
            })
        }
        Ok(at) => {
            let mut slot = entries[at];
            if slot.resume() != resume {
                return Err(TableError::ResumeMismatch {
                    old,
                    recorded: slot.resume(),
                    given: resume,
                });
            }
            if slot
                .versions()
                .iter()
                .any(|v| v.patch_id == version.patch_id)
            {
                return Err(TableError::DuplicatePatch {
                    old,
                    patch_id: version.patch_id,
                });
            }
            let top = top_of(&slot);
            if slot.state() != EntryState::Active {
                return Err(TableError::InTransition {
                    old,
                    top_patch: top.patch_id,
                    state: slot.state(),
                });
            }
            if slot.depth() >= MAX_DEPTH {
                return Err(TableError::StackFull {
                    old,
                    max: MAX_DEPTH,
                });
            }
            slot.push(version);
            Ok(Edit::Replace { at, slot })
        }
    }
}

/// The top version of a slot inside a snapshot (depth >= 1 there).
fn top_of(slot: &Slot) -> Version {
    slot.top().unwrap_or_default()
}

/// Find `old` and make sure `patch_id` is its top version.
fn find_top(entries: &[Slot], old: u64, patch_id: u32) -> Result<usize, TableError> {
    let at = find(entries, old).map_err(|_| TableError::NotFound { old })?;
    let slot = &entries[at];
    let top_patch = top_of(slot).patch_id;
    if top_patch == patch_id {
        Ok(at)
    } else if slot.versions().iter().any(|v| v.patch_id == patch_id) {
        Err(TableError::NotTop {
            old,
            patch_id,
            top_patch,
        })
    } else {
        Err(TableError::NoSuchPatch {
            old,
            patch_id,
            top_patch,
        })
    }
}

/// Whether a site's top version may go from `from` to `to`.
///
/// - pending → active: the redirect is fully written (commit);
/// - pending → reverting: an apply is abandoned after its int3 may have been written;
/// - active → reverting: a revert starts;
/// - reverting → active: a revert is abandoned and the redirect is back in place;
/// - staying in the same state is allowed (idempotent);
/// - nothing goes back to pending: pending only means "never committed".
pub(crate) fn transition_allowed(from: EntryState, to: EntryState) -> bool {
    use EntryState::*;
    from == to
        || matches!(
            (from, to),
            (Pending, Active) | (Pending, Reverting) | (Active, Reverting) | (Reverting, Active)
        )
}

pub(crate) fn check_set_state(
    entries: &[Slot],
    old: u64,
    patch_id: u32,
    state: EntryState,
) -> Result<Edit, TableError> {
    let at = find_top(entries, old, patch_id)?;
    let mut slot = entries[at];
    if !transition_allowed(slot.state(), state) {
        return Err(TableError::BadTransition {
            old,
            patch_id,
            from: slot.state(),
            to: state,
        });
    }
    slot.set_state(state);
    Ok(Edit::Replace { at, slot })
}

/// Returns the edit and the version it takes out.
pub(crate) fn check_pop(
    entries: &[Slot],
    old: u64,
    patch_id: u32,
) -> Result<(Edit, Version), TableError> {
    let at = find_top(entries, old, patch_id)?;
    let mut slot = entries[at];
    if slot.state() == EntryState::Active {
        return Err(TableError::StillActive { old, patch_id });
    }
    let top = top_of(&slot);
    if slot.depth() <= 1 {
        return Ok((Edit::Remove { at }, top));
    }
    slot.pop();
    Ok((Edit::Replace { at, slot }, top))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(olds: &[u64]) -> ([Slot; 8], usize) {
        let mut buf = [Slot::EMPTY; 8];
        let mut len = 0;
        for &old in olds {
            let e = check_push(&buf[..len], 8, old, old + 1, Version::new(old + 2, 1)).unwrap();
            len = apply(&mut buf, len, &e);
        }
        (buf, len)
    }

    #[test]
    fn inserts_keep_order_and_removes_close_gaps() {
        let (mut buf, len) = sorted(&[30, 10, 20, 40]);
        let olds: [u64; 4] = core::array::from_fn(|i| buf[i].old());
        assert_eq!(olds, [10, 20, 30, 40]);
        let mut ents = buf;
        ents[1].set_state(EntryState::Reverting);
        buf = ents;
        let (e, v) = check_pop(&buf[..len], 20, 1).unwrap();
        assert_eq!(v, Version::new(22, 1));
        let len = apply(&mut buf, len, &e);
        let olds: [u64; 3] = core::array::from_fn(|i| buf[i].old());
        assert_eq!((olds, len), ([10, 30, 40], 3));
        assert_eq!(buf[3], Slot::EMPTY);
    }

    #[test]
    fn transitions() {
        use EntryState::*;
        assert!(transition_allowed(Pending, Active));
        assert!(transition_allowed(Reverting, Active));
        assert!(!transition_allowed(Active, Pending));
        assert!(!transition_allowed(Reverting, Pending));
    }
}

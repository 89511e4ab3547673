//! The edits a writer makes to a sorted slot array, checked once and applied to both buffers.

use super::layout::{BufferMut, Entries};
use super::slot::Record;
use super::{EntryState, Slot, TableError, Version, MAX_DEPTH};

/// One change to the sorted entries, already validated against the current ones.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Edit {
    /// Put a new entry at index `at` (shifting the rest up).
    Insert { at: usize, old: u64, rec: Record },
    /// Overwrite the record at `at`.
    Replace { at: usize, rec: Record },
    /// Take the entry at `at` out (shifting the rest down).
    Remove { at: usize },
}

impl Edit {
    fn insert(at: usize, slot: Slot) -> Edit {
        Edit::Insert {
            at,
            old: slot.old(),
            rec: slot.record(),
        }
    }

    fn replace(at: usize, slot: Slot) -> Edit {
        Edit::Replace {
            at,
            rec: slot.record(),
        }
    }
}

/// Apply `edit` to a buffer holding the entries it was checked against.
pub(crate) fn apply(buf: &mut BufferMut, edit: &Edit) {
    match *edit {
        Edit::Insert { at, old, rec } => buf.insert(at, old, rec),
        Edit::Replace { at, rec } => buf.replace(at, rec),
        Edit::Remove { at } => buf.remove(at),
    }
}

pub(crate) fn check_push(
    entries: Entries<'_>,
    capacity: usize,
    old: u64,
    resume: u64,
    version: Version,
) -> Result<Edit, TableError> {
    match entries.find(old) {
        Err(at) => {
            if entries.len() >= capacity {
                return Err(TableError::Full { capacity });
            }
            Ok(Edit::insert(at, Slot::first(old, resume, version)))
        }
        Ok(at) => {
            let mut slot = entries.slot(at);
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
            Ok(Edit::replace(at, slot))
        }
    }
}

/// The top version of a slot inside a snapshot (depth >= 1 there).
fn top_of(slot: &Slot) -> Version {
    slot.top().unwrap_or_default()
}

/// Find `old` and make sure `patch_id` is its top version.
fn find_top(entries: Entries<'_>, old: u64, patch_id: u32) -> Result<usize, TableError> {
    let at = entries
        .find(old)
        .map_err(|_| TableError::NotFound { old })?;
    let rec = entries.record(at);
    let top_patch = rec.top().unwrap_or_default().patch_id;
    if top_patch == patch_id {
        Ok(at)
    } else if rec.versions().iter().any(|v| v.patch_id == patch_id) {
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
    entries: Entries<'_>,
    old: u64,
    patch_id: u32,
    state: EntryState,
) -> Result<Edit, TableError> {
    let at = find_top(entries, old, patch_id)?;
    let mut slot = entries.slot(at);
    if !transition_allowed(slot.state(), state) {
        return Err(TableError::BadTransition {
            old,
            patch_id,
            from: slot.state(),
            to: state,
        });
    }
    slot.set_state(state);
    Ok(Edit::replace(at, slot))
}

/// Returns the edit and the version it takes out.
pub(crate) fn check_pop(
    entries: Entries<'_>,
    old: u64,
    patch_id: u32,
) -> Result<(Edit, Version), TableError> {
    let at = find_top(entries, old, patch_id)?;
    let mut slot = entries.slot(at);
    if slot.state() == EntryState::Active {
        return Err(TableError::StillActive { old, patch_id });
    }
    let top = top_of(&slot);
    if slot.depth() <= 1 {
        return Ok((Edit::Remove { at }, top));
    }
    slot.pop();
    Ok((Edit::replace(at, slot), top))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::RedirectTable;

    #[test]
    fn inserts_keep_order_and_removes_close_gaps() {
        let (mut a, mut b) = ([Slot::EMPTY; 8], [Slot::EMPTY; 8]);
        let t = RedirectTable::new(&mut a, &mut b);
        for old in [30, 10, 20, 40] {
            t.push(old, old + 1, old + 2, 1).unwrap();
        }
        let olds = t.read(|s| {
            let mut o = [0u64; 4];
            s.iter()
                .zip(o.iter_mut())
                .for_each(|(slot, o)| *o = slot.old());
            o
        });
        assert_eq!(olds, [10, 20, 30, 40]);
        assert_eq!(t.pop(20, 1), Ok(Version::new(22, 1)));
        let (olds, len) = t.read(|s| {
            let mut o = [0u64; 3];
            s.iter()
                .zip(o.iter_mut())
                .for_each(|(slot, o)| *o = slot.old());
            (o, s.len())
        });
        assert_eq!((olds, len), ([10, 30, 40], 3));
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

//! Why a table operation was refused. Every refusal leaves the table exactly as it was.

use super::EntryState;

/// A refused table operation; `Display` is one line naming the site and the reason.
///
/// ```
/// use lp_core::table::{RedirectTable, Slot, TableError};
/// let (mut a, mut b) = ([Slot::EMPTY; 1], [Slot::EMPTY; 1]);
/// let table = RedirectTable::new(&mut a, &mut b);
/// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
/// let err = table.push(0x1100, 0x9100, 0x2100, 2).unwrap_err();
/// assert_eq!(err, TableError::Full { capacity: 1 });
/// assert_eq!(err.to_string(), "redirect table full: all 1 entries in use");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Every slot of the storage holds a site.
    #[error("redirect table full: all {capacity} entries in use")]
    Full {
        /// Number of entries the storage holds.
        capacity: usize,
    },
    /// The site already carries [`MAX_DEPTH`](super::MAX_DEPTH) versions.
    #[error("redirect stack at {old:#x} full: {max} versions already stacked")]
    StackFull {
        /// Site address.
        old: u64,
        /// The depth limit.
        max: usize,
    },
    /// No entry for this site address.
    #[error("no redirect at {old:#x}")]
    NotFound {
        /// Site address looked up.
        old: u64,
    },
    /// The patch named is not the top of the site's stack; only the top may change.
    #[error("patch {patch_id} is not the top of the stack at {old:#x}: patch {top_patch} is stacked on it; take that one out first")]
    NotTop {
        /// Site address.
        old: u64,
        /// Patch the caller named.
        patch_id: u32,
        /// Patch currently on top.
        top_patch: u32,
    },
    /// The patch named is on top but not anywhere in the stack.
    #[error("patch {patch_id} has no version at {old:#x} (top is patch {top_patch})")]
    NoSuchPatch {
        /// Site address.
        old: u64,
        /// Patch the caller named.
        patch_id: u32,
        /// Patch currently on top.
        top_patch: u32,
    },
    /// The patch already has a version on this site.
    #[error("patch {patch_id} already has a version at {old:#x}")]
    DuplicatePatch {
        /// Site address.
        old: u64,
        /// Patch the caller named.
        patch_id: u32,
    },
    /// A new version can only go on top of an active one (one transition per site at a time).
    #[error("site {old:#x} is in transition: patch {top_patch} is {state}; finish or undo it before stacking another")]
    InTransition {
        /// Site address.
        old: u64,
        /// Patch currently on top.
        top_patch: u32,
        /// Its state.
        state: EntryState,
    },
    /// Popping an active version would leave the redirect in the code with no table entry.
    #[error("patch {patch_id} at {old:#x} is still active: set it reverting (and write the old bytes back) before removing it")]
    StillActive {
        /// Site address.
        old: u64,
        /// Patch the caller named.
        patch_id: u32,
    },
    /// The state change is not one of the allowed transitions.
    #[error("patch {patch_id} at {old:#x} cannot go from {from} to {to}")]
    BadTransition {
        /// Site address.
        old: u64,
        /// Patch the caller named.
        patch_id: u32,
        /// Current state.
        from: EntryState,
        /// Requested state.
        to: EntryState,
    },
    /// A later push named a different original-code address than the first one recorded.
    #[error("resume address {given:#x} for site {old:#x} differs from the recorded {recorded:#x}")]
    ResumeMismatch {
        /// Site address.
        old: u64,
        /// Address recorded at the first push.
        recorded: u64,
        /// Address this push named.
        given: u64,
    },
}

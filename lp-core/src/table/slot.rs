//! One entry of the redirect table, and the unit of caller-supplied storage.
//!
//! [`Slot`] is `#[repr(C)]` and all-zero bytes are a valid empty slot, so a C shim can hand the
//! table zero-initialised static arrays (`.bss`) of [`SLOT_SIZE`]-byte elements. Inside a buffer
//! the table does not keep whole slots side by side: it splits the memory into a dense column of
//! site addresses (8 bytes per slot) followed by a column of [`Record`]s (the other 144 bytes), so
//! the binary search walks 8-byte keys instead of 152-byte slots (see `left_right.rs`).

use core::fmt;

/// How many versions may be stacked on one site (the original code is not counted).
///
/// Fixed so that a [`Slot`] has a fixed size and the table needs no allocator.
///
/// ```
/// use lp_core::table::{EntryState, RedirectTable, Slot, TableError, MAX_DEPTH};
/// let (mut a, mut b) = ([Slot::EMPTY; 1], [Slot::EMPTY; 1]);
/// let table = RedirectTable::new(&mut a, &mut b);
/// for id in 0..MAX_DEPTH as u32 {
///     table.push(0x1000, 0x9000, 0x2000 + u64::from(id), id).unwrap();
///     table.set_state(0x1000, id, EntryState::Active).unwrap();
/// }
/// let err = table.push(0x1000, 0x9000, 0x3000, 99).unwrap_err();
/// assert_eq!(err, TableError::StackFull { old: 0x1000, max: MAX_DEPTH });
/// ```
pub const MAX_DEPTH: usize = 8;

/// Size in bytes of one [`Slot`]: what a C shim multiplies its capacity by.
///
/// ```
/// assert_eq!(lp_core::table::SLOT_SIZE, core::mem::size_of::<lp_core::table::Slot>());
/// ```
pub const SLOT_SIZE: usize = core::mem::size_of::<Slot>();

/// Alignment in bytes of one [`Slot`] (8: every field is at most a `u64`).
///
/// ```
/// assert_eq!(lp_core::table::SLOT_ALIGN, 8);
/// ```
pub const SLOT_ALIGN: usize = core::mem::align_of::<Slot>();

/// Where a site's top version stands in its switch (the phase of the transition).
///
/// The state always describes the **top** version of an entry's stack: versions below it are
/// active by construction (a version can only be pushed on top of an active one, and only the
/// top's state can change).
///
/// ```
/// use lp_core::table::EntryState;
/// assert_eq!(EntryState::Reverting.to_string(), "reverting");
/// ```
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum EntryState {
    /// Pushed, not committed: the redirect is being written (or not yet). Calls keep running the
    /// code below the top version. Zero, so that zeroed memory is a valid slot.
    #[default]
    Pending = 0,
    /// Committed: calls go to the top version.
    Active = 1,
    /// Being taken out: the old bytes are being written back. Calls run the code below the top.
    Reverting = 2,
}

impl fmt::Display for EntryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryState::Pending => "pending",
            EntryState::Active => "active",
            EntryState::Reverting => "reverting",
        })
    }
}

/// One version stacked on a site: where calls go, and which patch put it there.
///
/// ```
/// use lp_core::table::Version;
/// let v = Version::new(0x2000, 7);
/// assert_eq!((v.new, v.patch_id), (0x2000, 7));
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Version {
    /// Address of the replacement function.
    pub new: u64,
    /// Identifier of the patch that installed this version.
    pub patch_id: u32,
    _reserved: u32,
}

impl Version {
    /// A version sending calls to `new`, installed by patch `patch_id`.
    ///
    /// ```
    /// assert_eq!(lp_core::table::Version::new(1, 2).patch_id, 2);
    /// ```
    pub const fn new(new: u64, patch_id: u32) -> Version {
        Version {
            new,
            patch_id,
            _reserved: 0,
        }
    }
}

/// One site of the redirect table: the site address, where the original code resumes, the
/// stack of versions and the state of the top one.
///
/// Callers only create empty slots ([`Slot::EMPTY`]) as storage; the table fills them.
///
/// ```
/// use lp_core::table::{RedirectTable, Slot};
/// let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
/// let table = RedirectTable::new(&mut a, &mut b);
/// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
/// let depth = table.read(|snap| snap.get(0x1000).map(|s| s.depth()));
/// assert_eq!(depth, Some(1));
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    old: u64,
    rec: Record,
}

/// Everything of a slot but its site address: the second column of a buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    resume: u64,
    versions: [Version; MAX_DEPTH],
    depth: u32,
    state: EntryState,
}

// The two columns of a buffer of N slots take exactly N slots' worth of memory, and the record
// column (after N 8-byte keys) stays 8-aligned.
const _: () = assert!(core::mem::size_of::<Slot>() == 8 + core::mem::size_of::<Record>());
const _: () = assert!(core::mem::align_of::<Record>() == 8 && core::mem::align_of::<Slot>() == 8);

impl Record {
    pub(crate) const EMPTY: Record = Record {
        resume: 0,
        versions: [Version::new(0, 0); MAX_DEPTH],
        depth: 0,
        state: EntryState::Pending,
    };

    pub(crate) const fn resume(&self) -> u64 {
        self.resume
    }

    pub(crate) const fn depth(&self) -> usize {
        self.depth as usize
    }

    pub(crate) const fn state(&self) -> EntryState {
        self.state
    }

    pub(crate) fn versions(&self) -> &[Version] {
        // `depth` is only ever set by the table to a value <= MAX_DEPTH; `min` keeps a corrupted
        // record (foreign storage) from turning into an out-of-bounds panic.
        &self.versions[..self.depth().min(MAX_DEPTH)]
    }

    pub(crate) fn top(&self) -> Option<Version> {
        self.versions().last().copied()
    }

    pub(crate) fn below_top(&self) -> Option<Version> {
        let v = self.versions();
        v.len().checked_sub(2).map(|i| v[i])
    }
}

impl Slot {
    /// An unused slot (all zero bytes): the value to fill storage with.
    ///
    /// ```
    /// let storage = [lp_core::table::Slot::EMPTY; 16];
    /// assert_eq!(storage[0].depth(), 0);
    /// ```
    pub const EMPTY: Slot = Slot {
        old: 0,
        rec: Record::EMPTY,
    };

    /// A new entry for site `old` whose original code resumes at `resume`, holding `first`.
    pub(crate) const fn first(old: u64, resume: u64, first: Version) -> Slot {
        let mut slot = Slot::EMPTY;
        slot.old = old;
        slot.rec.resume = resume;
        slot.rec.versions[0] = first;
        slot.rec.depth = 1;
        slot
    }

    /// The slot made of a key and its record.
    pub(crate) const fn from_parts(old: u64, rec: Record) -> Slot {
        Slot { old, rec }
    }

    /// The record column's part.
    pub(crate) const fn record(&self) -> Record {
        self.rec
    }

    /// The site address: where the redirect is written (the int3 lands on this byte).
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    /// assert_eq!(table.read(|s| s.get(0x1000).unwrap().old()), 0x1000);
    /// ```
    pub const fn old(&self) -> u64 {
        self.old
    }

    /// Where the original code continues (the original function's trampoline).
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    /// assert_eq!(table.read(|s| s.get(0x1000).unwrap().resume()), 0x9000);
    /// ```
    pub const fn resume(&self) -> u64 {
        self.rec.resume
    }

    /// How many versions are stacked (at least 1 for a slot inside a snapshot).
    ///
    /// ```
    /// assert_eq!(lp_core::table::Slot::EMPTY.depth(), 0);
    /// ```
    pub const fn depth(&self) -> usize {
        self.rec.depth as usize
    }

    /// State of the top version.
    ///
    /// ```
    /// # use lp_core::table::{EntryState, RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    /// assert_eq!(table.read(|s| s.get(0x1000).unwrap().state()), EntryState::Pending);
    /// ```
    pub const fn state(&self) -> EntryState {
        self.rec.state
    }

    /// The stacked versions, oldest first (the last one is the top).
    ///
    /// ```
    /// # use lp_core::table::{EntryState, RedirectTable, Slot, Version};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    /// table.set_state(0x1000, 1, EntryState::Active).unwrap();
    /// table.push(0x1000, 0x9000, 0x3000, 2).unwrap();
    /// let ids: Vec<u32> = table.read(|s| s.get(0x1000).unwrap().versions().iter().map(|v| v.patch_id).collect());
    /// assert_eq!(ids, [1, 2]);
    /// ```
    pub fn versions(&self) -> &[Version] {
        self.rec.versions()
    }

    /// The top version (the newest), or `None` for an empty slot.
    ///
    /// ```
    /// assert!(lp_core::table::Slot::EMPTY.top().is_none());
    /// ```
    pub fn top(&self) -> Option<Version> {
        self.rec.top()
    }

    /// The version right below the top, or `None` when the top is the only one (below it is the
    /// original code).
    ///
    /// ```
    /// assert!(lp_core::table::Slot::EMPTY.below_top().is_none());
    /// ```
    pub fn below_top(&self) -> Option<Version> {
        self.rec.below_top()
    }

    pub(crate) fn set_state(&mut self, state: EntryState) {
        self.rec.state = state;
    }

    /// Stack `v` on top (caller checked there is room); the new top starts pending.
    pub(crate) fn push(&mut self, v: Version) {
        self.rec.versions[self.depth()] = v;
        self.rec.depth += 1;
        self.rec.state = EntryState::Pending;
    }

    /// Drop the top (caller checked depth >= 2); the re-exposed version is active.
    pub(crate) fn pop(&mut self) {
        self.rec.depth -= 1;
        self.rec.versions[self.depth()] = Version::default();
        self.rec.state = EntryState::Active;
    }
}

impl Default for Slot {
    fn default() -> Slot {
        Slot::EMPTY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_memory_is_an_empty_slot() {
        // SAFETY: the test checks the documented claim that all-zero bytes are a valid Slot:
        // every field is an integer, an array of integers, or EntryState whose 0 is Pending.
        let zeroed: Slot = unsafe { core::mem::zeroed() };
        assert_eq!(zeroed, Slot::EMPTY);
    }

    #[test]
    fn push_pop_keep_state_rules() {
        let mut s = Slot::first(0x10, 0x20, Version::new(0x30, 1));
        s.set_state(EntryState::Active);
        s.push(Version::new(0x40, 2));
        assert_eq!(s.state(), EntryState::Pending);
        assert_eq!(s.below_top(), Some(Version::new(0x30, 1)));
        s.pop();
        assert_eq!(s.state(), EntryState::Active);
        assert_eq!(s.top(), Some(Version::new(0x30, 1)));
        assert_eq!(s.below_top(), None);
    }

    #[test]
    fn slot_layout_is_stable_for_c() {
        assert_eq!(SLOT_ALIGN, 8);
        assert_eq!(SLOT_SIZE, 8 + 8 + 16 * MAX_DEPTH + 8);
    }
}

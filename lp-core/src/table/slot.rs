//! One entry of the redirect table, and the unit of caller-supplied storage.
//!
//! [`Slot`] is `#[repr(C)]`, made only of `u64`-sized words (no padding, every bit pattern
//! valid), and all-zero bytes are a valid empty slot, so a C shim can hand the table
//! zero-initialised static arrays (`.bss`) of [`SLOT_SIZE`]-byte elements. Inside a buffer the
//! table does not keep whole slots side by side: it splits the memory into a column of
//! [`Entry`]s (site address + [`Record`]: 152 bytes per slot) and a hash index (up to 32 bytes
//! per slot: the slot's `index_room`), see `layout.rs`.

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

/// Alignment in bytes of one [`Slot`] (8: every field is a `u64` or made of them).
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
    /// The version stored as these two words (as a [`Record`] holds it).
    pub(crate) const fn from_words(words: [u64; 2]) -> Version {
        // SAFETY: `Version` is `repr(C)` u64 + u32 + u32, 16 bytes (asserted below): same size
        // as two words, and every bit pattern is valid.
        unsafe { core::mem::transmute::<[u64; 2], Version>(words) }
    }

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
    /// Room for the hash index (`INDEX_WORDS_PER_SLOT` words per slot of capacity); never part
    /// of an entry the table hands out (always zero there).
    index_room: [u64; INDEX_WORDS_PER_SLOT],
}

/// Hash-index words each slot of capacity brings: the index has at most `4 * capacity` entries
/// of one word each (a power of two, so at most half full). See `layout.rs`.
pub(crate) const INDEX_WORDS_PER_SLOT: usize = 4;

/// Words in one [`Record`].
pub(crate) const RECORD_WORDS: usize = 2 + 2 * MAX_DEPTH;

/// Words in one [`Entry`]: the site address, then its record.
pub(crate) const ENTRY_WORDS: usize = 1 + RECORD_WORDS;

/// One element of a buffer's entry column: a site address and its record, side by side so that
/// a lookup finds the key it must compare and the words it copies in the same cache lines.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) old: u64,
    pub(crate) rec: Record,
}

/// Everything of a slot but its site address: the second column of a buffer.
///
/// Only `u64`s and [`Version`]s (`u64` + two `u32`s): no padding, and any bit pattern is a
/// valid `Record`, so a record can be copied as [`RECORD_WORDS`] words (what the lock-free
/// reader and the writer do, word by word, through atomics). The words the trap path needs come
/// first: `head` (depth and state), `resume`, then the versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    /// Bits 0..32: depth; bits 32..40: the top's [`EntryState`] as its `u8` value.
    head: u64,
    resume: u64,
    versions: [Version; MAX_DEPTH],
}

// The columns of a buffer of N slots (N keys, N records, at most 4N index words) take at most N
// slots' worth of memory, and every column stays 8-aligned.
const _: () = assert!(
    core::mem::size_of::<Slot>() == 8 + core::mem::size_of::<Record>() + 8 * INDEX_WORDS_PER_SLOT
);
const _: () = assert!(core::mem::size_of::<Record>() == 8 * RECORD_WORDS);
const _: () = assert!(core::mem::size_of::<Version>() == 16);
const _: () = assert!(core::mem::align_of::<Record>() == 8 && core::mem::align_of::<Slot>() == 8);

impl EntryState {
    /// The state stored as `v` (an unknown value, which only a torn read that is then discarded
    /// can see, reads as pending).
    const fn from_u8(v: u8) -> EntryState {
        match v {
            1 => EntryState::Active,
            2 => EntryState::Reverting,
            _ => EntryState::Pending,
        }
    }
}

impl Record {
    pub(crate) const EMPTY: Record = Record {
        head: 0,
        resume: 0,
        versions: [Version::new(0, 0); MAX_DEPTH],
    };

    /// The record as words, for word-by-word atomic copies.
    pub(crate) const fn to_words(self) -> [u64; RECORD_WORDS] {
        // SAFETY: `Record` is `repr(C)`, exactly RECORD_WORDS * 8 bytes (asserted above) of
        // integer fields without padding, so every byte is initialised; `[u64; N]` has no
        // invalid bit patterns and alignment 8 <= Record's.
        unsafe { core::mem::transmute::<Record, [u64; RECORD_WORDS]>(self) }
    }

    /// The record made of `words` (as produced by [`to_words`](Record::to_words)).
    #[cfg(test)]
    pub(crate) const fn from_words(words: [u64; RECORD_WORDS]) -> Record {
        // SAFETY: same size (asserted above); every field of `Record` is an integer (`head` and
        // `resume` are u64, a `Version` is u64 + u32 + u32), so every bit pattern is a valid
        // Record.
        unsafe { core::mem::transmute::<[u64; RECORD_WORDS], Record>(words) }
    }

    /// Index of the first word of version `k` inside [`to_words`](Record::to_words).
    pub(crate) const fn version_word(k: usize) -> usize {
        2 + 2 * k
    }

    /// Depth stored in a record's first word, clamped to [`MAX_DEPTH`] (a torn read may see
    /// anything; clamping keeps indexes in bounds).
    pub(crate) const fn depth_of_head(head: u64) -> usize {
        let d = (head & 0xffff_ffff) as usize;
        if d > MAX_DEPTH {
            MAX_DEPTH
        } else {
            d
        }
    }

    /// State stored in a record's first word.
    pub(crate) const fn state_of_head(head: u64) -> EntryState {
        EntryState::from_u8((head >> 32) as u8)
    }

    const fn head_of(depth: usize, state: EntryState) -> u64 {
        (depth as u64) | ((state as u8 as u64) << 32)
    }

    pub(crate) const fn resume(&self) -> u64 {
        self.resume
    }

    pub(crate) const fn depth(&self) -> usize {
        Record::depth_of_head(self.head)
    }

    pub(crate) const fn state(&self) -> EntryState {
        Record::state_of_head(self.head)
    }

    fn set_head(&mut self, depth: usize, state: EntryState) {
        self.head = Record::head_of(depth, state);
    }

    pub(crate) fn versions(&self) -> &[Version] {
        // `depth()` is clamped to MAX_DEPTH: a corrupted record cannot index out of bounds.
        &self.versions[..self.depth()]
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
        index_room: [0; INDEX_WORDS_PER_SLOT],
    };

    /// A new entry for site `old` whose original code resumes at `resume`, holding `first`.
    pub(crate) const fn first(old: u64, resume: u64, first: Version) -> Slot {
        let mut slot = Slot::EMPTY;
        slot.old = old;
        slot.rec.resume = resume;
        slot.rec.versions[0] = first;
        slot.rec.head = Record::head_of(1, EntryState::Pending);
        slot
    }

    /// The slot made of a key and its record.
    pub(crate) const fn from_parts(old: u64, rec: Record) -> Slot {
        Slot {
            old,
            rec,
            index_room: [0; INDEX_WORDS_PER_SLOT],
        }
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
        self.rec.depth()
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
        self.rec.state()
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
        self.rec.set_head(self.depth(), state);
    }

    /// Stack `v` on top (caller checked there is room); the new top starts pending.
    pub(crate) fn push(&mut self, v: Version) {
        let d = self.depth();
        self.rec.versions[d] = v;
        self.rec.set_head(d + 1, EntryState::Pending);
    }

    /// Drop the top (caller checked depth >= 2); the re-exposed version is active.
    pub(crate) fn pop(&mut self) {
        let d = self.depth() - 1;
        self.rec.versions[d] = Version::default();
        self.rec.set_head(d, EntryState::Active);
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
        assert_eq!(SLOT_SIZE, 8 + 8 + 8 + 16 * MAX_DEPTH + 32);
    }

    #[test]
    fn a_record_survives_its_words() {
        let mut s = Slot::first(0x10, 0x20, Version::new(0x30, 1));
        s.set_state(EntryState::Active);
        s.push(Version::new(0x40, 2));
        s.set_state(EntryState::Reverting);
        let words = s.record().to_words();
        assert_eq!(Record::from_words(words), s.record());
        assert_eq!(Record::depth_of_head(words[0]), 2);
        assert_eq!(words[1], 0x20, "resume is the second word");
        assert_eq!(words[Record::version_word(1)], 0x40, "version 1's `new`");
    }

    #[test]
    fn garbage_words_stay_in_bounds() {
        let r = Record::from_words([u64::MAX; RECORD_WORDS]);
        assert_eq!(r.depth(), MAX_DEPTH);
        assert_eq!(r.versions().len(), MAX_DEPTH);
        assert_eq!(r.state(), EntryState::Pending);
    }
}

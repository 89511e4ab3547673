//! The redirect table: site address → stack of versions, with a lookup for the trap path that
//! never blocks, never allocates, never writes shared memory and takes O(1) (a hash index).
//!
//! # Model
//! An entry is keyed by the **site address** `old`: the address where the redirect is written
//! (`Site::patch_addr`, after an `endbr64`), which is also the address of the `int3` byte during a
//! switch. It carries:
//! - `resume`: where the original code continues: the original function's trampoline (displaced
//!   instructions, then a jump back), recorded at the first push;
//! - a stack of [`Version`]s (replacement address + patch id), newest on top, at most
//!   [`MAX_DEPTH`];
//! - the [`EntryState`] of the top version. Versions below the top are active by construction.
//!
//! Rules (each refusal is a [`TableError`] and leaves the table unchanged):
//! - [`push`](RedirectTable::push) adds a site (new version pending) or stacks a version on a
//!   site whose top is active;
//! - [`set_state`](RedirectTable::set_state) changes the top version's state, naming its patch;
//! - [`pop`](RedirectTable::pop) takes the top version out once it is no longer active; popping a
//!   lower version is refused naming the top patch. Popping the last version removes the site.
//!
//! # Storage and concurrency
//! The caller supplies two equally sized slot buffers (static arrays in the kernel, `Vec`s in
//! userspace); lp-core allocates nothing. Each buffer holds the sites sorted, their records, and
//! a hash index (site → position, open addressing, at most half full, bounded probe length).
//! Writers are serialised by a spin mutex and edit the inactive buffer, publish it with one
//! atomic store, then bring the other buffer up to date. Readers never take the lock and never
//! wait for a writer:
//! - [`lookup`](RedirectTable::lookup) (the trap path, also [`len`](RedirectTable::len) and
//!   [`trap::decide`](crate::trap::decide)) only *loads*: it reads the published buffer through
//!   atomic loads and checks the buffer's generation afterwards, retrying in the rare case a
//!   write overlapped (a seqlock over left-right buffers);
//! - [`read`](RedirectTable::read) counts itself into the buffer it reads, so its closure can
//!   hold a whole [`Snapshot`]; writers wait for such readers before editing their buffer.
//!
//! The argument is in the `left_right` submodule's comment. Because a writer waits for counted
//! readers, a counted reader must not be preempted inside `read` while a writer runs with
//! everything else stopped (`stop_machine`). Lookups have no such rule: nothing waits for them.
//!
//! ```
//! use lp_core::table::{EntryState, RedirectTable, Slot};
//!
//! let (mut a, mut b) = (vec![Slot::EMPTY; 1024], vec![Slot::EMPTY; 1024]);
//! let table = RedirectTable::new(&mut a, &mut b);
//! // site 0x1000, original code resumes at its trampoline 0x9000, patch 1 sends calls to 0x2000
//! table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
//! table.set_state(0x1000, 1, EntryState::Active).unwrap();
//! let r = table.lookup(0x1000).unwrap();
//! assert_eq!((r.new, r.state, r.resume), (0x2000, EntryState::Active, 0x9000));
//! assert!(table.lookup(0x1001).is_none());
//! ```

mod edit;
mod error;
mod index;
mod layout;
mod left_right;
mod slot;

pub use error::TableError;
pub use slot::{EntryState, Slot, Version, MAX_DEPTH, SLOT_ALIGN, SLOT_SIZE};

use layout::Entries;
use left_right::LeftRight;
use slot::Record;

/// What the table says about one site: a copy taken from one published snapshot.
///
/// ```
/// # use lp_core::table::{EntryState, RedirectTable, Slot};
/// # let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
/// # let table = RedirectTable::new(&mut a, &mut b);
/// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
/// table.set_state(0x1000, 1, EntryState::Active).unwrap();
/// table.push(0x1000, 0x9000, 0x3000, 2).unwrap();
/// let r = table.lookup(0x1000).unwrap();
/// assert_eq!((r.new, r.patch_id, r.state, r.depth), (0x3000, 2, EntryState::Pending, 2));
/// assert_eq!(r.below.map(|v| v.new), Some(0x2000));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Site address (where the redirect / int3 is written).
    pub old: u64,
    /// Replacement address of the top version.
    pub new: u64,
    /// Patch that installed the top version.
    pub patch_id: u32,
    /// State of the top version.
    pub state: EntryState,
    /// Number of stacked versions (>= 1).
    pub depth: usize,
    /// Where the original code continues (the original function's trampoline).
    pub resume: u64,
    /// The version under the top (active), or `None` when under the top is the original code.
    pub below: Option<Version>,
}

impl Redirect {
    fn of(old: u64, rec: &Record) -> Redirect {
        let top = rec.top().unwrap_or_default();
        Redirect {
            old,
            new: top.new,
            patch_id: top.patch_id,
            state: rec.state(),
            depth: rec.depth(),
            resume: rec.resume(),
            below: rec.below_top(),
        }
    }
}

/// One published, immutable state of the table, sorted by site address.
///
/// Only reachable inside [`RedirectTable::read`]; writers wait while it is held, so keep the
/// closure short and never sleep in it.
///
/// ```
/// # use lp_core::table::{RedirectTable, Slot};
/// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
/// # let table = RedirectTable::new(&mut a, &mut b);
/// table.push(0x3000, 0x9300, 0x5300, 1).unwrap();
/// table.push(0x1000, 0x9100, 0x5100, 1).unwrap();
/// let sites: Vec<u64> = table.read(|snap| snap.iter().map(|s| s.old()).collect());
/// assert_eq!(sites, [0x1000, 0x3000]);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    entries: Entries<'a>,
}

impl<'a> Snapshot<'a> {
    /// A copy of the entry for site `old` (hash index: O(1)).
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9100, 0x5100, 1).unwrap();
    /// assert!(table.read(|snap| snap.get(0x1000).is_some() && snap.get(0x2000).is_none()));
    /// ```
    pub fn get(&self, old: u64) -> Option<Slot> {
        self.entries.lookup(old).map(|i| self.entries.slot(i))
    }

    /// The [`Redirect`] for site `old`.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9100, 0x5100, 1).unwrap();
    /// assert_eq!(table.read(|snap| snap.lookup(0x1000)).unwrap().new, 0x5100);
    /// ```
    pub fn lookup(&self, old: u64) -> Option<Redirect> {
        let i = self.entries.lookup(old)?;
        Some(Redirect::of(self.entries.key(i), self.entries.record(i)))
    }

    /// Number of sites.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// assert_eq!(table.read(|snap| snap.len()), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no site is in the table.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// assert!(table.read(|snap| snap.is_empty()));
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries.len() == 0
    }

    /// Copies of the entries, in ascending site-address order.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9100, 0x5100, 1).unwrap();
    /// assert_eq!(table.read(|snap| snap.iter().count()), 1);
    /// ```
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Slot> + 'a {
        let entries = self.entries;
        (0..entries.len()).map(move |i| entries.slot(i))
    }
}

/// The redirect table over caller-supplied storage. See the [module documentation](self).
///
/// `Sync`: share it between the trap path and writers (`&RedirectTable` or a `static`).
///
/// ```
/// use lp_core::table::{RedirectTable, Slot};
/// let (mut a, mut b) = (vec![Slot::EMPTY; 16], vec![Slot::EMPTY; 16]);
/// let table = RedirectTable::new(&mut a, &mut b);
/// std::thread::scope(|s| {
///     s.spawn(|| table.push(0x1000, 0x9000, 0x2000, 1).unwrap());
///     s.spawn(|| table.lookup(0x1000)); // never blocks: sees the entry or not, never half of it
/// });
/// assert_eq!(table.len(), 1);
/// ```
pub struct RedirectTable<'s> {
    inner: LeftRight<'s>,
}

impl<'s> RedirectTable<'s> {
    /// A table over two storage buffers; it holds `min(a.len(), b.len())` sites. The buffers'
    /// previous contents are ignored.
    ///
    /// ```
    /// use lp_core::table::{RedirectTable, Slot};
    /// let (mut a, mut b) = ([Slot::EMPTY; 64], [Slot::EMPTY; 64]);
    /// let table = RedirectTable::new(&mut a, &mut b);
    /// assert_eq!(table.capacity(), 64);
    /// ```
    pub const fn new(a: &'s mut [Slot], b: &'s mut [Slot]) -> RedirectTable<'s> {
        let capacity = if a.len() < b.len() { a.len() } else { b.len() };
        // SAFETY: two distinct `&mut` slices: initialised, non-overlapping, exclusively ours for
        // 's, each at least `capacity` long.
        unsafe { RedirectTable::from_raw_parts(a.as_mut_ptr(), b.as_mut_ptr(), capacity) }
    }

    /// A table over raw storage, for a C shim holding two static arrays. `const`, so it can
    /// initialise a `static`.
    ///
    /// # Safety
    /// `a` and `b` must each point to `capacity` slots of memory (`capacity * SLOT_SIZE`
    /// bytes), aligned to [`SLOT_ALIGN`], not overlapping, used by nothing else while the table
    /// exists, and valid for `'s`. The memory must be initialised (any bytes: lookups may load
    /// words the table has not written yet, and discard them), but its contents do not matter:
    /// nothing the table did not write is ever used. (Zeroed static arrays, or arrays of
    /// [`Slot::EMPTY`], are the usual choice.) Storage beyond 2^30 slots is not used.
    ///
    /// ```
    /// use core::ptr::addr_of_mut;
    /// use lp_core::table::{RedirectTable, Slot};
    ///
    /// const N: usize = 256;
    /// static mut STORAGE_A: [Slot; N] = [Slot::EMPTY; N];
    /// static mut STORAGE_B: [Slot; N] = [Slot::EMPTY; N];
    /// // SAFETY: the two arrays are used by this table only.
    /// static TABLE: RedirectTable<'static> = unsafe {
    ///     RedirectTable::from_raw_parts(
    ///         addr_of_mut!(STORAGE_A) as *mut Slot,
    ///         addr_of_mut!(STORAGE_B) as *mut Slot,
    ///         N,
    ///     )
    /// };
    ///
    /// TABLE.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    /// assert_eq!(TABLE.lookup(0x1000).unwrap().new, 0x2000);
    /// ```
    pub const unsafe fn from_raw_parts(
        a: *mut Slot,
        b: *mut Slot,
        capacity: usize,
    ) -> RedirectTable<'s> {
        RedirectTable {
            // SAFETY: the caller's contract is LeftRight's.
            inner: unsafe { LeftRight::from_raw_parts(a, b, capacity) },
        }
    }

    /// How many sites the table can hold.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// let (mut a, mut b) = ([Slot::EMPTY; 8], [Slot::EMPTY; 5]);
    /// assert_eq!(RedirectTable::new(&mut a, &mut b).capacity(), 5);
    /// ```
    pub const fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// Run `f` over the current snapshot. Never blocks, never allocates; writers wait until `f`
    /// returns, so keep it short.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9100, 0x5100, 1).unwrap();
    /// assert_eq!(table.read(|snap| snap.len()), 1);
    /// ```
    pub fn read<R>(&self, f: impl FnOnce(Snapshot<'_>) -> R) -> R {
        self.inner.read(|entries| f(Snapshot { entries }))
    }

    /// The trap-path lookup: the entry for site `old`, copied out of the current snapshot.
    /// Never blocks, never allocates, O(1): a hash probe over the published buffer with loads
    /// only (no reader count), validated against concurrent writes.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9100, 0x5100, 1).unwrap();
    /// assert_eq!(table.lookup(0x1000).unwrap().resume, 0x9100);
    /// assert_eq!(table.lookup(0x2000), None);
    /// ```
    pub fn lookup(&self, old: u64) -> Option<Redirect> {
        self.inner.lookup(old)
    }

    /// Number of sites now.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9100, 0x5100, 1).unwrap();
    /// assert_eq!(table.len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the table holds no site now.
    ///
    /// ```
    /// # use lp_core::table::{RedirectTable, Slot};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// assert!(table.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stack a new version (calls to site `old` → `new`, installed by `patch_id`) on site `old`,
    /// whose original code resumes at `resume` (the original function's trampoline). The new
    /// version starts [`EntryState::Pending`].
    ///
    /// A new site takes a free slot. On an existing site, `resume` must equal the recorded one,
    /// the top must be active (one transition per site at a time), the patch must not already be
    /// on the stack, and the stack must have room.
    ///
    /// ```
    /// use lp_core::table::{EntryState, RedirectTable, Slot, TableError};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    /// // patch 1 is not committed yet: nothing may be stacked on it
    /// let err = table.push(0x1000, 0x9000, 0x3000, 2).unwrap_err();
    /// assert!(matches!(err, TableError::InTransition { top_patch: 1, .. }));
    /// table.set_state(0x1000, 1, EntryState::Active).unwrap();
    /// table.push(0x1000, 0x9000, 0x3000, 2).unwrap();
    /// assert_eq!(table.lookup(0x1000).unwrap().depth, 2);
    /// ```
    pub fn push(&self, old: u64, resume: u64, new: u64, patch_id: u32) -> Result<(), TableError> {
        let version = Version::new(new, patch_id);
        self.inner
            .write(
                |entries, capacity| edit::check_push(entries, capacity, old, resume, version),
                edit::apply,
            )
            .map(|_| ())
    }

    /// Set the state of site `old`'s top version, which must belong to `patch_id`.
    ///
    /// Allowed: pending → active (commit), pending → reverting (abandon an apply), active →
    /// reverting (start a revert), reverting → active (abandon a revert), and any state to
    /// itself.
    ///
    /// ```
    /// use lp_core::table::{EntryState, RedirectTable, Slot, TableError};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    /// table.set_state(0x1000, 1, EntryState::Active).unwrap();
    /// let err = table.set_state(0x1000, 1, EntryState::Pending).unwrap_err();
    /// assert!(matches!(err, TableError::BadTransition { .. }));
    /// ```
    pub fn set_state(&self, old: u64, patch_id: u32, state: EntryState) -> Result<(), TableError> {
        self.inner
            .write(
                |entries, _| edit::check_set_state(entries, old, patch_id, state),
                edit::apply,
            )
            .map(|_| ())
    }

    /// Take `patch_id`'s version off site `old`; it must be the top and not active (set it
    /// reverting and write the old bytes back first, or pop it while still pending). Returns
    /// the removed version. The version below becomes the top (it is active); popping the last
    /// version removes the site.
    ///
    /// Pop only after the revert's write plan finished with its final sync: from then on no
    /// CPU can still be about to consult this entry for an int3 that the revert removed.
    ///
    /// ```
    /// use lp_core::table::{EntryState, RedirectTable, Slot, TableError, Version};
    /// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    /// # let table = RedirectTable::new(&mut a, &mut b);
    /// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    /// table.set_state(0x1000, 1, EntryState::Active).unwrap();
    /// table.push(0x1000, 0x9000, 0x3000, 2).unwrap();
    /// // only the top may go
    /// let err = table.pop(0x1000, 1).unwrap_err();
    /// assert_eq!(err, TableError::NotTop { old: 0x1000, patch_id: 1, top_patch: 2 });
    /// assert_eq!(table.pop(0x1000, 2), Ok(Version::new(0x3000, 2)));
    /// let r = table.lookup(0x1000).unwrap();
    /// assert_eq!((r.new, r.state), (0x2000, EntryState::Active));
    /// ```
    pub fn pop(&self, old: u64, patch_id: u32) -> Result<Version, TableError> {
        self.inner
            .write(
                |entries, _| edit::check_pop(entries, old, patch_id),
                |buf, (e, _)| edit::apply(buf, e),
            )
            .map(|(_, v)| v)
    }
}

impl core::fmt::Debug for RedirectTable<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.read(|snap| f.debug_list().entries(snap.iter()).finish())
    }
}

//! Two copies of a sorted slot array, published so that readers never take a lock and never
//! wait for a writer ("left-right" publication).
//!
//! # The scheme
//! Two buffers hold the same sorted entries between writes. `active` says which one readers use.
//! Each buffer has a reader count.
//!
//! Reader (the trap path):
//! 1. `i = active` ; 2. `readers[i] += 1` ; 3. if `active != i` now: `readers[i] -= 1`, go to 1;
//! 4. read buffer `i` (its first `lens[i]` slots) ; 5. `readers[i] -= 1`.
//!
//! Writer (serialised by `writer`, a spin mutex; writers may wait, readers never do):
//! 1. check the edit against the active buffer `a` (nobody writes `a` now) ;
//! 2. `j = 1 - a`; spin until `readers[j] == 0` ; 3. apply the edit to `j`, set `lens[j]` ;
//! 4. `active = j` (publish) ; 5. spin until `readers[a] == 0` ; 6. apply the same edit to `a`.
//!
//! # Why a reader never sees a buffer being written
//! All counter and index operations are `SeqCst`, so they fall into one total order. Take a
//! reader R that passed step 3 with buffer `i`, and a writer W about to write `i` (W's step 3 or
//! 6). W writes `i` only after seeing `i` inactive (the flip away from `i`, step 4 of this or an
//! earlier write, at time F) and then `readers[i] == 0` (time Z > F).
//! - If R's increment comes before Z in the total order, W reads a count that includes R and
//!   keeps spinning until R's decrement: no overlap.
//! - If R's increment comes after Z, then R's re-check (after its increment, so after F) reads
//!   the index as it stands after the flip away from `i`. It sees `active == i` only if a later
//!   flip made `i` active again, and a writer flips to `i` only after it finished writing `i`
//!   (steps 3→4), while the next write of `i` again first needs a flip away and a zero count,
//!   which includes R's increment. So R reads `i` only when it is complete and stays so until R
//!   decrements.
//!
//! Memory visibility follows the same edges: slot writes → flip (`SeqCst` store, release) → a
//! reader's index load (acquire) → its slot reads; and a reader's slot reads → its decrement
//! (release) → the writer's zero load (acquire) → the next slot writes.
//!
//! # Progress
//! A reader does a bounded amount of work per attempt and retries only when the index changed
//! between its two loads, that is when a writer published in between: readers are lock-free and
//! never wait for a writer. A writer waits for readers that are inside step 4 (a binary search:
//! nanoseconds). A reader must therefore not sleep inside [`LeftRight::read`]'s closure.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use super::Slot;

/// The two-buffer publication. `'s` is the lifetime of the caller's storage.
pub(crate) struct LeftRight<'s> {
    bufs: [*mut Slot; 2],
    capacity: usize,
    lens: [AtomicUsize; 2],
    active: AtomicUsize,
    readers: [AtomicUsize; 2],
    writer: spin::Mutex<()>,
    _storage: PhantomData<&'s mut [Slot]>,
}

// SAFETY: the buffers are only reached through `read` (shared reads of a buffer no writer
// touches, argued in the module comment) and `write` (exclusive writes serialised by the mutex,
// to a buffer no reader uses). `Slot` is plain data (`Send + Sync`).
unsafe impl Send for LeftRight<'_> {}
// SAFETY: see `Send` above: all shared access goes through the left-right protocol.
unsafe impl Sync for LeftRight<'_> {}

impl<'s> LeftRight<'s> {
    /// Over two buffers of `capacity` initialised slots each, valid and unaliased for `'s`.
    ///
    /// # Safety
    /// `a` and `b` must each point to `capacity` initialised `Slot`s (all-zero bytes are valid),
    /// not overlap, and be used by nothing else for `'s`.
    pub(crate) const unsafe fn from_raw_parts(a: *mut Slot, b: *mut Slot, capacity: usize) -> Self {
        LeftRight {
            bufs: [a, b],
            capacity,
            lens: [AtomicUsize::new(0), AtomicUsize::new(0)],
            active: AtomicUsize::new(0),
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
            writer: spin::Mutex::new(()),
            _storage: PhantomData,
        }
    }

    /// Entries each buffer can hold.
    pub(crate) const fn capacity(&self) -> usize {
        self.capacity
    }

    /// Run `f` over the current published entries. Never blocks, never allocates.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&[Slot]) -> R) -> R {
        let i = loop {
            let i = self.active.load(SeqCst);
            self.readers[i].fetch_add(1, SeqCst);
            if self.active.load(SeqCst) == i {
                break i;
            }
            // A writer published between our two loads; buffer `i` may be rewritten: retry.
            self.readers[i].fetch_sub(1, SeqCst);
        };
        // Decrements on every exit, unwinding included: a panicking closure must not leave a
        // count behind that would make every later writer spin forever.
        let _reading = Departure(&self.readers[i]);
        let len = self.lens[i].load(SeqCst);
        // SAFETY: buffer `i` holds `capacity >= len` initialised slots (constructor contract;
        // writers keep `len <= capacity`), and no writer touches it until our decrement (module
        // comment). The shared slice lives only inside this call.
        let slots = unsafe { core::slice::from_raw_parts(self.bufs[i], len) };
        f(slots)
    }

    /// Apply one edit: `check` looks at the current entries and returns the edit to make (or
    /// refuses, leaving everything as it was); `apply(buffer, len, &edit)` performs it on a
    /// whole buffer and returns the new length. `apply` runs twice, once per buffer, on identical
    /// contents, so it must be deterministic.
    pub(crate) fn write<E, Err>(
        &self,
        check: impl FnOnce(&[Slot], usize) -> Result<E, Err>,
        apply: impl Fn(&mut [Slot], usize, &E) -> usize,
    ) -> Result<E, Err> {
        let _serialised = self.writer.lock();
        let a = self.active.load(SeqCst);
        let len = self.lens[a].load(SeqCst);
        // SAFETY: only writers change buffers and we hold the writer lock; readers only read.
        let current = unsafe { core::slice::from_raw_parts(self.bufs[a], len) };
        let edit = check(current, self.capacity)?;

        let j = 1 - a;
        self.wait_for_readers(j);
        // SAFETY: buffer `j` is inactive and has no reader (module comment), we hold the writer
        // lock, and it holds `capacity` initialised slots (constructor contract).
        let inactive = unsafe { core::slice::from_raw_parts_mut(self.bufs[j], self.capacity) };
        let new_len = apply(inactive, len, &edit);
        self.lens[j].store(new_len, SeqCst);
        self.active.store(j, SeqCst);

        self.wait_for_readers(a);
        // SAFETY: as above, for buffer `a`, which is now the inactive one.
        let stale = unsafe { core::slice::from_raw_parts_mut(self.bufs[a], self.capacity) };
        let same_len = apply(stale, len, &edit);
        self.lens[a].store(same_len, SeqCst);
        Ok(edit)
    }

    fn wait_for_readers(&self, buffer: usize) {
        while self.readers[buffer].load(SeqCst) != 0 {
            core::hint::spin_loop();
        }
    }
}

/// A reader's departure from a buffer: decrements its count when dropped.
struct Departure<'a>(&'a AtomicUsize);

impl Drop for Departure<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

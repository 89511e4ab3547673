//! Two copies of the sorted entries, published so that readers never take a lock and never
//! wait for a writer ("left-right" publication).
//!
//! # The scheme
//! Two buffers hold the same sorted entries between writes. `active` says which one readers use.
//! Each buffer has a reader count.
//!
//! Reader (the trap path):
//! 1. `i = active` ; 2. `readers[i] += 1` ; 3. if `active != i` now: `readers[i] -= 1`, go to 1;
//! 4. read buffer `i` (its first `lens[i]` entries) ; 5. `readers[i] -= 1`.
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
//! Memory visibility follows the same edges: entry writes → flip (`SeqCst` store, release) → a
//! reader's index load (acquire) → its entry reads; and a reader's entry reads → its decrement
//! (release) → the writer's zero load (acquire) → the next entry writes. The length of a buffer
//! is stored before the flip that publishes it, and changed only while the buffer is inactive
//! and unread.
//!
//! # Layout of a buffer
//! A caller's buffer of `capacity` slots is used as two columns: `capacity` site addresses
//! (`u64`, sorted, the first `len` in use), then `capacity` [`Record`]s (the rest of each entry,
//! same index). `size_of::<Slot>() == 8 + size_of::<Record>()`, so this is exactly the memory
//! given. The binary search walks the dense key column: for 100,000 sites that is 800 KB instead
//! of 15 MB of slots, several times faster when the keys are not all in cache.
//! Only the first `len` entries of each column are ever read, and only after a writer wrote
//! them, so whatever bytes the caller's slots held (padding included) are never read.
//!
//! # Striped reader counts
//! `readers[i]` is really [`STRIPES`] counters, each on its own cache line; a reader uses the one
//! picked by a hash of its stack address (each thread, and in a kernel each task and each CPU's
//! interrupt stack, has its own stack), and a writer waits until every stripe of the buffer is
//! zero. The argument above holds per stripe: replace `readers[i]` by the reader's stripe and
//! Z by the moment the writer read that stripe as zero. Striping keeps CPUs that call patched
//! functions at the same time from bouncing one counter's cache line between them.
//!
//! # Progress
//! A reader does a bounded amount of work per attempt and retries only when the index changed
//! between its two loads, that is when a writer published in between: readers are lock-free and
//! never wait for a writer. A writer waits for readers that are inside step 4 (a binary search:
//! nanoseconds). A reader must therefore not sleep inside [`LeftRight::read`]'s closure.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use super::slot::Record;
use super::Slot;

/// Reader-count stripes per buffer.
pub(crate) const STRIPES: usize = 8;

/// One reader count on a cache line of its own.
#[repr(align(64))]
struct PaddedCount(AtomicUsize);

/// Zeroed counts for one buffer.
const fn zero_counts() -> [PaddedCount; STRIPES] {
    [const { PaddedCount(AtomicUsize::new(0)) }; STRIPES]
}

/// The stripe for the calling thread: a hash of an address on its stack. Threads' stacks are
/// far apart (often a multiple of a large power of two), so the page number is mixed by a
/// multiplicative hash and its high bits are used.
fn my_stripe() -> usize {
    let marker = 0u8;
    let page = (core::ptr::addr_of!(marker) as usize as u64) >> 12;
    (page.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % STRIPES
}

/// The published entries of one buffer: sorted keys and their records, `len` of each.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entries<'a> {
    keys: &'a [u64],
    recs: &'a [Record],
}

impl<'a> Entries<'a> {
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// `Ok(index)` of site `old`, or `Err(index)` where it would be inserted. A plain binary
    /// search over the dense keys: an 8-ary search (independent parallel probes) was measured
    /// and was slower, as was a binary search over whole 152-byte slots.
    pub(crate) fn find(&self, old: u64) -> Result<usize, usize> {
        self.keys.binary_search(&old)
    }

    pub(crate) fn key(&self, i: usize) -> u64 {
        self.keys[i]
    }

    pub(crate) fn record(&self, i: usize) -> &'a Record {
        &self.recs[i]
    }

    pub(crate) fn slot(&self, i: usize) -> Slot {
        Slot::from_parts(self.keys[i], self.recs[i])
    }
}

/// A writer's handle on one inactive buffer. Its operations keep `len <= capacity` and refuse
/// (doing nothing) anything out of range, so no edit can write outside the caller's memory.
pub(crate) struct BufferMut {
    keys: *mut u64,
    recs: *mut Record,
    len: usize,
    capacity: usize,
}

impl BufferMut {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Insert `(old, rec)` at index `at`, shifting the entries from `at` up by one.
    pub(crate) fn insert(&mut self, at: usize, old: u64, rec: Record) {
        if at > self.len || self.len >= self.capacity {
            return;
        }
        // SAFETY: at <= len < capacity: source [at, len) and destination [at+1, len+1) lie in
        // the column (`capacity` elements, constructor contract); `copy` allows the overlap;
        // the writes go to index `at` < capacity. No reader uses this buffer (module comment).
        unsafe {
            core::ptr::copy(self.keys.add(at), self.keys.add(at + 1), self.len - at);
            core::ptr::copy(self.recs.add(at), self.recs.add(at + 1), self.len - at);
            self.keys.add(at).write(old);
            self.recs.add(at).write(rec);
        }
        self.len += 1;
    }

    /// Overwrite the record at `at` (the key stays).
    pub(crate) fn replace(&mut self, at: usize, rec: Record) {
        if at >= self.len {
            return;
        }
        // SAFETY: at < len <= capacity; no reader uses this buffer.
        unsafe { self.recs.add(at).write(rec) };
    }

    /// Remove the entry at `at`, shifting the ones after it down by one.
    pub(crate) fn remove(&mut self, at: usize) {
        if at >= self.len {
            return;
        }
        // SAFETY: at < len <= capacity: source [at+1, len) and destination [at, len-1) lie in
        // the column; `copy` allows the overlap; no reader uses this buffer.
        unsafe {
            core::ptr::copy(self.keys.add(at + 1), self.keys.add(at), self.len - at - 1);
            core::ptr::copy(self.recs.add(at + 1), self.recs.add(at), self.len - at - 1);
        }
        self.len -= 1;
    }
}

/// The two-buffer publication. `'s` is the lifetime of the caller's storage.
pub(crate) struct LeftRight<'s> {
    bufs: [*mut Slot; 2],
    capacity: usize,
    lens: [AtomicUsize; 2],
    active: AtomicUsize,
    readers: [[PaddedCount; STRIPES]; 2],
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
    /// Over two buffers of `capacity` slots each, valid and unaliased for `'s`.
    ///
    /// # Safety
    /// `a` and `b` must each point to `capacity * size_of::<Slot>()` bytes aligned for `Slot`,
    /// not overlap, and be used by nothing else for `'s`. Their contents do not matter.
    pub(crate) const unsafe fn from_raw_parts(a: *mut Slot, b: *mut Slot, capacity: usize) -> Self {
        LeftRight {
            bufs: [a, b],
            capacity,
            lens: [AtomicUsize::new(0), AtomicUsize::new(0)],
            active: AtomicUsize::new(0),
            readers: [zero_counts(), zero_counts()],
            writer: spin::Mutex::new(()),
            _storage: PhantomData,
        }
    }

    /// Entries each buffer can hold.
    pub(crate) const fn capacity(&self) -> usize {
        self.capacity
    }

    /// The key column and the record column of buffer `i`.
    fn columns(&self, i: usize) -> (*mut u64, *mut Record) {
        let keys = self.bufs[i].cast::<u64>();
        // SAFETY: the buffer spans capacity * (8 + size_of::<Record>()) bytes (constructor
        // contract and the size assertion in slot.rs), so the record column starts inside it
        // (or at its end when capacity is 0); 8 * capacity keeps the 8-byte alignment.
        let recs = unsafe { keys.add(self.capacity) }.cast::<Record>();
        (keys, recs)
    }

    /// Run `f` over the current published entries. Never blocks, never allocates.
    pub(crate) fn read<R>(&self, f: impl FnOnce(Entries<'_>) -> R) -> R {
        let stripe = my_stripe();
        let i = loop {
            let i = self.active.load(SeqCst);
            if self.enter(i, stripe) {
                break i;
            }
        };
        // Decrements on every exit, unwinding included: a panicking closure must not leave a
        // count behind that would make every later writer spin forever.
        let _reading = Departure(&self.readers[i][stripe].0);
        let len = self.lens[i].load(SeqCst);
        let (keys, recs) = self.columns(i);
        // SAFETY: the first `len <= capacity` keys and records of buffer `i` were written by a
        // writer before it published `len` (module comment), and no writer touches buffer `i`
        // until our decrement. The slices live only inside this call.
        let entries = unsafe {
            Entries {
                keys: core::slice::from_raw_parts(keys, len),
                recs: core::slice::from_raw_parts(recs, len),
            }
        };
        f(entries)
    }

    /// Reader steps 2–3 for buffer `i`, whose index the reader loaded: count in, re-check. On
    /// `false` a writer published in between; the count is undone and the reader must retry.
    fn enter(&self, i: usize, stripe: usize) -> bool {
        let count = &self.readers[i][stripe].0;
        count.fetch_add(1, SeqCst);
        if self.active.load(SeqCst) == i {
            return true;
        }
        count.fetch_sub(1, SeqCst);
        false
    }

    /// Apply one edit: `check` looks at the current entries and returns the edit to make (or
    /// refuses, leaving everything as it was); `apply(buffer, &edit)` performs it on a buffer.
    /// `apply` runs twice, once per buffer, on identical contents, so it must be deterministic.
    pub(crate) fn write<E, Err>(
        &self,
        check: impl FnOnce(Entries<'_>, usize) -> Result<E, Err>,
        apply: impl Fn(&mut BufferMut, &E),
    ) -> Result<E, Err> {
        let _serialised = self.writer.lock();
        let a = self.active.load(SeqCst);
        let len = self.lens[a].load(SeqCst);
        let (keys, recs) = self.columns(a);
        // SAFETY: only writers change buffers and we hold the writer lock; the first `len`
        // entries of the active buffer were written before; readers only read.
        let current = unsafe {
            Entries {
                keys: core::slice::from_raw_parts(keys, len),
                recs: core::slice::from_raw_parts(recs, len),
            }
        };
        let edit = check(current, self.capacity)?;

        let j = 1 - a;
        self.wait_for_readers(j);
        let new_len = self.edit_buffer(j, len, &edit, &apply);
        self.lens[j].store(new_len, SeqCst);
        self.active.store(j, SeqCst);

        self.wait_for_readers(a);
        let same_len = self.edit_buffer(a, len, &edit, &apply);
        self.lens[a].store(same_len, SeqCst);
        Ok(edit)
    }

    /// Apply `edit` to buffer `i` (inactive, no readers, writer lock held), holding `len`
    /// entries; returns its new length.
    fn edit_buffer<E>(
        &self,
        i: usize,
        len: usize,
        edit: &E,
        apply: &impl Fn(&mut BufferMut, &E),
    ) -> usize {
        let (keys, recs) = self.columns(i);
        let mut buf = BufferMut {
            keys,
            recs,
            len,
            capacity: self.capacity,
        };
        apply(&mut buf, edit);
        buf.len()
    }

    fn wait_for_readers(&self, buffer: usize) {
        for stripe in &self.readers[buffer] {
            while stripe.0.load(SeqCst) != 0 {
                core::hint::spin_loop();
            }
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

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::table::{RedirectTable, Slot};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn a_reader_that_loaded_the_index_before_a_publication_retries() {
        let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
        let t = RedirectTable::new(&mut a, &mut b);
        let lr = &t.inner;
        let stale = lr.active.load(SeqCst);
        // the reader is delayed here, between loading the index and counting itself in
        t.push(0x1000, 0x9000, 0x2000, 1).unwrap();
        assert_ne!(
            lr.active.load(SeqCst),
            stale,
            "a write publishes the other buffer"
        );
        assert!(
            !lr.enter(stale, 3),
            "the stale buffer may be rewritten: retry"
        );
        assert_eq!(
            lr.readers[stale][3].0.load(SeqCst),
            0,
            "the count is undone"
        );
        let fresh = lr.active.load(SeqCst);
        assert!(lr.enter(fresh, 3));
        lr.readers[fresh][3].0.fetch_sub(1, SeqCst);
    }

    #[test]
    fn a_writer_waits_for_a_reader_inside_a_read() {
        let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
        let t = RedirectTable::new(&mut a, &mut b);
        let written = AtomicBool::new(false);
        std::thread::scope(|s| {
            t.read(|snap| {
                let writer = s.spawn(|| {
                    t.push(0x1000, 0x9000, 0x2000, 1).unwrap();
                    written.store(true, SeqCst);
                });
                std::thread::sleep(Duration::from_millis(100));
                // the writer published the other buffer but cannot replay the edit on ours
                assert!(
                    !written.load(SeqCst),
                    "writer finished while a reader was inside"
                );
                assert!(snap.is_empty(), "our snapshot did not change under us");
                drop(writer);
            });
        });
        assert!(written.load(SeqCst));
        assert_eq!(t.len(), 1);
    }
}

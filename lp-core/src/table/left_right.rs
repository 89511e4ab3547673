//! Two copies of the entries, published so that readers never take a lock and never wait for a
//! writer ("left-right" publication), with two kinds of reader:
//! - the **lookup** (the trap path: `lookup`, `len`) only loads: it reads a buffer optimistically
//!   and validates what it read with the buffer's generation (a seqlock per buffer);
//! - the **counted read** (`read(f)`: snapshots, iteration) announces itself in a reader count,
//!   so its closure can hold plain references into a buffer that no writer will touch.
//!
//! # The writer
//! Serialised by `writer` (a spin mutex; writers may wait, readers never wait for a writer).
//! For buffer `x` an *edit* is: `gens[x] += 1` (odd), release fence, the changes (atomic word
//! stores: entries, index, and `lens[x]`, `max_probes[x]`), `gens[x] += 1` (even).
//! A write:
//! 1. check the change against the active buffer `a` (nobody writes `a` now);
//! 2. `j = 1 - a`; wait until no counted reader is in `j`; edit `j`;
//! 3. `active = j` (publish);
//! 4. wait until no counted reader is in `a`; edit `a` (same change: both hold the same again).
//!
//! A buffer is edited only while it is not `active`. `gens[x] == 0` means `x` was never written:
//! its first edit also clears its index (the caller's memory held anything).
//!
//! # The lookup (loads only)
//! 1. `i = active`; `g = gens[i]`; if `g` is odd retry (a writer is inside `i`);
//! 2. probe buffer `i` (atomic `Relaxed` word loads; every position bounds-checked, so torn
//!    values cannot leave the buffer, and the probe length is bounded), copy what it needs;
//! 3. acquire fence; then `active == i` and `gens[i] == g` again, or discard the copy and retry.
//!
//! Why a validated copy is exactly buffer `i` as it stood at generation `g`:
//! - nothing older: `g` was loaded (`SeqCst`, at least acquire) from the store that ended the
//!   edit making it `g` (release), so that edit's stores, and every earlier one, happen before
//!   the reader's loads; by coherence no load returns a value they overwrote;
//! - nothing newer: the next edit of `i` stores `g + 1` then a release fence before any change.
//!   If any of the reader's loads returned a value stored after that fence, the writer's release
//!   fence synchronises with the reader's acquire fence (fence-to-fence through that location),
//!   so the store of `g + 1` happens before the reader's second load of `gens[i]`, which then
//!   returns `g + 1` or later, not `g`: the reader retries.
//!
//! Why it is the *published* state at one instant (no new-then-old across two lookups): `active`
//! and `gens` are only accessed `SeqCst`, so they sit in one total order S. The reader's loads
//! `gens[i] → g`, then `active → i`, then `gens[i] → g` are in S in program order; generations
//! only grow, so at the point P of the second `active` load, `active == i` and `gens[i] == g`.
//! The last flip before P made `i` active right after an edit of `i` finished (step 2→3), and
//! until the next flip away from `i` no write edits `i` (step 2 edits the inactive buffer, step
//! 4 the one just left). So at P the published state is buffer `i` at generation `g`: the
//! lookup takes effect at P. A lookup never sees a state before it is published, nor one
//! already replaced when it started.
//!
//! All the words a lookup reads (and all a writer stores into a buffer) are accessed as atomics,
//! so there is no data race and no undefined behaviour even when the copy is torn: torn copies
//! are only ever discarded. `Record`s are plain integers, so any words form a valid one.
//!
//! # The counted read
//! 1. `i = active` ; 2. `readers[i] += 1` ; 3. if `active != i` now: `readers[i] -= 1`, go to 1;
//! 4. read buffer `i` (its first `lens[i]` entries) ; 5. `readers[i] -= 1`.
//!
//! Why no writer touches buffer `i` during step 4 (all count and index operations `SeqCst`, one
//! total order): a writer edits `i` only after seeing `i` inactive (a flip away from `i`, at
//! time F) and then `readers[i] == 0` (time Z > F).
//! - If R's increment comes before Z in the total order, the writer reads a count that includes
//!   R and keeps spinning until R's decrement: no overlap.
//! - If R's increment comes after Z, then R's re-check (after its increment, so after F) reads
//!   the index as it stands after the flip away from `i`. It sees `active == i` only if a later
//!   flip made `i` active again, and a writer flips to `i` only after it finished editing `i`,
//!   while the next edit of `i` again first needs a flip away and a zero count, which includes
//!   R's increment. So R reads `i` only when it is complete and stays so until R decrements.
//!
//! Memory visibility follows the same edges: edit stores → flip (release) → the reader's index
//! load (acquire) → its reads; and its reads → its decrement (release) → the writer's zero load
//! (acquire) → the next edit.
//!
//! The reader count of a buffer is [`STRIPES`] counters, each on its own cache line; a reader
//! uses the one picked by a hash of its stack address (each thread, and in a kernel each task
//! and each CPU's interrupt stack, has its own stack), and a writer waits until every stripe of
//! the buffer is zero. The argument holds per stripe.
//!
//! # Progress
//! A lookup does a bounded amount of work per attempt (probe length at most `max_probe + 1`)
//! and retries only when a writer stored a generation or flipped `active` during it: lookups are
//! lock-free, and a writer stopped half-way never blocks them (it edits the inactive buffer;
//! the active one stays valid). They never make a writer wait either. A counted read retries
//! only when a writer published between its two index loads; a writer waits for counted
//! readers inside step 4, so a counted reader must not sleep inside [`LeftRight::read`]'s
//! closure (nor be preempted there while a writer runs with everything else stopped).

use core::marker::PhantomData;
use core::sync::atomic::{
    fence, AtomicUsize, Ordering::Acquire, Ordering::Release, Ordering::SeqCst,
};

use super::layout::{BufferMut, Columns, Entries};
use super::slot::Record;
use super::{Redirect, Slot, Version};

/// Reader-count stripes per buffer.
pub(crate) const STRIPES: usize = 8;

/// The most sites a table holds (positions must fit the index's 32 bits): larger storage is
/// used only up to this many slots.
pub(crate) const MAX_CAPACITY: usize = 1 << 30;

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

/// The two-buffer publication. `'s` is the lifetime of the caller's storage.
pub(crate) struct LeftRight<'s> {
    cols: [Columns; 2],
    capacity: usize,
    active: AtomicUsize,
    gens: [AtomicUsize; 2],
    lens: [AtomicUsize; 2],
    max_probes: [AtomicUsize; 2],
    readers: [[PaddedCount; STRIPES]; 2],
    writer: spin::Mutex<()>,
    _storage: PhantomData<&'s mut [Slot]>,
}

// SAFETY: the buffers are only reached through `lookup` (atomic loads, validated), `read`
// (shared reads of a buffer no writer touches) and `write` (atomic stores serialised by the
// mutex, to a buffer no counted reader uses), as argued in the module comment. `Slot` is plain
// data (`Send + Sync`).
unsafe impl Send for LeftRight<'_> {}
// SAFETY: see `Send` above: all shared access goes through the protocol.
unsafe impl Sync for LeftRight<'_> {}

impl<'s> LeftRight<'s> {
    /// Over two buffers of `capacity` slots each, valid and unaliased for `'s`.
    ///
    /// # Safety
    /// `a` and `b` must each point to `capacity * size_of::<Slot>()` bytes of initialised
    /// memory aligned for `Slot`, not overlap, and be used by nothing else for `'s`. Their
    /// contents do not matter.
    pub(crate) const unsafe fn from_raw_parts(a: *mut Slot, b: *mut Slot, capacity: usize) -> Self {
        let capacity = if capacity > MAX_CAPACITY {
            MAX_CAPACITY
        } else {
            capacity
        };
        LeftRight {
            // SAFETY: the caller's contract.
            cols: unsafe { [Columns::of(a, capacity), Columns::of(b, capacity)] },
            capacity,
            active: AtomicUsize::new(0),
            gens: [AtomicUsize::new(0), AtomicUsize::new(0)],
            lens: [AtomicUsize::new(0), AtomicUsize::new(0)],
            max_probes: [AtomicUsize::new(0), AtomicUsize::new(0)],
            readers: [zero_counts(), zero_counts()],
            writer: spin::Mutex::new(()),
            _storage: PhantomData,
        }
    }

    /// Entries each buffer can hold.
    pub(crate) const fn capacity(&self) -> usize {
        self.capacity
    }

    /// Lookup step 1: the active buffer and its (even) generation, or `None` to retry.
    #[inline(always)]
    fn begin(&self) -> Option<(usize, usize)> {
        let i = self.active.load(SeqCst) & 1;
        let g = self.gens[i].load(SeqCst);
        (g & 1 == 0).then_some((i, g))
    }

    /// Lookup step 3: whether what was read from buffer `i` since `begin` returned `(i, g)` is
    /// the state published at this instant.
    #[inline(always)]
    fn validate(&self, i: usize, g: usize) -> bool {
        fence(Acquire);
        self.active.load(SeqCst) == i && self.gens[i].load(SeqCst) == g
    }

    /// Run `attempt` over buffer `i` at generation `g` until it was not overlapped by a write.
    /// `attempt` must only read the buffer through atomic loads and tolerate torn values.
    #[inline(always)]
    fn optimistic<R>(&self, attempt: impl Fn(usize, usize) -> R) -> R {
        loop {
            if let Some((i, g)) = self.begin() {
                let r = attempt(i, g);
                if self.validate(i, g) {
                    return r;
                }
            }
            core::hint::spin_loop();
        }
    }

    /// The trap-path lookup: what the table says about site `key`, built from the words of its
    /// record the trap path needs (head, resume, the top two versions). Loads only: no store,
    /// no read-modify-write, never waits.
    #[inline]
    pub(crate) fn lookup(&self, key: u64) -> Option<Redirect> {
        self.optimistic(|i, g| {
            if g == 0 {
                return None; // never written: the initial, empty state
            }
            let cols = &self.cols[i];
            let pos = cols.find_racy(key, self.max_probes[i].load(SeqCst))?;
            let head = cols.record_word_racy(pos, 0);
            let depth = Record::depth_of_head(head);
            let version = |k: usize| {
                let w = Record::version_word(k);
                Version::from_words([
                    cols.record_word_racy(pos, w),
                    cols.record_word_racy(pos, w + 1),
                ])
            };
            let top = if depth >= 1 {
                version(depth - 1)
            } else {
                Version::default()
            };
            Some(Redirect {
                old: key,
                new: top.new,
                patch_id: top.patch_id,
                state: Record::state_of_head(head),
                depth,
                resume: cols.record_word_racy(pos, 1),
                below: (depth >= 2).then(|| version(depth - 2)),
            })
        })
    }

    /// Number of published entries, by the same optimistic protocol.
    pub(crate) fn len(&self) -> usize {
        self.optimistic(|i, _| self.lens[i].load(SeqCst))
    }

    /// Run `f` over the current published entries (a counted read). Never blocks, never
    /// allocates.
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
        let max_probe = self.max_probes[i].load(SeqCst);
        // SAFETY: the first `len <= capacity` entries of buffer `i` and its index (written at
        // its first edit, and len > 0 only after one) were written by a writer before it
        // published them (module comment), and no writer touches buffer `i` until our
        // decrement. The view lives only inside this call.
        let entries = unsafe { self.cols[i].entries(len, max_probe) };
        f(entries)
    }

    /// Counted-read steps 2–3 for buffer `i`, whose index the reader loaded: count in,
    /// re-check. On `false` a writer published in between; the count is undone and the reader
    /// must retry.
    fn enter(&self, i: usize, stripe: usize) -> bool {
        let count = &self.readers[i][stripe].0;
        count.fetch_add(1, SeqCst);
        if self.active.load(SeqCst) == i {
            return true;
        }
        count.fetch_sub(1, SeqCst);
        false
    }

    /// Apply one change: `check` looks at the current entries and returns the edit to make (or
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
        // SAFETY: only writers change buffers and we hold the writer lock; the active buffer's
        // first `len` entries and index are the table's; `current` is dropped before any edit.
        let current = unsafe { self.cols[a].entries(len, self.max_probes[a].load(SeqCst)) };
        let edit = check(current, self.capacity)?;

        let j = 1 - a;
        self.wait_for_readers(j);
        self.edit_buffer(j, &edit, &apply);
        self.active.store(j, SeqCst);

        self.wait_for_readers(a);
        self.edit_buffer(a, &edit, &apply);
        Ok(edit)
    }

    /// Edit buffer `i` (inactive, no counted readers, writer lock held) inside an odd
    /// generation, as the module comment describes.
    fn edit_buffer<E>(&self, i: usize, edit: &E, apply: &impl Fn(&mut BufferMut, &E)) {
        let g = self.gens[i].load(SeqCst);
        self.gens[i].store(g + 1, SeqCst);
        // Orders the odd generation before every change below (the lookup's "nothing newer").
        fence(Release);
        // SAFETY: we are the only writer (lock), no counted reader is in `i` (waited), and its
        // first `lens[i]` entries are the table's (and its index, once g > 0).
        let mut buf = unsafe {
            self.cols[i].writer(self.lens[i].load(SeqCst), self.max_probes[i].load(SeqCst))
        };
        if g == 0 {
            buf.clear_index();
        }
        apply(&mut buf, edit);
        self.lens[i].store(buf.len(), SeqCst);
        self.max_probes[i].store(buf.max_probe(), SeqCst);
        self.gens[i].store(g + 2, SeqCst);
    }

    fn wait_for_readers(&self, buffer: usize) {
        for stripe in &self.readers[buffer] {
            while stripe.0.load(SeqCst) != 0 {
                core::hint::spin_loop();
            }
        }
    }
}

/// A counted reader's departure from a buffer: decrements its count when dropped.
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
                // a lookup does not wait: it sees what the stuck writer already published
                assert_eq!(t.lookup(0x1000).map(|r| r.new), Some(0x2000));
                drop(writer);
            });
        });
        assert!(written.load(SeqCst));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_lookup_overlapped_by_a_write_is_discarded() {
        let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
        let t = RedirectTable::new(&mut a, &mut b);
        t.push(0x1000, 0x9000, 0x2000, 1).unwrap();
        let lr = &t.inner;
        let (i, g) = lr.begin().unwrap();
        assert!(lr.validate(i, g), "nothing happened in between");
        // the lookup has read buffer i and is delayed here while a write goes through
        t.set_state(0x1000, 1, crate::table::EntryState::Active)
            .unwrap();
        assert!(!lr.validate(i, g), "a torn or stale copy must be retried");
        let (i, g) = lr.begin().unwrap();
        assert!(lr.validate(i, g));
    }

    #[test]
    fn a_lookup_is_not_held_up_by_a_writer_stopped_half_way() {
        let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
        let t = RedirectTable::new(&mut a, &mut b);
        t.push(0x1000, 0x9000, 0x2000, 1).unwrap();
        let lr = &t.inner;
        // a writer preempted (or interrupted by this very lookup) while editing the inactive
        // buffer: that buffer's generation is odd until it resumes
        let j = 1 - lr.active.load(SeqCst);
        let g = lr.gens[j].load(SeqCst);
        lr.gens[j].store(g + 1, SeqCst);
        assert_eq!(t.lookup(0x1000).map(|r| r.resume), Some(0x9000));
        assert_eq!(t.len(), 1);
        lr.gens[j].store(g, SeqCst);
    }

    #[test]
    fn a_never_written_buffer_is_empty_whatever_its_memory_holds() {
        use crate::table::slot::RECORD_WORDS;
        use crate::table::{index, SLOT_SIZE};
        // storage that looks like a table holding site K at every position (any initialised
        // bytes are allowed): nothing may be found before the table wrote it
        const K: u64 = 0x1000;
        const CAP: usize = 2;
        let words = CAP * SLOT_SIZE / 8;
        let fake = |w: usize| match w {
            w if w < CAP => K,
            w if w < CAP * (1 + RECORD_WORDS) => 1,
            _ => index::entry(index::hash(K), 0),
        };
        let mut a: std::vec::Vec<u64> = (0..words).map(fake).collect();
        let mut b = a.clone();
        // SAFETY: two distinct vectors of CAP slots' worth of 8-aligned, initialised words.
        let t = unsafe {
            RedirectTable::from_raw_parts(a.as_mut_ptr().cast(), b.as_mut_ptr().cast(), CAP)
        };
        assert_eq!(t.lookup(K), None);
        assert_eq!(t.len(), 0);
        t.push(0x2000, 0x9000, 0x3000, 1).unwrap();
        assert_eq!(t.lookup(K), None, "the first edit cleared the index");
        assert_eq!(t.lookup(0x2000).map(|r| r.new), Some(0x3000));
    }
}

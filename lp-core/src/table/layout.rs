//! How one caller-supplied buffer of `capacity` slots is used: two columns in its memory.
//!
//! | column | words | contents |
//! |---|---|---|
//! | entries | `capacity * ENTRY_WORDS` | [`Entry`]: site address + record, sorted by site; the first `len` in use |
//! | index | `index_len(capacity)` (`<= 4 * capacity`) | hash index: site → position (`index.rs`) |
//!
//! `size_of::<Slot>() == size_of::<Entry>() + 32` (asserted in `slot.rs`), so both columns fit
//! in the memory given. The sorted entries serve writers (binary search for where an insert
//! goes) and ordered iteration; the index serves lookups in O(1). A lookup touches one index
//! entry (usually one cache line) and the first words of one entry (site address, state, resume,
//! top versions: one or two adjacent lines).
//!
//! # Access rules
//! A writer (one at a time) changes a buffer only through [`BufferMut`], whose every store is an
//! atomic word store: lock-free readers (`LeftRight::lookup`) may be reading the same buffer
//! with atomic word loads and discard what they read if a write overlapped (their generation
//! check). Counted readers ([`Entries`], plain slices) only ever see a buffer no writer touches.
//! All positions are checked against `capacity` (lock-free loads) or the slices' lengths, so no
//! value read, torn or not, can reach memory outside the buffer.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::index;
use super::slot::{Entry, Record, ENTRY_WORDS, RECORD_WORDS};
use super::Slot;

/// Atomic load of one word of a buffer.
///
/// # Safety
/// `p` is 8-aligned, inside a live buffer (initialised memory), and every access to it that may
/// run at the same time is atomic (the access rules above).
#[inline(always)]
unsafe fn load(p: *const u64) -> u64 {
    // SAFETY: forwarded from the caller; AtomicU64 has the size and alignment of u64.
    unsafe { AtomicU64::from_ptr(p.cast_mut()) }.load(Relaxed)
}

/// Atomic store of one word of a buffer. Same contract as [`load`].
#[inline(always)]
unsafe fn store(p: *mut u64, v: u64) {
    // SAFETY: forwarded from the caller.
    unsafe { AtomicU64::from_ptr(p) }.store(v, Relaxed)
}

/// The two columns of one buffer, as raw pointers to words.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Columns {
    entries: *mut u64,
    index: *mut u64,
    capacity: usize,
    index_len: usize,
}

impl Columns {
    /// The columns of the buffer at `buf`.
    ///
    /// # Safety
    /// `buf` points to `capacity` slots of initialised memory, 8-aligned.
    pub(crate) const unsafe fn of(buf: *mut Slot, capacity: usize) -> Columns {
        let entries = buf.cast::<u64>();
        // SAFETY: entry + index words fit in capacity slots (slot.rs assertion and index_len <=
        // 4 * capacity), so the offset stays inside (or one past) the buffer.
        let index = unsafe { entries.add(capacity * ENTRY_WORDS) };
        Columns {
            entries,
            index,
            capacity,
            index_len: index::index_len(capacity),
        }
    }

    /// A lock-free reader's lookup: position of `key` by the index, through atomic loads. The
    /// result may come from a torn state; the caller validates it (generation check) before
    /// trusting it. Every load stays inside the buffer whatever the loaded values.
    #[inline(always)]
    pub(crate) fn find_racy(&self, key: u64, max_probe: usize) -> Option<usize> {
        index::probe(
            key,
            self.index_len,
            max_probe,
            // SAFETY: `at` < index_len (probe masks it); lock-free reads of a live buffer.
            |at| unsafe { load(self.index.add(at)) },
            |pos| {
                // SAFETY: bounds-checked against capacity; lock-free reads.
                (pos < self.capacity).then(|| unsafe { load(self.entries.add(pos * ENTRY_WORDS)) })
            },
        )
    }

    /// Word `w` of the record at position `pos` (< capacity, `w` < RECORD_WORDS), through an
    /// atomic load.
    #[inline(always)]
    pub(crate) fn record_word_racy(&self, pos: usize, w: usize) -> u64 {
        if pos >= self.capacity {
            return 0;
        }
        let i = pos * ENTRY_WORDS + 1 + w.min(RECORD_WORDS - 1);
        // SAFETY: i < capacity * ENTRY_WORDS (checked and clamped above); lock-free reads.
        unsafe { load(self.entries.add(i)) }
    }

    /// The first `len` entries, for a reader that no writer can overlap (counted reader, or
    /// the writer itself). `max_probe` is the buffer's.
    ///
    /// # Safety
    /// No write to this buffer happens while the returned view lives, `len <= capacity`, and
    /// the first `len` entries and (if `len > 0`) the whole index were written by the table.
    pub(crate) unsafe fn entries<'a>(&self, len: usize, max_probe: usize) -> Entries<'a> {
        let index_len = if len == 0 { 0 } else { self.index_len };
        // SAFETY: forwarded from the caller; the column sizes are in bounds (Columns::of).
        unsafe {
            Entries {
                entries: core::slice::from_raw_parts(self.entries.cast::<Entry>(), len),
                index: core::slice::from_raw_parts(self.index, index_len),
                max_probe,
            }
        }
    }

    /// A writer's handle on this buffer holding `len` entries.
    ///
    /// # Safety
    /// The caller is the only writer (lock held), counted readers are out of this buffer, and
    /// the first `len` entries (and the index, if the buffer was ever written) are the table's.
    pub(crate) unsafe fn writer(&self, len: usize, max_probe: usize) -> BufferMut {
        BufferMut {
            cols: *self,
            len,
            max_probe,
        }
    }
}

/// The published entries of one buffer as a counted reader sees them: sorted entries and the
/// hash index.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entries<'a> {
    entries: &'a [Entry],
    index: &'a [u64],
    max_probe: usize,
}

impl<'a> Entries<'a> {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// `Ok(index)` of site `old`, or `Err(index)` where it would be inserted: a binary search,
    /// for writers, which need the insert position.
    pub(crate) fn find(&self, old: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&old, |e| e.old)
    }

    /// Position of site `old` by the hash index: O(1).
    pub(crate) fn lookup(&self, old: u64) -> Option<usize> {
        index::probe(
            old,
            self.index.len(),
            self.max_probe,
            |at| self.index[at],
            |pos| self.entries.get(pos).map(|e| e.old),
        )
    }

    pub(crate) fn key(&self, i: usize) -> u64 {
        self.entries[i].old
    }

    pub(crate) fn record(&self, i: usize) -> &'a Record {
        &self.entries[i].rec
    }

    pub(crate) fn slot(&self, i: usize) -> Slot {
        let e = self.entries[i];
        Slot::from_parts(e.old, e.rec)
    }
}

/// A writer's handle on one buffer. Its operations keep `len <= capacity`, refuse (doing
/// nothing) anything out of range, and store only through atomic word stores.
pub(crate) struct BufferMut {
    cols: Columns,
    len: usize,
    max_probe: usize,
}

impl BufferMut {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The longest probe distance of any entry inserted since the buffer was last empty.
    pub(crate) fn max_probe(&self) -> usize {
        self.max_probe
    }

    /// First word of the entry at `pos`.
    fn entry_word(&self, pos: usize) -> *mut u64 {
        debug_assert!(pos < self.cols.capacity);
        // SAFETY: pos < capacity at every call: inside the entry column.
        unsafe { self.cols.entries.add(pos * ENTRY_WORDS) }
    }

    fn key(&self, pos: usize) -> u64 {
        // SAFETY: inside the buffer; we are the only writer.
        unsafe { load(self.entry_word(pos)) }
    }

    fn index_at(&self, at: usize) -> u64 {
        // SAFETY: at < index_len at every call (masked).
        unsafe { load(self.cols.index.add(at)) }
    }

    fn set_index(&mut self, at: usize, e: u64) {
        // SAFETY: at < index_len at every call (masked).
        unsafe { store(self.cols.index.add(at), e) }
    }

    /// Copy `n` words from `src` to `dst` (overlapping allowed), word by word, atomically.
    ///
    /// # Safety
    /// Both ranges lie inside the buffer.
    unsafe fn copy_words(src: *const u64, dst: *mut u64, n: usize) {
        if (dst as usize) < (src as usize) {
            for w in 0..n {
                // SAFETY: w < n: inside both ranges (caller).
                unsafe { store(dst.add(w), load(src.add(w))) };
            }
        } else {
            for w in (0..n).rev() {
                // SAFETY: as above.
                unsafe { store(dst.add(w), load(src.add(w))) };
            }
        }
    }

    fn write_entry(&mut self, pos: usize, old: u64, rec: Record) {
        let first = self.entry_word(pos);
        // SAFETY: the entry's first word, inside the buffer; stores are atomic.
        unsafe { store(first, old) };
        self.write_record(pos, rec);
    }

    fn write_record(&mut self, pos: usize, rec: Record) {
        let first = self.entry_word(pos);
        for (w, v) in rec.to_words().into_iter().enumerate() {
            // SAFETY: w < RECORD_WORDS: word 1 + w of the entry, inside the buffer.
            unsafe { store(first.add(1 + w), v) };
        }
    }

    /// Empty the whole index: the first write to a buffer (its memory held anything).
    pub(crate) fn clear_index(&mut self) {
        for at in 0..self.cols.index_len {
            self.set_index(at, index::EMPTY);
        }
        self.max_probe = 0;
    }

    /// Add `pos` → the key at `pos` to the index (an empty entry exists: len < capacity <
    /// index_len / 2).
    fn index_insert(&mut self, pos: usize) {
        let n = self.cols.index_len;
        let h = index::hash(self.key(pos));
        let mut at = index::home(h, n);
        for distance in 0..n {
            if self.index_at(at) == index::EMPTY {
                self.set_index(at, index::entry(h, pos));
                self.max_probe = self.max_probe.max(distance);
                return;
            }
            at = (at + 1) & (n - 1);
        }
    }

    /// Take the entry naming `pos` out of the index, shifting later entries of its probe run
    /// back so that no lookup stops early at the hole (no tombstones).
    fn index_remove(&mut self, pos: usize) {
        let n = self.cols.index_len;
        let mask = n - 1;
        let mut at = index::home(index::hash(self.key(pos)), n);
        let mut found = None;
        for _ in 0..n {
            let e = self.index_at(at);
            if e == index::EMPTY {
                break;
            }
            if index::position(e) == pos {
                found = Some(at);
                break;
            }
            at = (at + 1) & mask;
        }
        let Some(mut hole) = found else { return };
        let mut j = hole;
        for _ in 0..n {
            j = (j + 1) & mask;
            let e = self.index_at(j);
            if e == index::EMPTY {
                break;
            }
            let h = index::home(index::hash(self.key(index::position(e))), n);
            // The entry at j may fill the hole if the hole lies on its probe path [h, j].
            if (j.wrapping_sub(h) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.set_index(hole, e);
                hole = j;
            }
        }
        self.set_index(hole, index::EMPTY);
    }

    /// Add `delta` (+1 / -1) to every index entry naming a position `>= from`.
    fn shift_positions(&mut self, from: usize, up: bool) {
        for at in 0..self.cols.index_len {
            let e = self.index_at(at);
            if e != index::EMPTY && index::position(e) >= from {
                self.set_index(at, if up { e + 1 } else { e - 1 });
            }
        }
    }

    /// Insert `(old, rec)` at position `at`, shifting the entries from `at` up by one.
    pub(crate) fn insert(&mut self, at: usize, old: u64, rec: Record) {
        if at > self.len || self.len >= self.cols.capacity {
            return;
        }
        if at < self.len {
            let n = self.len - at;
            // SAFETY: at < len < capacity: source entries [at, len) and destination [at+1,
            // len+1) lie in the entry column.
            unsafe {
                Self::copy_words(
                    self.entry_word(at),
                    self.entry_word(at + 1),
                    n * ENTRY_WORDS,
                )
            };
            self.shift_positions(at, true);
        }
        self.write_entry(at, old, rec);
        self.len += 1;
        self.index_insert(at);
    }

    /// Overwrite the record at `at` (the key stays).
    pub(crate) fn replace(&mut self, at: usize, rec: Record) {
        if at >= self.len {
            return;
        }
        self.write_record(at, rec);
    }

    /// Remove the entry at `at`, shifting the ones after it down by one.
    pub(crate) fn remove(&mut self, at: usize) {
        if at >= self.len {
            return;
        }
        self.index_remove(at);
        let n = self.len - at - 1;
        if n > 0 {
            // SAFETY: at + 1 < len <= capacity: source entries [at+1, len) and destination
            // [at, len-1) lie in the entry column.
            unsafe {
                Self::copy_words(
                    self.entry_word(at + 1),
                    self.entry_word(at),
                    n * ENTRY_WORDS,
                )
            };
            self.shift_positions(at + 1, false);
        }
        self.len -= 1;
        if self.len == 0 {
            // the index is all empty again: probe bounds start over
            self.max_probe = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use crate::table::slot::Record;

    fn with_buffer(capacity: usize, f: impl FnOnce(&mut BufferMut, Columns)) {
        let mut mem = vec![Slot::EMPTY; capacity];
        // SAFETY: `mem` is `capacity` initialised slots, used only here.
        let cols = unsafe { Columns::of(mem.as_mut_ptr(), capacity) };
        // SAFETY: single-threaded test: the only writer, no readers.
        let mut buf = unsafe { cols.writer(0, 0) };
        buf.clear_index();
        f(&mut buf, cols);
    }

    fn check_all_found(buf: &BufferMut, cols: Columns) {
        // SAFETY: no writer runs while we read (single-threaded).
        let e = unsafe { cols.entries(buf.len(), buf.max_probe()) };
        for pos in 0..buf.len() {
            assert_eq!(e.lookup(e.key(pos)), Some(pos), "key at {pos}");
            assert_eq!(cols.find_racy(e.key(pos), buf.max_probe()), Some(pos));
        }
    }

    #[test]
    fn index_follows_inserts_and_removes_anywhere() {
        let n = 200u64;
        with_buffer(n as usize, |buf, cols| {
            // keys colliding on purpose: same low bits, many equal home entries modulo the size
            let key = |i: u64| 0x40_0000 + i * 0x1_0000;
            for i in (0..n).rev() {
                // always insert at the front: every insert shifts all positions
                buf.insert(0, key(i), Record::EMPTY);
            }
            check_all_found(buf, cols);
            for k in (0..n).step_by(3) {
                // SAFETY: single-threaded.
                let e = unsafe { cols.entries(buf.len(), buf.max_probe()) };
                let pos = e.find(key(k)).unwrap();
                buf.remove(pos);
                check_all_found(buf, cols);
                // SAFETY: single-threaded.
                let e = unsafe { cols.entries(buf.len(), buf.max_probe()) };
                assert_eq!(e.lookup(key(k)), None, "removed key {k} still found");
            }
            while buf.len() > 0 {
                buf.remove(buf.len() / 2);
                check_all_found(buf, cols);
            }
            assert_eq!(buf.max_probe(), 0);
        });
    }

    #[test]
    fn probe_lengths_stay_short_for_clustered_function_addresses() {
        let n = 100_000u64;
        with_buffer(n as usize, |buf, _| {
            for i in 0..n {
                buf.insert(i as usize, 0xffff_ffff_8100_0000 + i * 0x40, Record::EMPTY);
            }
            assert!(buf.max_probe() < 64, "max probe {}", buf.max_probe());
        });
    }
}

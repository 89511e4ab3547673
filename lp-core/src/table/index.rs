//! The hash index of a buffer: site address → position in the buffer's columns, so a lookup
//! costs the same whatever the number of sites.
//!
//! Open addressing with linear probing over a power-of-two array of one-word entries, built by
//! the writer into each buffer next to the sorted columns (see `layout.rs`):
//! - an entry is `tag << 32 | (position + 1)`; `0` is an empty entry. The tag is 32 bits of the
//!   site's hash, so a probe compares the site address (another cache line) only when the tags
//!   match, about once per 4 billion foreign entries;
//! - the array has the largest power of two `<= 4 * capacity` entries, more than twice the number
//!   of sites, so it is always under half full: lookups probe about 1.5 entries for a hit and
//!   2.5 for a miss (Knuth), within one or two cache lines, and there is always an empty entry
//!   for an insert to find;
//! - each buffer also records `max_probe`, the longest distance any insert travelled from its
//!   home entry; a lookup never probes further, so its cost is bounded even in the worst case.
//!   Deletions use backward shifting (no tombstones), which never lengthens a probe sequence, so
//!   `max_probe` stays an upper bound until the buffer empties.
//!
//! The hash is the MurmurHash3 64-bit finaliser: site addresses are aligned, clustered function
//! addresses, which a plain multiplicative hash would map to correlated home entries and tags.

/// One empty index entry.
pub(crate) const EMPTY: u64 = 0;

/// A well-mixed 64-bit hash of a site address.
#[inline(always)]
pub(crate) const fn hash(key: u64) -> u64 {
    let mut h = key;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Index entries for a table of `capacity` sites: the largest power of two `<= 4 * capacity`
/// (0 for no capacity).
pub(crate) const fn index_len(capacity: usize) -> usize {
    if capacity == 0 {
        0
    } else {
        let x = 4 * capacity;
        1 << (usize::BITS - 1 - x.leading_zeros())
    }
}

/// The entry naming position `pos` for a key hashed to `h`.
#[inline(always)]
pub(crate) const fn entry(h: u64, pos: usize) -> u64 {
    (h & !0xffff_ffff) | (pos as u64 + 1)
}

/// The position an entry names (`usize::MAX` for an empty entry).
#[inline(always)]
pub(crate) const fn position(e: u64) -> usize {
    ((e & 0xffff_ffff) as usize).wrapping_sub(1)
}

/// Home entry of hash `h` in an index of `len` (a power of two) entries.
#[inline(always)]
pub(crate) const fn home(h: u64, len: usize) -> usize {
    h as usize & (len - 1)
}

/// Find `key`: probe at most `max_probe + 1` entries from its home, reading entries with
/// `index_at` and site addresses with `key_at` (which must tolerate any position: it returns
/// `None` out of range). Returns the position whose site address is `key`.
///
/// Generic over the loads so that the lock-free reader (atomic loads of a buffer a writer may be
/// rewriting) and a counted reader (plain slices) share one probe sequence.
#[inline(always)]
pub(crate) fn probe(
    key: u64,
    index_len: usize,
    max_probe: usize,
    index_at: impl Fn(usize) -> u64,
    key_at: impl Fn(usize) -> Option<u64>,
) -> Option<usize> {
    if index_len == 0 {
        return None;
    }
    let h = hash(key);
    let mask = index_len - 1;
    let tag = h >> 32;
    let mut at = home(h, index_len);
    // `min(mask)`: a torn `max_probe` cannot make the loop longer than the index.
    for _ in 0..=max_probe.min(mask) {
        let e = index_at(at);
        if e == EMPTY {
            return None;
        }
        if e >> 32 == tag {
            let pos = position(e);
            if key_at(pos) == Some(key) {
                return Some(pos);
            }
        }
        at = (at + 1) & mask;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_a_power_of_two_more_than_twice_the_capacity() {
        assert_eq!(index_len(0), 0);
        for cap in [1usize, 2, 3, 5, 10, 256, 1000, 100_000] {
            let n = index_len(cap);
            assert!(n.is_power_of_two(), "{cap}");
            assert!(n > 2 * cap && n <= 4 * cap, "{cap}: {n}");
        }
    }

    #[test]
    fn entries_name_positions_and_are_never_empty() {
        let h = hash(0x40_1000);
        for pos in [0usize, 1, 1 << 29] {
            let e = entry(h, pos);
            assert_ne!(e, EMPTY);
            assert_eq!(position(e), pos);
            assert_eq!(e >> 32, h >> 32);
        }
        assert_eq!(position(EMPTY), usize::MAX);
    }

    #[test]
    fn probing_stops_at_max_probe_even_in_a_full_index() {
        // every entry holds a foreign tag: without the bound this would go round forever
        let key = 0x1234;
        let foreign = entry(!hash(key), 0);
        let probes = core::cell::Cell::new(0);
        let r = probe(
            key,
            16,
            3,
            |_| {
                probes.set(probes.get() + 1);
                foreign
            },
            |_| None,
        );
        assert_eq!((r, probes.get()), (None, 4));
    }
}

//! The lock-free lookup (loads only, validated by generation) under real threads: readers
//! hammer `lookup` and `trap::decide` while a writer churns sites whose inserts and removals
//! shift every other entry's position in both buffers and rewrite the hash index.
//!
//! What a reader asserts on every lookup:
//! - an *anchor* site (pushed and committed before the threads start, never touched again) is
//!   always found, whole: its own `new`, `resume`, patch, state and depth. A lookup that read a
//!   buffer while the writer moved entries and did not notice would miss it (its index entry or
//!   key moved under the probe) or return a neighbour's record;
//! - a *churned* site is either absent or one of the states the writer's cycle goes through,
//!   with every field derived from (site, patch id);
//! - an address that was never pushed is never found.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use lp_core::table::{EntryState, Redirect, RedirectTable, Slot};
use lp_core::trap::{decide, TrapDecision};

const ANCHORS: u64 = 200;
const CHURNED: u64 = 16;
const ROUNDS: u32 = 150;
const READERS: usize = 2;

/// Churned sites sort below every anchor, so inserting or removing one shifts all anchors.
fn churned(i: u64) -> u64 {
    0x10_0000 + i * 0x40
}
fn anchor(i: u64) -> u64 {
    0x80_0000 + i * 0x40
}
fn resume_of(old: u64) -> u64 {
    old ^ 0x7700_0000_0000
}
fn new_of(old: u64, patch_id: u32) -> u64 {
    old.rotate_left(23) ^ u64::from(patch_id).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn check_anchor(old: u64, r: Option<Redirect>) {
    let r = r.unwrap_or_else(|| panic!("anchor {old:#x} not found"));
    assert_eq!(
        (r.old, r.new, r.resume, r.patch_id, r.state, r.depth, r.below),
        (
            old,
            new_of(old, 1),
            resume_of(old),
            1,
            EntryState::Active,
            1,
            None
        ),
        "anchor {old:#x} torn"
    );
}

fn check_churned(old: u64, r: Option<Redirect>) {
    let Some(r) = r else { return };
    let whole = r.old == old
        && r.resume == resume_of(old)
        && r.new == new_of(old, r.patch_id)
        && match (r.depth, r.below) {
            (1, None) => true,
            (2, Some(b)) => b.patch_id + 1 == r.patch_id && b.new == new_of(old, b.patch_id),
            _ => false,
        };
    assert!(whole, "churned {old:#x}: torn or impossible {r:?}");
}

fn writer(table: &RedirectTable<'_>, ops: &AtomicU64) {
    for round in 0..ROUNDS {
        let (a, b) = (2 * round + 1, 2 * round + 2);
        for i in 0..CHURNED {
            let old = churned(i);
            table.push(old, resume_of(old), new_of(old, a), a).unwrap();
            table.set_state(old, a, EntryState::Active).unwrap();
            table.push(old, resume_of(old), new_of(old, b), b).unwrap();
            table.set_state(old, b, EntryState::Active).unwrap();
        }
        for i in 0..CHURNED {
            let old = churned(i);
            table.set_state(old, b, EntryState::Reverting).unwrap();
            table.pop(old, b).unwrap();
            table.set_state(old, a, EntryState::Reverting).unwrap();
            table.pop(old, a).unwrap();
        }
        ops.fetch_add(8 * CHURNED, Ordering::Relaxed);
    }
}

fn reader(table: &RedirectTable<'_>, done: &AtomicBool, seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut lookups = 0u64;
    while !done.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = x % ANCHORS;
        let old = anchor(i);
        check_anchor(old, table.lookup(old));
        assert_eq!(
            decide(table, old),
            TrapDecision::Redirect(new_of(old, 1)),
            "trap at anchor {old:#x}"
        );
        let c = churned(x % CHURNED);
        check_churned(c, table.lookup(c));
        // between two sites, and past the end: never present
        assert_eq!(table.lookup(old + 8), None);
        assert_eq!(table.lookup(churned(CHURNED + i)), None);
        lookups += 5;
    }
    lookups
}

#[test]
fn lookups_see_whole_published_entries_while_a_writer_shifts_everything() {
    let cap = (ANCHORS + CHURNED) as usize;
    let (mut a, mut b) = (vec![Slot::EMPTY; cap], vec![Slot::EMPTY; cap]);
    let table = RedirectTable::new(&mut a, &mut b);
    for i in 0..ANCHORS {
        let old = anchor(i);
        table.push(old, resume_of(old), new_of(old, 1), 1).unwrap();
        table.set_state(old, 1, EntryState::Active).unwrap();
    }
    let (done, ops) = (AtomicBool::new(false), AtomicU64::new(0));
    let (table, done, ops) = (&table, &done, &ops);
    let lookups: Vec<u64> = thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| s.spawn(move || reader(table, done, 0xfeed_0000 + r as u64)))
            .collect();
        let w = s.spawn(move || writer(table, ops));
        let joined = w.join();
        done.store(true, Ordering::Relaxed);
        let counts = readers.into_iter().map(|r| r.join().unwrap()).collect();
        joined.unwrap();
        counts
    });
    assert_eq!(table.len(), ANCHORS as usize);
    assert_eq!(ops.load(Ordering::Relaxed), u64::from(ROUNDS) * 8 * CHURNED);
    for n in lookups {
        // the readers really ran alongside the writer
        assert!(n > 10_000, "only {n} lookups");
    }
}

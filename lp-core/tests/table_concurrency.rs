//! Readers hammer lookups while writers push / set_state / pop on the same table from several
//! threads. Every lookup must return an entry that existed as a whole at some point (no torn
//! slot), each reader's successive observations of a site must never go back in that site's
//! history (snapshots are published in order), and every full snapshot must be sorted.
//!
//! How tearing would show: every field of every version is derived from (site, patch id), so a
//! slot mixing two writes (a `new` from one version with the `patch_id` of another, a `resume`
//! from a neighbouring slot moved by an insert, a depth that does not fit the ids) fails the
//! `well_formed` check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use lp_core::table::{EntryState, Redirect, RedirectTable, Slot};

const WRITERS: u64 = 2;
const SITES_PER_WRITER: u64 = 24;
const CYCLES: u32 = 300;
const READERS: usize = 2;

fn site(writer: u64, i: u64) -> u64 {
    // interleave the writers' sites so inserts/removes of one shift the other's slots
    0x40_0000 + (i * WRITERS + writer) * 0x40
}
fn resume_of(old: u64) -> u64 {
    old ^ 0xdead_0000_0000
}
fn new_of(old: u64, patch_id: u32) -> u64 {
    old.rotate_left(17) ^ u64::from(patch_id).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// One cycle on one site, with patch ids a = 2c+1, b = 2c+2. Returns the ranks (positions in the
/// site's history) this observation can stand for; empty = impossible entry.
fn ranks(r: &Redirect) -> Vec<u64> {
    let cycle = u64::from((r.patch_id - 1) / 2);
    let is_a = r.patch_id % 2 == 1;
    let phases: &[u64] = match (is_a, r.depth, r.state, r.below.is_some()) {
        (true, 1, EntryState::Pending, false) => &[0],
        (true, 1, EntryState::Active, false) => &[1, 5],
        (false, 2, EntryState::Pending, true) => &[2],
        (false, 2, EntryState::Active, true) => &[3],
        (false, 2, EntryState::Reverting, true) => &[4],
        (true, 1, EntryState::Reverting, false) => &[6],
        _ => &[],
    };
    phases.iter().map(|p| cycle * 8 + p).collect()
}

fn well_formed(r: &Redirect) -> Result<(), String> {
    let ok = r.patch_id >= 1
        && r.new == new_of(r.old, r.patch_id)
        && r.resume == resume_of(r.old)
        && match r.below {
            None => r.depth == 1,
            Some(b) => {
                r.depth == 2 && b.patch_id + 1 == r.patch_id && b.new == new_of(r.old, b.patch_id)
            }
        }
        && !ranks(r).is_empty();
    if ok {
        Ok(())
    } else {
        Err(format!("torn or impossible entry: {r:?}"))
    }
}

fn writer(table: &RedirectTable<'_>, w: u64) {
    for c in 0..CYCLES {
        let (a, b) = (2 * c + 1, 2 * c + 2);
        for i in 0..SITES_PER_WRITER {
            let old = site(w, i);
            table.push(old, resume_of(old), new_of(old, a), a).unwrap();
            table.set_state(old, a, EntryState::Active).unwrap();
            table.push(old, resume_of(old), new_of(old, b), b).unwrap();
            table.set_state(old, b, EntryState::Active).unwrap();
            table.set_state(old, b, EntryState::Reverting).unwrap();
            table.pop(old, b).unwrap();
            table.set_state(old, a, EntryState::Reverting).unwrap();
            table.pop(old, a).unwrap();
        }
    }
}

fn reader(table: &RedirectTable<'_>, done: &AtomicBool, seed: u64) -> (u64, u64) {
    let sites: Vec<u64> = (0..WRITERS)
        .flat_map(|w| (0..SITES_PER_WRITER).map(move |i| site(w, i)))
        .collect();
    // lowest rank each site may still show; sites only move forward in their history
    let mut floor = vec![0u64; sites.len()];
    let (mut lookups, mut hits) = (0u64, 0u64);
    let mut x = seed | 1;
    while !done.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = (x % sites.len() as u64) as usize;
        lookups += 1;
        if let Some(r) = table.lookup(sites[k]) {
            hits += 1;
            assert_eq!(r.old, sites[k]);
            well_formed(&r).unwrap();
            let rank = ranks(&r).into_iter().find(|&rk| rk >= floor[k]);
            let rank =
                rank.unwrap_or_else(|| panic!("{r:?} goes back in history (floor {})", floor[k]));
            floor[k] = rank;
        }
        if lookups % 64 == 0 {
            table.read(|snap| {
                let olds: Vec<u64> = snap.iter().map(|s| s.old()).collect();
                assert!(olds.windows(2).all(|w| w[0] < w[1]), "unsorted snapshot");
                for old in olds {
                    well_formed(&snap.lookup(old).unwrap()).unwrap();
                }
            });
        }
    }
    (lookups, hits)
}

#[test]
fn readers_see_only_whole_entries_in_order_while_writers_run() {
    let cap = (WRITERS * SITES_PER_WRITER) as usize;
    let (mut a, mut b) = (vec![Slot::EMPTY; cap], vec![Slot::EMPTY; cap]);
    let table = RedirectTable::new(&mut a, &mut b);
    let done = AtomicBool::new(false);
    let (table, done) = (&table, &done);
    let observed = thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| s.spawn(move || reader(table, done, 0x1234_5678 + r as u64)))
            .collect();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| s.spawn(move || writer(table, w)))
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(
        table.is_empty(),
        "every cycle ends with both versions popped"
    );
    for (lookups, hits) in observed {
        // the test must actually have raced: readers found entries mid-cycle
        assert!(hits > 100, "only {hits} hits in {lookups} lookups");
    }
}

/// A reader that panics inside `read` must not leave its buffer marked busy: writers after it
/// would wait forever.
#[test]
fn a_panicking_reader_does_not_block_writers() {
    let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
    let table = RedirectTable::new(&mut a, &mut b);
    table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        table.read(|_| panic!("reader bug"));
    }));
    assert!(caught.is_err());
    // both buffers get rewritten by each edit; with a leaked count this would spin forever
    table.set_state(0x1000, 1, EntryState::Active).unwrap();
    table.push(0x2000, 0x9100, 0x2100, 1).unwrap();
    assert_eq!(table.len(), 2);
}

//! Trap-path lookup in the redirect table with 10, 1,000 and 100,000 sites.
//!
//! Goal: under 50 ns and flat across sizes. Four access patterns per size:
//! - `hit_same`: the same site every time (the hot case: one function trapping repeatedly);
//! - `hit_spread`: cycling through 4,096 present sites in random order (cold cache lines);
//! - `hit_all`: every site of the table once, in random order (with 100,000 sites nothing
//!   stays in cache: the worst case);
//! - `miss`: 4,096 addresses that are not sites (a debugger's int3), in random order;
//!
//! and `decide_spread`, the whole trap decision (`lp_core::trap::decide`) for spread hits.
//!
//! Before criterion's figures (means, which a machine shared with builds inflates), it prints a
//! table of the **fastest** of 40 rounds of 40,960 lookups per case: what the code costs when it
//! is not preempted, stable even on a loaded machine.
//!
//! Run: `cargo bench -p lp-benches --bench table_lookup`

use std::hint::black_box;

use std::time::Instant;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use lp_core::table::{EntryState, RedirectTable, Slot};
use lp_core::trap::decide;

const SIZES: [usize; 3] = [10, 1_000, 100_000];
const PROBES: usize = 4096;

fn site(i: usize) -> u64 {
    // functions 64 bytes apart in a text segment
    0x40_0000 + (i as u64) * 0x40
}

/// xorshift: a fixed pseudo-random sequence, the same on every run.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `PROBES` sites drawn at random (with repeats) among `n`.
fn shuffled_sites(n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..PROBES)
        .map(|_| site((xorshift(&mut x) % n as u64) as usize))
        .collect()
}

/// `PROBES` addresses that are not sites: 8 bytes past random sites.
fn missing_sites(n: usize) -> Vec<u64> {
    shuffled_sites(n).into_iter().map(|s| s + 8).collect()
}

/// All `n` sites, each once, in a random order (Fisher-Yates).
fn all_sites_shuffled(n: usize) -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v: Vec<u64> = (0..n).map(site).collect();
    for i in (1..n).rev() {
        let j = (xorshift(&mut x) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn fill(table: &RedirectTable<'_>, n: usize) {
    for i in 0..n {
        let old = site(i);
        table
            .push(old, old + 0x1000_0000, old + 0x2000_0000, 1)
            .unwrap();
        table.set_state(old, 1, EntryState::Active).unwrap();
    }
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_lookup");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        let (mut a, mut b) = (vec![Slot::EMPTY; n], vec![Slot::EMPTY; n]);
        let table = RedirectTable::new(&mut a, &mut b);
        fill(&table, n);
        assert_eq!(table.len(), n);
        let probes = shuffled_sites(n);

        group.bench_with_input(BenchmarkId::new("hit_same", n), &n, |bch, &n| {
            let old = site(n / 2);
            bch.iter(|| table.lookup(black_box(old)).unwrap().new)
        });
        group.bench_with_input(BenchmarkId::new("hit_spread", n), &n, |bch, _| {
            let mut i = 0;
            bch.iter(|| {
                i = (i + 1) % PROBES;
                table.lookup(black_box(probes[i])).unwrap().new
            })
        });
        let all = all_sites_shuffled(n);
        group.bench_with_input(BenchmarkId::new("hit_all", n), &n, |bch, &n| {
            let mut i = 0;
            bch.iter(|| {
                i = (i + 1) % n;
                table.lookup(black_box(all[i])).unwrap().new
            })
        });
        let misses = missing_sites(n);
        group.bench_with_input(BenchmarkId::new("miss", n), &n, |bch, _| {
            let mut i = 0;
            bch.iter(|| {
                i = (i + 1) % PROBES;
                table.lookup(black_box(misses[i])).is_none()
            })
        });
        group.bench_with_input(BenchmarkId::new("decide_spread", n), &n, |bch, _| {
            let mut i = 0;
            bch.iter(|| {
                i = (i + 1) % PROBES;
                decide(&table, black_box(probes[i]))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = lookups
}
/// ns per lookup: the fastest of 40 rounds, each at least 40,960 lookups (passes over `probes`).
fn fastest_round(probes: &[u64], mut lookup: impl FnMut(u64) -> u64) -> f64 {
    let passes = (10 * PROBES).div_ceil(probes.len());
    let mut best = f64::MAX;
    for _ in 0..40 {
        let start = Instant::now();
        let mut sum = 0u64;
        for _ in 0..passes {
            for &p in probes {
                sum = sum.wrapping_add(lookup(black_box(p)));
            }
        }
        black_box(sum);
        best = best.min(start.elapsed().as_nanos() as f64 / (passes * probes.len()) as f64);
    }
    best
}

fn print_fastest_rounds() {
    println!("table_lookup, fastest of 40 rounds (ns per lookup):");
    println!(
        "{:>8} {:>9} {:>11} {:>8} {:>7} {:>14}",
        "sites", "hit_same", "hit_spread", "hit_all", "miss", "decide_spread"
    );
    for n in SIZES {
        let (mut a, mut b) = (vec![Slot::EMPTY; n], vec![Slot::EMPTY; n]);
        let table = RedirectTable::new(&mut a, &mut b);
        fill(&table, n);
        let spread = shuffled_sites(n);
        let all = all_sites_shuffled(n);
        let same = vec![site(n / 2); PROBES];
        let miss = missing_sites(n);
        let hit = |old| table.lookup(old).map_or(0, |r| r.new);
        let decision = |old| decide(&table, old).target().unwrap_or(0);
        println!(
            "{:>8} {:>9.1} {:>11.1} {:>8.1} {:>7.1} {:>14.1}",
            n,
            fastest_round(&same, hit),
            fastest_round(&spread, hit),
            fastest_round(&all, hit),
            fastest_round(&miss, hit),
            fastest_round(&spread, decision)
        );
    }
}

fn main() {
    print_fastest_rounds();
    benches();
    Criterion::default().configure_from_args().final_summary();
}

//! Trap-path lookup in the redirect table with 10, 1,000 and 100,000 sites.
//!
//! Goal: under 50 ns and flat across sizes. Three access patterns per size:
//! - `hit_same`: the same site every time (the hot case: one function trapping repeatedly);
//! - `hit_spread`: cycling through 4,096 present sites in random order (cold cache lines);
//! - `miss`: an address that is not a site (a debugger's int3);
//!
//! and `decide_spread`, the whole trap decision (`lp_core::trap::decide`) for spread hits.
//!
//! Run: `cargo bench -p lp-benches --bench table_lookup`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lp_core::table::{EntryState, RedirectTable, Slot};
use lp_core::trap::decide;

const SIZES: [usize; 3] = [10, 1_000, 100_000];
const PROBES: usize = 4096;

fn site(i: usize) -> u64 {
    // functions 64 bytes apart in a text segment
    0x40_0000 + (i as u64) * 0x40
}

/// xorshift: a fixed pseudo-random order, the same on every run.
fn shuffled_sites(n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..PROBES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            site((x % n as u64) as usize)
        })
        .collect()
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
        group.bench_with_input(BenchmarkId::new("miss", n), &n, |bch, &n| {
            let old = site(n / 2) + 1;
            bch.iter(|| table.lookup(black_box(old)).is_none())
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
criterion_main!(benches);

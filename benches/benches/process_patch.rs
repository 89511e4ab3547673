//! Process patching benchmark (harness = false; prints figures).
//!
//! (a) the longest stall a running thread sees while a 10-function patch is applied to an
//!     8-thread process, per mode (the target's threads time with clock_gettime; each
//!     iteration of their loop calls the 10 functions and sleeps 50 µs):
//!     - the longest single call of a patched function *that overlapped the apply* (or the
//!       revert): the time one call took, trap included (a call meeting a temporary int3 in
//!       nonstop mode; a call interrupted by the stop). The threads log every call over 2 µs
//!       with its start; the bench reads CLOCK_MONOTONIC right before and after the library
//!       call and asks for the longest logged call that overlapped that interval;
//!       A stop that lands in a thread's sleep (stop mode; a nonstop revert before session 12,
//!       which stopped each thread once; since, only a thread it cannot see outside the patch
//!       memory from /proc) is not in any call: see the next figure;
//!     - the longest loop iteration that overlapped the apply (the 50 µs sleep, the calls,
//!       any stop or scheduling delay; iterations over 100 µs are logged likewise);
//!     - for both, a control in the same round: the same figures with no patching over an
//!       interval as long as that round's apply (the machine's own noise grows with the length
//!       of the interval looked at);
//!     - the longest single call in the whole measurement window (5 ms before the call, the
//!       call, 5 ms after: the figure of earlier sessions), with its baseline over a 3 ms sleep;
//!     - the largest gap between two iterations of the loop in that window (in nonstop mode an
//!       iteration can meet all ten int3s, one trap each);
//! (b) calls per CPU-second of a patched function / of the original (the same code; its direct
//!     caller retargeted at it); thread CPU time, so that other load on the machine does not
//!     count;
//! (c) wall time of apply and of revert (library calls, module cache warm), per mode.
//!
//! Run: `cargo bench -p lp-benches --bench process_patch` (root; gcc needed).

use lp_benches::{build_fixture, Fixture};
use lp_userspace::apply::{apply, ApplyOptions, Mode};
use lp_userspace::patchfile::Patch;
use lp_userspace::revert::revert;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const FUNCS: &str = r#"
#define F(n) int __attribute__((noipa)) f##n(int x) { int r = x + n; if (x > 1000000) r = x * 3; return r; }
F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9)
"#;

const TARGET: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>
#include "funcs.h"
/* Per thread, the last LOGN spans (start and length, ns) over a floor, read by `report`:
   every call over 2 us, and every loop iteration over 100 us (the sleep, the calls, any stop). */
#define LOGN 4096
struct ring { struct { long start, dur; } span[64][LOGN]; volatile long n[64]; long floor; };
static struct ring calls = {.floor = 2000}, iters = {.floor = 100000};
static void note(struct ring *r, long id, long start, long dur) {
    if (dur <= r->floor) return;
    long k = r->n[id] % LOGN;
    r->span[id][k].start = start; r->span[id][k].dur = dur;
    __atomic_store_n(&r->n[id], r->n[id] + 1, __ATOMIC_RELEASE);
}
static const char *interval_file;
static volatile int epoch;          /* bumped by SIGUSR1: start a new measurement window */
static volatile sig_atomic_t report; /* set by SIGUSR2: print the window's largest gap */
static long max_gap[64], max_call[64];
static int seen[64];
static long clock_ns(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
static long now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
/* one call, timed: the longest of the iteration in `call` */
#define TIMED(n) do { long a_ = now_ns(); acc += f##n(1); long d_ = now_ns() - a_; if (d_ > call) call = d_; note(&calls, id, a_, d_); } while (0)
static void *worker(void *arg) {
    long id = (long)arg; long last = now_ns(); unsigned acc = 0;
    struct timespec pause = {0, 50000};
    prctl(PR_SET_TIMERSLACK, 1);
    for (;;) {
        long call = 0;
        TIMED(0); TIMED(1); TIMED(2); TIMED(3); TIMED(4); TIMED(5); TIMED(6); TIMED(7); TIMED(8); TIMED(9);
        if (acc == 7) puts("");
        nanosleep(&pause, NULL);
        long t = now_ns(), gap = t - last;
        note(&iters, id, last, gap);
        last = t;
        int e = epoch;
        if (seen[id] != e) { seen[id] = e; max_gap[id] = 0; max_call[id] = 0; }
        if (gap > max_gap[id]) max_gap[id] = gap;
        if (call > max_call[id]) max_call[id] = call;
    }
    return NULL;
}
/* the longest span of `r` that overlapped [a, b] (ns; the ring's floor when none did) */
static long longest_within(const struct ring *r, int threads, long a, long b) {
    long c = r->floor;
    for (int i = 0; i < threads; i++) {
        long n = __atomic_load_n(&r->n[i], __ATOMIC_ACQUIRE);
        for (long k = n > LOGN ? n - LOGN : 0; k < n; k++) {
            long st = r->span[i][k % LOGN].start, d = r->span[i][k % LOGN].dur;
            if (st < b && st + d > a && d > c) c = d;
        }
    }
    return c;
}
static void on_usr1(int s) { (void)s; epoch++; }
static void on_usr2(int s) { (void)s; report = 1; }
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && !strcmp(argv[1], "throughput")) {
        /* calls of f0 per CPU-second of this thread */
        printf("ready %d\n", getpid());
        for (;;) {
            long start = clock_ns(CLOCK_THREAD_CPUTIME_ID), n = 0; unsigned acc = 0;
            while (clock_ns(CLOCK_THREAD_CPUTIME_ID) - start < 200000000L) { for (int i = 0; i < 1000; i++) acc += f0(i); n += 1000; }
            printf("calls %ld %u\n", n * 5, acc & 1);
        }
    }
    int threads = argc > 1 ? atoi(argv[1]) : 8;
    interval_file = argc > 2 ? argv[2] : NULL;
    signal(SIGUSR1, on_usr1); signal(SIGUSR2, on_usr2);
    pthread_t t;
    for (long i = 0; i < threads; i++) pthread_create(&t, NULL, worker, (void *)i);
    printf("ready %d\n", getpid());
    for (;;) {
        usleep(1000);
        if (report) {
            report = 0; long m = 0, c = 0;
            for (int i = 0; i < threads; i++) if (seen[i] == epoch && max_gap[i] > m) m = max_gap[i];
            for (int i = 0; i < threads; i++) if (seen[i] == epoch && max_call[i] > c) c = max_call[i];
            long a = 0, b = 0, w = 0, iw = 0;
            FILE *f = interval_file ? fopen(interval_file, "r") : NULL;
            if (f) { if (fscanf(f, "%ld %ld", &a, &b) == 2) { w = longest_within(&calls, threads, a, b); iw = longest_within(&iters, threads, a, b); } fclose(f); }
            printf("gap %ld call %ld within %ld iteration %ld\n", m, c, w, iw);
        }
    }
}
"#;

/// A running target, and the file through which it is told the interval to look at.
struct Target(Fixture, PathBuf);

/// CLOCK_MONOTONIC in nanoseconds: the clock the target's threads time their calls with.
fn monotonic_ns() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}

impl Target {
    fn start(exe: &Path, args: &[&str]) -> Target {
        let interval = exe.with_file_name("interval");
        let mut all: Vec<&str> = args.to_vec();
        let path = interval.display().to_string();
        all.push(&path);
        Target(Fixture::start(exe, &all).0, interval)
    }
    fn pid(&self) -> i32 {
        self.0.pid()
    }
    fn line(&mut self) -> String {
        self.0.line()
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} failed");
    }
    /// The largest loop gap and the longest single call (µs) seen by any thread in a window
    /// around `f`, and the longest call that overlapped `f` itself.
    fn stalls_during(&mut self, f: impl FnOnce()) -> Stalls {
        self.signal("-USR1");
        std::thread::sleep(Duration::from_millis(5));
        let a = monotonic_ns();
        f();
        let b = monotonic_ns();
        std::fs::write(&self.1, format!("{a} {b}\n")).expect("write the interval");
        std::thread::sleep(Duration::from_millis(5));
        self.signal("-USR2");
        let l = self.line();
        let us = |key: &str| -> f64 {
            let mut words = l.split_whitespace();
            words.find(|w| *w == key).expect("a figure in the report");
            words.next().unwrap().parse::<f64>().unwrap() / 1000.0
        };
        Stalls {
            gap: us("gap"),
            call: us("call"),
            within: us("within"),
            iteration: us("iteration"),
        }
    }
}

/// What the target's threads saw in one window (µs).
#[derive(Clone, Copy)]
struct Stalls {
    /// Largest gap between two iterations of a thread's loop.
    gap: f64,
    /// Longest single call of a patched function.
    call: f64,
    /// Longest single call that overlapped the measured operation itself.
    within: f64,
    /// Longest loop iteration (from one iteration's end to the next's) that overlapped the
    /// measured operation: what a thread stopped in its sleep sees.
    iteration: f64,
}

fn column(v: &[Stalls], pick: fn(&Stalls) -> f64) -> Vec<f64> {
    v.iter().map(pick).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(0.0, f64::max)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir: PathBuf = build_fixture("bench", FUNCS, TARGET);
    let patch: Patch =
        lp_userspace::pack::pack(&dir.join("target"), &dir.join("new.o"), &[]).unwrap();
    assert_eq!(patch.functions.len(), 10);
    // LP_BENCH_ROUNDS and LP_BENCH_MODES (e.g. "nonstop") narrow a run to what is being tuned.
    let rounds: usize = std::env::var("LP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let modes: Vec<Mode> = match std::env::var("LP_BENCH_MODES").as_deref() {
        Ok("stop") => vec![Mode::Stop],
        Ok("nonstop") => vec![Mode::Nonstop],
        _ => vec![Mode::Stop, Mode::Nonstop],
    };
    println!("process_patch: 10-function patch, 8-thread target, {rounds} rounds per mode");

    // (a) + (c)
    let mut t = Target::start(&dir.join("target"), &["8"]);
    let baseline: Vec<Stalls> = (0..rounds)
        .map(|_| t.stalls_during(|| std::thread::sleep(Duration::from_millis(3))))
        .collect();
    let (base_gap, base_call) = (column(&baseline, |s| s.gap), column(&baseline, |s| s.call));
    println!(
        "  baseline (no patching, 3 ms between the windows' 5 ms margins): longest single call median {:.1} us, max {:.1} us; largest loop gap median {:.0} us, max {:.0} us",
        median(base_call.clone()),
        max(&base_call),
        median(base_gap.clone()),
        max(&base_gap)
    );
    for &mode in &modes {
        let opts = ApplyOptions {
            mode,
            timeout: Duration::from_secs(10),
        };
        // Warm the module cache (first apply parses libc and the target).
        apply(t.pid(), &patch, opts).unwrap();
        revert(t.pid(), None, mode, opts.timeout).unwrap();
        let (mut gaps, mut rgaps, mut apply_ms, mut revert_ms, mut stalls, mut traps) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut quiet, mut rquiet) = (vec![], vec![]);
        for _ in 0..rounds {
            let pid = t.pid();
            gaps.push(t.stalls_during(|| {
                let s = Instant::now();
                let a = apply(pid, &patch, opts).unwrap();
                apply_ms.push(s.elapsed().as_secs_f64() * 1e3);
                stalls.push(a.stats.stall_us as f64);
                traps.push(a.stats.traps as f64);
            }));
            rgaps.push(t.stalls_during(|| {
                let s = Instant::now();
                revert(pid, None, mode, opts.timeout).unwrap();
                revert_ms.push(s.elapsed().as_secs_f64() * 1e3);
            }));
            // The control, in the same round: the machine's own noise over intervals as long
            // as this apply and this revert, with no patching.
            for (ms, into) in [
                (apply_ms.last(), &mut quiet),
                (revert_ms.last(), &mut rquiet),
            ] {
                let d = Duration::from_secs_f64(ms.copied().unwrap_or(0.0) / 1e3);
                into.push(t.stalls_during(|| std::thread::sleep(d)));
            }
        }
        println!("  mode {mode}:");
        let floor = |v: f64| {
            if v <= 2.0 {
                "<= 2".to_string()
            } else {
                format!("{v:.1}")
            }
        };
        let within = |v: &[Stalls]| median(column(v, |s| s.within));
        println!(
            "    (a) longest single call overlapping the apply: median {} us, max {:.1} us (no patching, same lengths: median {} us); overlapping the revert: median {} us, max {:.1} us (no patching: {} us)",
            floor(within(&gaps)),
            max(&column(&gaps, |s| s.within)),
            floor(within(&quiet)),
            floor(within(&rgaps)),
            max(&column(&rgaps, |s| s.within)),
            floor(within(&rquiet))
        );
        let iteration = |v: &[Stalls]| median(column(v, |s| s.iteration));
        println!(
            "    (a) longest loop iteration overlapping the apply (its 50 us sleep included, stops anywhere in the loop too): median {:.0} us (no patching: {:.0} us); the revert: median {:.0} us (no patching: {:.0} us)",
            iteration(&gaps),
            iteration(&quiet),
            iteration(&rgaps),
            iteration(&rquiet)
        );
        let (calls, rcalls) = (column(&gaps, |s| s.call), column(&rgaps, |s| s.call));
        println!(
            "    (a) longest single call in the window around the apply (5 ms before, 5 after): median {:.1} us, max {:.1} us; around the revert: median {:.1} us, max {:.1} us",
            median(calls.clone()),
            max(&calls),
            median(rcalls.clone()),
            max(&rcalls)
        );
        let (gaps, rgaps) = (column(&gaps, |s| s.gap), column(&rgaps, |s| s.gap));
        println!(
            "    (a) largest loop gap during apply: median {:.0} us, max {:.0} us; during revert: median {:.0} us (tool-measured {}: median {:.0} us)",
            median(gaps.clone()),
            max(&gaps),
            median(rgaps),
            if mode == Mode::Stop { "stop window" } else { "pause" },
            median(stalls)
        );
        println!(
            "    (c) apply wall time median {:.2} ms, revert median {:.2} ms",
            median(apply_ms),
            median(revert_ms)
        );
        if mode == Mode::Nonstop {
            // Calls that reached a temporary int3 and were sent on by the in-target handler.
            println!(
                "    traps handled per apply: median {:.0}, max {:.0}",
                median(traps.clone()),
                max(&traps)
            );
        }
    }
    drop(t);
    if modes.len() < 2 {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }

    // (b)
    let mut t = Target::start(&dir.join("target"), &["throughput"]);
    let sample = |t: &mut Target| -> f64 {
        (0..5)
            .map(|_| {
                let l = t.line();
                l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap()
            })
            .fold(0.0, f64::max)
    };
    let _ = sample(&mut t);
    let original = sample(&mut t);
    apply(t.pid(), &patch, ApplyOptions::default()).unwrap();
    let _ = t.line();
    let patched = sample(&mut t);
    println!(
        "  (b) f0 calls per CPU-second: original {:.3e}, patched {:.3e}, ratio {:.3}",
        original,
        patched,
        patched / original
    );
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

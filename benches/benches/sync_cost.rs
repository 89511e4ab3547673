//! What the int3 protocol's building blocks cost on this machine, without livepatch: the floor
//! under nonstop mode's stall.
//!
//! - **membarrier sync**: `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` made on one
//!   CPU while a thread of the same process spins on another: how long the call takes (it
//!   waits for the other CPU's IPI to be handled), and the longest gap the spinning thread sees
//!   in its clock readings during the call — the time its CPU ran nothing of its own. Beside
//!   it, the same spinner's longest gap over intervals of the same length with no call (the
//!   machine's own noise).
//! - **trap**: a thread executing an `int3` that a SIGTRAP handler moves on (what a call that
//!   meets a temporary `int3` pays, with nonstop mode's handler doing a table lookup more).
//!
//! Nonstop mode makes three syncs per window (after the `int3`s, after the tails, after the
//! first bytes); a call that traps during a window can meet all three on its CPU.
//!
//! Run: `cargo bench -p lp-benches --bench sync_cost` (2 CPUs or more).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: i32 = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: i32 = 1 << 6;
const ROUNDS: usize = 400;
/// Gaps the spinner records (start, length), in ns.
const LOG: usize = 1 << 16;

fn now_ns() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}

fn pin_to(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it;
    // sched_setaffinity reads it (0: the calling thread).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

fn membarrier(cmd: i32) -> i64 {
    // SAFETY: membarrier takes two integer arguments and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) }
}

/// The spinner's gaps over 1 µs: start and length, in ns.
struct Gaps {
    start: Vec<AtomicI64>,
    len: Vec<AtomicI64>,
    n: AtomicUsize,
}

impl Gaps {
    /// The longest gap that overlapped [a, b] (0 when none did).
    fn longest_within(&self, a: i64, b: i64) -> i64 {
        let n = self.n.load(Ordering::Acquire).min(LOG);
        (0..n)
            .filter_map(|i| {
                let (s, l) = (
                    self.start[i].load(Ordering::Relaxed),
                    self.len[i].load(Ordering::Relaxed),
                );
                (s < b && s + l > a).then_some(l)
            })
            .max()
            .unwrap_or(0)
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p) as usize]
}

fn summary(name: &str, v: Vec<f64>) {
    println!(
        "  {name}: median {:.1} us, p90 {:.1} us, max {:.1} us",
        percentile(v.clone(), 0.5),
        percentile(v.clone(), 0.9),
        percentile(v, 1.0)
    );
}

fn syncs() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        println!("  membarrier sync: needs 2 CPUs");
        return;
    }
    if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) != 0 {
        println!("  membarrier sync: not available here");
        return;
    }
    let gaps = Arc::new(Gaps {
        start: (0..LOG).map(|_| AtomicI64::new(0)).collect(),
        len: (0..LOG).map(|_| AtomicI64::new(0)).collect(),
        n: AtomicUsize::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = {
        let (gaps, stop) = (gaps.clone(), stop.clone());
        std::thread::spawn(move || {
            pin_to(1);
            let mut last = now_ns();
            while !stop.load(Ordering::Relaxed) {
                let t = now_ns();
                if t - last > 1000 {
                    let i = gaps.n.load(Ordering::Relaxed);
                    if i < LOG {
                        gaps.start[i].store(last, Ordering::Relaxed);
                        gaps.len[i].store(t - last, Ordering::Relaxed);
                        gaps.n.store(i + 1, Ordering::Release);
                    }
                }
                last = t;
            }
        })
    };
    pin_to(0);
    std::thread::sleep(Duration::from_millis(20));
    let (mut call, mut gap, mut quiet) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        std::thread::sleep(Duration::from_micros(500));
        let a = now_ns();
        membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE);
        let b = now_ns();
        // The control: the spinner over an interval as long, with no call.
        std::thread::sleep(Duration::from_micros(500));
        let c = now_ns();
        while now_ns() < c + (b - a) {}
        let d = now_ns();
        call.push((b - a) as f64 / 1e3);
        gap.push(gaps.longest_within(a, b) as f64 / 1e3);
        quiet.push(gaps.longest_within(c, d) as f64 / 1e3);
    }
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
    println!("membarrier(PRIVATE_EXPEDITED_SYNC_CORE), caller on CPU 0, a spinning thread on CPU 1, {ROUNDS} calls:");
    summary("the call", call);
    summary(
        "longest gap the spinning thread saw during the call (its CPU ran nothing of its own)",
        gap,
    );
    summary(
        "the same over intervals as long with no call (gaps under 1 us count as 0)",
        quiet,
    );
}

static TRAPS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_trap(_sig: i32, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The kernel reports the int3 with rip after it: nothing to move.
    TRAPS.fetch_add(1, Ordering::Relaxed);
}

fn traps() {
    // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO; the handler only
    // increments an atomic (async-signal-safe).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_trap as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut());
    }
    let mut each = vec![];
    for _ in 0..ROUNDS {
        let a = now_ns();
        // SAFETY: int3 raises SIGTRAP, whose handler above returns to the next instruction.
        unsafe { std::arch::asm!("int3") };
        each.push((now_ns() - a) as f64 / 1e3);
    }
    assert_eq!(TRAPS.load(Ordering::Relaxed), ROUNDS);
    println!("int3 taken by a SIGTRAP handler in the process, {ROUNDS} traps:");
    summary("each", each);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    syncs();
    traps();
}

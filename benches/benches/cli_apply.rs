//! Fresh-process CLI benchmark (harness = false; prints figures).
//!
//! What an operator sees: the wall time of `livepatch apply PID PATCH` and `livepatch revert
//! PID`, each a new process (no module cache, nothing parsed yet), stop mode, on the target of
//! `process_patch.rs` (8 threads calling the 10 patched functions and sleeping 50 µs per loop
//! iteration) with its 10-function patch. Timed from spawn to exit. Each round runs, in a
//! rotating order: the statically linked binary plain and with `--boost` (the tool at nice
//! -20), and the default (dynamically linked) build plain. Also shown: the wall time of
//! `livepatch --version` of both builds (exec, loading and exit of the binary: the floor), and
//! the `total` and `stall` the tool itself reports.
//!
//! Run: `cargo bench -p lp-benches --bench cli_apply` (root; gcc needed). It builds both
//! `livepatch` binaries first — `cargo build --release -p lp-userspace` and the static one
//! (`--profile cli --target x86_64-unknown-linux-gnu` with `-C target-feature=+crt-static`, as
//! the README says to install it: the `cli` profile adds fat LTO to release; a no-op when up
//! to date) — or uses `LIVEPATCH_BIN` (static) and `LIVEPATCH_DYNAMIC_BIN`.
//! `CLI_BENCH_RT=1` runs each `livepatch` under `chrt -f 50` (see `timed`).
//! `LIVEPATCH_BASELINE_BIN=PATH` also runs another build (e.g. an older commit's, built into
//! another target directory) plain in every round, interleaved: before/after on the same load;
//! `LIVEPATCH_BASELINE_DYNAMIC_BIN=PATH` the same for a dynamically linked one. Each packs its
//! own patch (an older build may not read today's format, nor do all it asks).
//! `CLI_BENCH_CPU=1` also prints each variant's process CPU time (see `timed`).

use lp_benches::{build_fixture, Fixture};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FUNCS: &str = r#"
#define F(n) int __attribute__((noipa)) f##n(int x) { int r = x + n; if (x > 1000000) r = x * 3; return r; }
F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9)
"#;

/// The threads of `process_patch.rs`'s target, without its measurement signals.
const TARGET: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>
#include "funcs.h"
static void *worker(void *arg) {
    (void)arg; unsigned acc = 0;
    struct timespec pause = {0, 50000};
    prctl(PR_SET_TIMERSLACK, 1);
    for (;;) {
        acc += f0(1) + f1(1) + f2(1) + f3(1) + f4(1) + f5(1) + f6(1) + f7(1) + f8(1) + f9(1);
        if (acc == 7) puts("");
        nanosleep(&pause, NULL);
    }
    return NULL;
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int threads = argc > 1 ? atoi(argv[1]) : 8;
    pthread_t t;
    for (long i = 0; i < threads; i++) pthread_create(&t, NULL, worker, (void *)i);
    printf("ready %d\n", getpid());
    for (;;) pause();
}
"#;

const ROUNDS: usize = 30;

/// The target triple the static binary is built for (host artifacts, such as proc macros,
/// must stay dynamic: with an explicit `--target` the flags below apply only to this one).
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The Cargo profile of the static binary: release with fat LTO (the workspace's Cargo.toml).
const STATIC_PROFILE: &str = "cli";

/// The release `livepatch` binaries, built now (a no-op when up to date): (static, dynamic).
fn livepatch_bins() -> (PathBuf, PathBuf) {
    // This bench runs from <target>/release/deps/.
    let exe = std::env::current_exe().expect("own path");
    let target_dir = exe
        .ancestors()
        .nth(3)
        .expect("<target>/release/deps/<bench>")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = |extra: &[&str], rustflags: Option<&str>| {
        let mut c = Command::new(&cargo);
        c.args(["build", "-p", "lp-userspace", "--bin", "livepatch"])
            .args(extra);
        if let Some(f) = rustflags {
            c.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", f);
        }
        let ok = c.status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "cargo build {extra:?} of livepatch failed");
    };
    let dynamic = match std::env::var_os("LIVEPATCH_DYNAMIC_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            build(&["--release"], None);
            target_dir.join("release/livepatch")
        }
    };
    let fixed = match std::env::var_os("LIVEPATCH_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            build(
                &["--profile", STATIC_PROFILE, "--target", STATIC_TARGET],
                Some("-C target-feature=+crt-static"),
            );
            target_dir
                .join(STATIC_TARGET)
                .join(STATIC_PROFILE)
                .join("livepatch")
        }
    };
    for b in [&fixed, &dynamic] {
        assert!(b.exists(), "{} not built", b.display());
    }
    (fixed, dynamic)
}

/// The 8-thread target, running.
fn start_target(exe: &Path) -> Fixture {
    Fixture::start(exe, &["8"]).0
}

/// Runs `bin args...` to completion; its wall time and stdout. With `CLI_BENCH_RT` set, under
/// `chrt -f 50`: on a shared, loaded machine that measures the tool's own latency instead of
/// its wait for a CPU (the target's threads keep their normal priority). Only with two CPUs or
/// more: the tool's tracer and warm-up threads may both wait on iced-x86's spinning `Once`,
/// and a real-time thread spinning for one that cannot get the CPU never yields.
///
/// With `CLI_BENCH_CPU` set, the CPU time of the run (all its threads, user and system) is
/// appended to the stdout returned as a line `cpu N ns`: the growth of this process's
/// `RUSAGE_CHILDREN` across it (the only child waited for meanwhile). Not from the tool's own
/// `LIVEPATCH_TRACE` figures, as before: tracing writes lines to stderr, some of them in
/// hundreds of pieces, which costs the traced run CPU time of its own.
fn timed(bin: &Path, args: &[&str]) -> (Duration, String) {
    let mut cmd = if realtime() {
        let mut c = Command::new("chrt");
        c.args(["-f", "50"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let cpu = std::env::var_os("CLI_BENCH_CPU").is_some();
    cmd.stderr(Stdio::piped());
    let before = children_cpu_ns();
    let start = Instant::now();
    let out = cmd.args(args).output().expect("run livepatch");
    let wall = start.elapsed();
    let used = children_cpu_ns() - before;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "livepatch {args:?} failed: {stderr}");
    eprint!("{stderr}");
    let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if cpu {
        stdout.push_str(&format!("\ncpu {used} ns"));
    }
    (wall, stdout)
}

/// User and system CPU time of this process's terminated, waited-for children, in ns.
fn children_cpu_ns() -> u64 {
    // getrusage(2) as x86-64 Linux lays out `struct rusage` (two timevals, 14 longs): declared
    // here, the benches do not depend on the libc crate (std links libc itself).
    #[repr(C)]
    struct Timeval {
        sec: i64,
        usec: i64,
    }
    #[repr(C)]
    struct Rusage {
        user: Timeval,
        system: Timeval,
        _rest: [i64; 14],
    }
    extern "C" {
        fn getrusage(who: i32, usage: *mut Rusage) -> i32;
    }
    const RUSAGE_CHILDREN: i32 = -1;
    let mut u = Rusage {
        user: Timeval { sec: 0, usec: 0 },
        system: Timeval { sec: 0, usec: 0 },
        _rest: [0; 14],
    };
    // SAFETY: getrusage fills the struct we own, laid out as the kernel's.
    unsafe { getrusage(RUSAGE_CHILDREN, &mut u) };
    let ns = |t: &Timeval| t.sec as u64 * 1_000_000_000 + t.usec as u64 * 1000;
    ns(&u.user) + ns(&u.system)
}

/// The run's CPU time in ms from the `cpu N ns` line `timed` appends.
fn process_cpu(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.starts_with("cpu "))?;
    let ns: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(ns / 1e6)
}

/// `CLI_BENCH_RT` is set (and the machine has the CPUs for it, see `timed`).
fn realtime() -> bool {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::var_os("CLI_BENCH_RT").is_some() && cpus >= 2
}

/// Wall times and the tool's own figures of one variant of the commands.
#[derive(Default)]
struct Figures {
    apply: Vec<f64>,
    apply_total: Vec<f64>,
    apply_stall: Vec<f64>,
    revert: Vec<f64>,
    revert_total: Vec<f64>,
    apply_cpu: Vec<f64>,
    revert_cpu: Vec<f64>,
}

impl Figures {
    /// One apply and one revert of `patch` in `pid`, with `extra` arguments (e.g. `--boost`).
    fn round(&mut self, bin: &Path, pid: &str, patch: &str, extra: &[&str]) {
        let (wall, out) = timed(bin, &[&["apply", pid, patch], extra].concat());
        self.apply.push(ms(wall));
        self.apply_total
            .push(reported(&out, "total").unwrap_or(0.0) / 1e3);
        self.apply_stall
            .push(reported(&out, "stall").unwrap_or(0.0) / 1e3);
        self.apply_cpu.extend(process_cpu(&out));
        std::thread::sleep(Duration::from_millis(5));
        let (wall, out) = timed(bin, &[&["revert", pid], extra].concat());
        self.revert.push(ms(wall));
        self.revert_total
            .push(reported(&out, "total").unwrap_or(0.0) / 1e3);
        self.revert_cpu.extend(process_cpu(&out));
        std::thread::sleep(Duration::from_millis(5));
    }

    fn print(self, name: &str) {
        println!("  {name}:");
        println!("    apply  wall time: {}", summary(self.apply));
        println!("           reported total: {}", summary(self.apply_total));
        println!("           reported stall: {}", summary(self.apply_stall));
        if !self.apply_cpu.is_empty() {
            println!("           process CPU:    {}", summary(self.apply_cpu));
        }
        println!("    revert wall time: {}", summary(self.revert));
        println!("           reported total: {}", summary(self.revert_total));
        if !self.revert_cpu.is_empty() {
            println!("           process CPU:    {}", summary(self.revert_cpu));
        }
    }
}

/// The number after `key ` in the tool's summary line (`stall 290 us`, `total 5473 us`).
fn reported(out: &str, key: &str) -> Option<f64> {
    let line = out.lines().next()?;
    let at = line.find(&format!("{key} "))? + key.len() + 1;
    line[at..].split_whitespace().next()?.parse().ok()
}

fn summary(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "median {:6.2} ms  min {:6.2} ms  max {:6.2} ms",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (bin, dynamic_bin) = livepatch_bins();
    let dir: PathBuf = build_fixture("cli-bench", FUNCS, TARGET);
    let d = |n: &str| dir.join(n).display().to_string();
    let patch = d("patch.lp");
    let target_arg = d("target");
    let object_arg = d("new.o");
    let pack = |bin: &Path, out: &str| {
        let args = [
            "pack",
            "--target",
            &target_arg,
            "--object",
            &object_arg,
            "-o",
            out,
        ];
        timed(bin, &args);
    };
    pack(&bin, &patch);
    // The baseline packs its own patch: an older build may not read today's patch format (and
    // would then also not do what today's patches ask, e.g. retarget call sites).
    let baseline_bin = std::env::var_os("LIVEPATCH_BASELINE_BIN").map(PathBuf::from);
    let baseline_patch = d("patch-baseline.lp");
    if let Some(b) = &baseline_bin {
        pack(b, &baseline_patch);
    }
    let baseline_dynamic_bin =
        std::env::var_os("LIVEPATCH_BASELINE_DYNAMIC_BIN").map(PathBuf::from);
    let baseline_dynamic_patch = d("patch-baseline-dynamic.lp");
    if let Some(b) = &baseline_dynamic_bin {
        pack(b, &baseline_dynamic_patch);
    }

    let t = start_target(&dir.join("target"));
    let pid = t.child.id().to_string();
    println!(
        "cli_apply: fresh `livepatch` processes, stop mode, 10-function patch, 8-thread target, {ROUNDS} rounds (static {}, dynamic {}{})",
        bin.display(),
        dynamic_bin.display(),
        if realtime() { ", under chrt -f 50" } else { "" }
    );
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("  load average at start: {}", load().trim());
    // One unmeasured round per binary: the files are in the page cache afterwards, as on a
    // server where the target runs (its libraries are mapped, so cached).
    for b in [&bin, &dynamic_bin] {
        timed(b, &["apply", &pid, &patch]);
        timed(b, &["revert", &pid]);
    }
    let (mut version, mut dynamic_version) = (vec![], vec![]);
    let (mut plain, mut boosted, mut dynamic) =
        (Figures::default(), Figures::default(), Figures::default());
    let (mut baseline, mut baseline_dynamic) = (Figures::default(), Figures::default());
    for round in 0..ROUNDS {
        version.push(ms(timed(&bin, &["--version"]).0));
        dynamic_version.push(ms(timed(&dynamic_bin, &["--version"]).0));
        if let Some(b) = &baseline_bin {
            baseline.round(b, &pid, &baseline_patch, &[]);
        }
        if let Some(b) = &baseline_dynamic_bin {
            baseline_dynamic.round(b, &pid, &baseline_dynamic_patch, &[]);
        }
        // Rotate the order: whoever runs first after the `--version`s is not always the same.
        for i in 0..3 {
            match (round + i) % 3 {
                0 => plain.round(&bin, &pid, &patch, &[]),
                1 => boosted.round(&bin, &pid, &patch, &["--boost"]),
                _ => dynamic.round(&dynamic_bin, &pid, &patch, &[]),
            }
        }
    }
    println!("  load average at end:   {}", load().trim());
    println!(
        "  livepatch --version (exec floor): static {}",
        summary(version)
    );
    println!(
        "                                   dynamic {}",
        summary(dynamic_version)
    );
    if let Some(b) = &baseline_bin {
        baseline.print(&format!("baseline {}, plain", b.display()));
    }
    if let Some(b) = &baseline_dynamic_bin {
        baseline_dynamic.print(&format!("baseline {}, plain (dynamic)", b.display()));
    }
    plain.print("plain (static build)");
    boosted.print("--boost (static build, the tool at nice -20)");
    dynamic.print("plain (default dynamic build)");
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

//! Where the cost of calling a patched function goes (harness = false; prints figures).
//!
//! The README's "calls/s of a patched function / original" (process_patch.rs (b)) is below
//! its goal. This splits it: a single-threaded target calls a 5-instruction function `f0` in
//! a tight loop and prints calls per second; the same loop is measured
//!
//! - **original**: calling `f0` itself;
//! - **jmp stub** (no livepatch at all): calling a 5-byte `jmp f0` placed in the executable
//!   (16-byte aligned, like gcc's functions), once in f0's own 4 KiB page and once in another
//!   page — the redirect's extra jump and nothing else;
//! - **patched**: after `apply` of a patch whose new `f0` is the same code (the redirect
//!   `jmp` at the old entry, the new code in patch memory: another page, within ±2 GiB);
//! - **patched via thunk**: after `apply` of a patch whose new `f0` also writes `ecx`, which
//!   the old one never does, so the redirect goes through a register-preserving thunk;
//! - **patched in nonstop mode**: the same patch as *patched*, applied in nonstop mode, whose
//!   sites lead to the function's dispatch (a flag test, then the jump to the new code).
//!
//! Calls are counted per second of the target thread's CPU time (so that other load on the
//! machine does not count); each round samples every case (the best of 5 windows of 50 ms)
//! and a ratio to the same round's original; the medians over the rounds are printed.
//!
//! Run: `cargo bench -p lp-benches --bench call_overhead` (root; gcc needed).

use lp_benches::{gcc, Fixture};
use lp_userspace::apply::{apply, ApplyOptions, Mode};
use lp_userspace::patchfile::Patch;
use lp_userspace::revert::revert;
use std::path::{Path, PathBuf};
use std::time::Duration;

const F0: &str =
    "int __attribute__((noipa)) f0(int x) { int r = x + 0; if (x > 1000000) r = x * 3; return r; }\n";

/// The new f0 writing ecx as well (an empty asm with an ecx output the optimizer keeps).
const F0_ECX: &str = r#"
int f0(int x) {
    int r = x + 0, c;
    __asm__ volatile("xor %0, %0" : "=c"(c));
    if (x > 1000000) r = x * 3 + c;
    return r;
}
"#;

const TARGET: &str = r#"
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "f0.h"
/* The redirect's extra jump without livepatch: a 16-byte aligned `jmp f0` in f0's own 4 KiB
 * page (it precedes f0 in .text), and one in a page of its own. */
__asm__(".text\n.p2align 4\n.globl stub_near\n.type stub_near,@function\nstub_near:\n jmp f0\n.size stub_near,.-stub_near\n"
        ".section .text.far,\"ax\",@progbits\n.p2align 12\n.skip 4096\n.globl stub_far\n.type stub_far,@function\nstub_far:\n jmp f0\n.size stub_far,.-stub_far\n.text\n");
int stub_near(int), stub_far(int);
/* Thread CPU time: the load of other processes on the machine does not count. */
static long now_ns(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
#define LOOP(fn) while (now_ns() - start < 50000000L) { for (int i = 0; i < 1000; i++) acc += fn(i); n += 1000; }
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "f0";
    printf("ready %d near-same-page %d far-same-page %d\n", getpid(),
           ((unsigned long)stub_near >> 12) == ((unsigned long)f0 >> 12),
           ((unsigned long)stub_far >> 12) == ((unsigned long)f0 >> 12));
    for (;;) {
        long start = now_ns(), n = 0; unsigned acc = 0;
        if (!strcmp(mode, "near")) { LOOP(stub_near) }
        else if (!strcmp(mode, "far")) { LOOP(stub_far) }
        else { LOOP(f0) }
        printf("calls %ld %u\n", n * 20, acc & 1);
    }
}
"#;

struct Target(Fixture);

impl Target {
    fn start(exe: &Path, args: &[&str]) -> Target {
        let (f, ready) = Fixture::start(exe, args);
        // The premise of the two stubs.
        assert!(
            ready.contains("near-same-page 1 far-same-page 0"),
            "{ready}"
        );
        Target(f)
    }
    fn pid(&self) -> i32 {
        self.0.pid()
    }
    /// Best of 5 windows of 50 ms of thread CPU time, after skipping one (it may straddle a
    /// change).
    fn calls_per_s(&mut self) -> f64 {
        let mut best = 0.0f64;
        for i in 0..6 {
            let line = self.0.line();
            let v: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            if i > 0 {
                best = best.max(v);
            }
        }
        best
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("lp-callbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = |n: &str| dir.join(n).display().to_string();
    std::fs::write(dir.join("f0.h"), F0).unwrap();
    std::fs::write(dir.join("target.c"), TARGET).unwrap();
    std::fs::write(
        dir.join("same.c"),
        F0.replace("__attribute__((noipa)) ", ""),
    )
    .unwrap();
    std::fs::write(dir.join("ecx.c"), F0_ECX).unwrap();
    gcc(&["-O2", &d("target.c"), "-o", &d("target")]);
    gcc(&["-O2", "-c", "-fPIC", &d("same.c"), "-o", &d("same.o")]);
    gcc(&["-O2", "-c", "-fPIC", &d("ecx.c"), "-o", &d("ecx.o")]);
    let exe = dir.join("target");
    let same: Patch = lp_userspace::pack::pack(&exe, &dir.join("same.o"), &[]).unwrap();
    let ecx: Patch = lp_userspace::pack::pack(&exe, &dir.join("ecx.o"), &[]).unwrap();

    let mut t = Target::start(&exe, &[]);
    let mut near = Target::start(&exe, &["near"]);
    let mut far = Target::start(&exe, &["far"]);
    let rounds = 7;
    let (mut orig, mut stub_near, mut stub_far) = (vec![], vec![], vec![]);
    let (mut patched, mut thunk, mut dispatched) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let o = t.calls_per_s();
        orig.push(o);
        stub_near.push(near.calls_per_s() / o);
        stub_far.push(far.calls_per_s() / o);
        let applied = apply(t.pid(), &same, ApplyOptions::default()).unwrap();
        assert!(!applied.functions[0].thunk);
        patched.push(t.calls_per_s() / o);
        revert(t.pid(), None, Default::default(), Duration::from_secs(5)).unwrap();
        let applied = apply(t.pid(), &ecx, ApplyOptions::default()).unwrap();
        assert!(
            applied.functions[0].thunk,
            "the ecx patch goes through a thunk"
        );
        thunk.push(t.calls_per_s() / o);
        revert(t.pid(), None, Default::default(), Duration::from_secs(5)).unwrap();
        let nonstop = ApplyOptions {
            mode: Mode::Nonstop,
            ..ApplyOptions::default()
        };
        apply(t.pid(), &same, nonstop).unwrap();
        dispatched.push(t.calls_per_s() / o);
        revert(t.pid(), None, Mode::Nonstop, Duration::from_secs(5)).unwrap();
    }
    println!(
        "call_overhead: {rounds} rounds, f0 calls per CPU-second (best of 5 x 50 ms), medians"
    );
    println!(
        "  original                                {:.3e}",
        median(orig)
    );
    println!(
        "  jmp stub in f0's page (no livepatch)    ratio {:.3}",
        median(stub_near)
    );
    println!(
        "  jmp stub in another page (no livepatch) ratio {:.3}",
        median(stub_far)
    );
    println!(
        "  patched (jmp into patch memory)         ratio {:.3}",
        median(patched)
    );
    println!(
        "  patched via register-saving thunk       ratio {:.3}",
        median(thunk)
    );
    println!(
        "  patched in nonstop mode (dispatch)      ratio {:.3}",
        median(dispatched)
    );
    drop((t, near, far));
    let _ = std::fs::remove_dir_all(&dir);
}

//! Patches stacked in nonstop mode switch every call at one point. While a second patch goes
//! in on top of a first one, or comes out again, a thread sees the first patch, then the
//! second (or back), once — never the original function (which the second patch's
//! dispatch ran before its commit, session 6), and never the two patches interleaved (a
//! revert put the direct callers back on the patch below while the calls through the entry
//! still ran the top one, for as long as the callers' windows lasted).

mod common;
use common::*;

/// Threads call `work` directly (a caller both patches retarget), then through a pointer
/// (the entry). Each thread counts its switches between the patch below (1000 + x) and the one
/// on top (2000 + x), in the order it saw them, and every call of the original (1 + x).
const TARGET: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
int __attribute__((noipa)) work(int x) { int r = x + 1; if (x > 1000000) r = x * 3; return r; }
int (*volatile pointer)(int) = work;
static long ups, downs, unpatched, iterations;
static volatile int last_direct, last_pointer;
static void see(int v, int *last) {
    if (v == 1) __atomic_fetch_add(&unpatched, 1, __ATOMIC_RELAXED);
    if (*last == 1001 && v == 2001) __atomic_fetch_add(&ups, 1, __ATOMIC_RELAXED);
    if (*last == 2001 && v == 1001) __atomic_fetch_add(&downs, 1, __ATOMIC_RELAXED);
    *last = v;
}
static void *loop(void *arg) {
    (void)arg;
    int last = 0;
    for (;;) {
        int d = work(0);
        see(d, &last);
        int p = pointer(0);
        see(p, &last);
        last_direct = d; last_pointer = p;
        __atomic_fetch_add(&iterations, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    for (int i = 0; i < THREADS; i++) pthread_create(&t, NULL, loop, NULL);
    printf("ready %d\n", getpid());
    for (;;) {
        usleep(20000);
        printf("direct=%d pointer=%d ups=%ld downs=%ld unpatched=%ld iterations=%ld\n",
               last_direct, last_pointer, __atomic_load_n(&ups, __ATOMIC_RELAXED),
               __atomic_load_n(&downs, __ATOMIC_RELAXED),
               __atomic_load_n(&unpatched, __ATOMIC_RELAXED),
               __atomic_load_n(&iterations, __ATOMIC_RELAXED));
    }
}
"#;

fn patch_object(dir: &std::path::Path, name: &str, add: i32) -> std::path::PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, format!("int work(int x) {{ return x + {add}; }}\n")).unwrap();
    let out = dir.join(format!("{name}.o"));
    cc(
        "gcc",
        &[
            "-O2",
            "-c",
            "-fPIC",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    out
}

/// The counter `name` of an output line.
fn counter(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

const THREADS: u64 = 2;
const CYCLES: u64 = 10;

#[test]
fn nonstop_patch_stacked_on_a_nonstop_one_switches_every_call_at_one_point() {
    stacked_cycles("nonstop");
}

/// The patch below applied in stop mode: no dispatch of its own, its callers and its entry
/// lead straight to its code, which the top patch's dispatch runs until its flag.
#[test]
fn nonstop_patch_stacked_on_a_stop_mode_one_switches_every_call_at_one_point() {
    stacked_cycles("stop");
}

/// The target with the patch below applied in `below_mode` (and steady), the top patch packed.
struct Stacked {
    _dir: tempfile::TempDir,
    target: Target,
    pid: String,
    top: String,
}

fn stacked(below_mode: &str) -> Stacked {
    let dir = tempfile::tempdir().unwrap();
    let threads = format!("-DTHREADS={THREADS}");
    let exe = executable_from_source(dir.path(), "stacked", TARGET, &["-pthread", &threads]);
    let below = patch_object(dir.path(), "below", 1001);
    let top = patch_object(dir.path(), "top", 2001);
    let (below, _) = pack(dir.path(), &exe, &below, &[], "below.lp");
    let (top, _) = pack(dir.path(), &exe, &top, &[], "top.lp");
    // The threads never block: at the lowest priority, so that the tool gets the CPUs it needs.
    let target = Target::spawn_niced(&exe, &[]);
    let pid = target.pid();
    livepatch_ok(&["apply", &pid, below.to_str().unwrap(), "--mode", below_mode]);
    target.expect_steady(2, |l| l.contains("direct=1001 pointer=1001"));
    Stacked {
        _dir: dir,
        target,
        pid,
        top: top.display().to_string(),
    }
}

/// Between output lines `before` and `after`, `cycles` applies and reverts of the top patch:
/// the original never ran, and every thread switched once up per apply and once down per
/// revert (more means it went back and forth between the two patches).
fn assert_switched_at_one_point(before: &str, after: &str, cycles: u64) {
    assert_eq!(
        counter(after, "unpatched"),
        counter(before, "unpatched"),
        "the original function ran again while the top patch went in or out: {before} / {after}"
    );
    assert_eq!(
        (counter(after, "ups"), counter(after, "downs")),
        (THREADS * cycles, THREADS * cycles),
        "{after}"
    );
}

fn stacked_cycles(below_mode: &str) {
    let Stacked {
        target, pid, top, ..
    } = &stacked(below_mode);
    // The direct caller is retargeted: a revert of the top patch puts it back on the patch
    // below's code, not on the entry.
    let callers = status_json(pid)[0]["patches"][0]["functions"][0]["call_sites"].as_u64();
    assert_eq!(callers, Some(1), "{}", status_json(pid));
    let before = target.lines().last().unwrap().clone();
    for _ in 0..CYCLES {
        livepatch_ok(&["apply", pid, top, "--mode", "nonstop"]);
        target.expect_steady(1, |l| l.contains("direct=2001 pointer=2001"));
        livepatch_ok(&["revert", pid, "--mode", "nonstop"]);
        target.expect_steady(1, |l| l.contains("direct=1001 pointer=1001"));
    }
    let after = target.lines().last().unwrap().clone();
    assert_switched_at_one_point(&before, &after, CYCLES);
    livepatch_ok(&["revert", pid, "--mode", "nonstop"]);
    target.expect_steady(2, |l| l.contains("direct=1 pointer=1"));
}

/// A revert of the top patch killed between its windows (its callers' branches at its
/// dispatch, the flag still set: every call runs the top patch) is finished by the next
/// `livepatch revert` at one point too: the callers go on from the dispatch after the flag.
#[test]
fn a_stacked_nonstop_revert_killed_between_its_windows_is_finished_at_one_point() {
    let Stacked {
        target, pid, top, ..
    } = &stacked("nonstop");
    let before = target.lines().last().unwrap().clone();
    const KILLED: u64 = 4;
    for _ in 0..KILLED {
        livepatch_ok(&["apply", pid, top, "--mode", "nonstop"]);
        target.expect_steady(1, |l| l.contains("direct=2001 pointer=2001"));
        // The third sync is the last of the callers' first window: the caller leads to the
        // top patch's dispatch, whose flag is still set.
        let mut tool = stop_tool_at(&["revert", pid, "--mode", "nonstop"], "nonstop-sync:3");
        tool.kill().unwrap();
        tool.wait().unwrap();
        target.expect_steady(1, |l| l.contains("direct=2001 pointer=2001"));
        let out = livepatch(&["revert", pid, "--mode", "nonstop"]);
        assert!(out.status.success(), "{out:?}");
        target.expect_steady(1, |l| l.contains("direct=1001 pointer=1001"));
    }
    let after = target.lines().last().unwrap().clone();
    assert_switched_at_one_point(&before, &after, KILLED);
}

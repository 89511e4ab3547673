//! Review session 8: system calls livepatch makes inside a target that the seccomp check
//! (`process/seccomp.rs`, `Tracee::check_seccomp`) does not evaluate as they are made.
//!
//! - S1: nonstop mode's SIGTRAP handler runs in whichever thread reaches an `int3` of ours,
//!   under that thread's own filters. Only the borrowed thread's filters are checked, so a
//!   worker that sandboxed itself (a filter installed without TSYNC, as a thread that parses
//!   untrusted input does) is killed by its filter on the handler's `gettid`: the whole process
//!   dies during the apply.
//! - S2: the calls' arguments that depend on the run (descriptors, lengths, addresses) are
//!   evaluated as 0. A filter that tests one of them (here: `close` of a descriptor >= 3 kills
//!   the process) answers ALLOW for the check's `close(0)`, and KILL for the real `close` of the
//!   state's memfd: the target dies.
//!
//! - S3: a nonstop revert seizes every thread after its switch (to see that none is still in
//!   the patch's code), lets them all go, then unmaps the patch's memory on a thread it stops
//!   anew: the main thread (`stop_any`). Only the borrowed thread was checked (the tracee held
//!   no other at the time), so a main thread whose own filter kills `munmap` is killed by it.
//!
//! The assertion is what a user needs: whatever livepatch answers (applied, or refused with a
//! one-line error), the target is alive afterwards.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// argv[1] picks the filter: `thread` gives the worker (only) a filter that kills the process
/// on gettid (the worker then calls compute without a pause: a temporary int3 lasts only a few
/// IPI round trips); `close` gives every thread (TSYNC) a filter that kills the process on a
/// `close` of a descriptor >= 3 (the worker calls it in bursts: 1000 calls, then 200 us of
/// sleep). The main thread prints compute(41) every 20 ms; the worker prints it every 20 ms
/// with write(2).
const TARGET: &str = r#"
#include "compute_loop.h"
#include "seccomp_filter.h"
#include <pthread.h>
#include <string.h>

static int thread_filter;
static volatile int worker_ready;

static void *worker(void *arg) {
    (void)arg;
    if (thread_filter) /* This thread's own sandbox: no TSYNC, the other threads are not filtered. */
        filter_one_call(SYS_gettid, SECCOMP_RET_KILL_PROCESS, 0);
    worker_ready = 1;
    burst_compute_forever("worker", thread_filter ? 0 : 200000);
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    thread_filter = argc > 1 && !strcmp(argv[1], "thread");
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    while (!worker_ready) usleep(1000);
    if (argc > 1 && !strcmp(argv[1], "close")) {
        struct sock_filter insns[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_close, 0, 3),
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
            BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 3, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        install_filter(insns, sizeof insns / sizeof insns[0], SECCOMP_FILTER_FLAG_TSYNC);
    }
    printf("ready %d\n", getpid());
    print_compute_forever("main");
}
"#;

fn build(dir: &Path) -> (PathBuf, String) {
    compute_target_and_patch(dir, "sandboxed", TARGET, &["-pthread"])
}

/// S1: a worker under a filter of its own (gettid kills the process) and an unfiltered main
/// thread (the one nonstop mode borrows). Nonstop applies and reverts: the worker reaches the
/// temporary int3s, our SIGTRAP handler runs on it and calls gettid, and its filter kills the
/// whole process. Expected: refused (the handler's calls do not pass that thread's filter) or
/// applied, the target alive either way.
#[test]
fn review8_nonstop_handler_in_a_thread_with_its_own_filter_kills_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let mut target = Target::spawn(&exe, &["thread"]);
    let pid = target.pid();
    // Premise: the main thread is not filtered, the worker is.
    assert_eq!(seccomp_of(&pid, &pid), "0");
    assert!(
        tasks(&pid).iter().any(|t| seccomp_of(&pid, t) == "2"),
        "the worker has no filter"
    );
    target.expect_steady(3, |l| l == "main=42" || l == "worker=42");
    for round in 0..10 {
        let out = livepatch(&nonstop_apply(&pid, &patch));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !target.dies_within(Duration::from_millis(300)),
            "round {round}: the target was killed by its worker's seccomp filter during a nonstop apply (livepatch said: {} {err})",
            out.status
        );
        if !out.status.success() {
            // Refused: acceptable, as long as it says why and the target lives on unchanged.
            assert!(err.contains("seccomp"), "{err}");
            target.expect_steady(3, |l| l == "main=42" || l == "worker=42");
            return;
        }
        target.expect_steady(3, |l| l == "main=1041" || l == "worker=1041");
        let out = livepatch(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !target.dies_within(Duration::from_millis(300)),
            "round {round}: the target was killed by its worker's seccomp filter during a nonstop revert (livepatch said: {} {err})",
            out.status
        );
        assert!(out.status.success(), "{err}");
        target.expect_steady(3, |l| l == "main=42" || l == "worker=42");
    }
}

/// S2: every thread under a filter that kills the process on `close(fd)` with fd >= 3. The
/// check evaluates `close(0)` (ALLOW); the apply then closes the state's memfd (fd >= 3) in
/// the target and the filter kills it. Expected: refused with one line, or applied; the target
/// alive either way.
#[test]
fn review8_a_filter_on_a_run_dependent_argument_kills_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    for mode in ["stop", "nonstop"] {
        let mut target = Target::spawn(&exe, &["close"]);
        let pid = target.pid();
        assert_eq!(seccomp_of(&pid, &pid), "2");
        target.expect_steady(2, |l| l == "main=42" || l == "worker=42");
        let out = livepatch(&["apply", &pid, &patch, "--mode", mode, "--timeout", "60"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !target.dies_within(Duration::from_millis(300)),
            "{mode}: the target was killed by its seccomp filter on a close livepatch made (livepatch said: {} {err})",
            out.status
        );
        if out.status.success() {
            target.expect_steady(3, |l| l == "main=1041" || l == "worker=1041");
        } else {
            assert!(err.contains("seccomp") && err.contains("close"), "{err}");
            target.expect_steady(3, |l| l == "main=42" || l == "worker=42");
        }
    }
}

/// S3: the idle thread is borrowed (`LIVEPATCH_BORROW_COMM=idle` makes sure of it; it is the
/// natural pick whenever the main thread wakes during the look) and has no filter; the main
/// thread's own filter kills the process on munmap. A nonstop apply runs every remote call on
/// the idle thread and works; the nonstop revert then unmaps the patch's memory on the main
/// thread, never checked, and the target dies. Expected: the revert refused with one line, or
/// done; the target alive either way.
#[test]
fn review8_nonstop_revert_runs_munmap_on_an_unchecked_thread() {
    let dir = tempfile::tempdir().unwrap();
    // The main thread puts itself (only, no TSYNC) under a filter that kills the process on
    // munmap; the thread named "idle" has none.
    let exe = executable(
        dir.path(),
        &["munmap_filtered.c"],
        "mainfiltered",
        &["-pthread"],
    );
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    assert_eq!(seccomp_of(&pid, &pid), "2", "the main thread is filtered");
    target.expect_steady(2, |l| l == "main=42");
    let run = |args: &[&str]| livepatch_env(args, &[("LIVEPATCH_BORROW_COMM", "idle")]);
    let out = run(&nonstop_apply(&pid, &patch));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !target.dies_within(Duration::from_millis(300)),
        "apply: {err}"
    );
    assert!(out.status.success(), "the nonstop apply failed: {err}");
    target.expect_steady(3, |l| l == "main=1041");
    let out = run(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !target.dies_within(Duration::from_millis(300)),
        "the nonstop revert ran munmap on the main thread, whose filter killed the target (livepatch said: {} {err})",
        out.status
    );
    if out.status.success() {
        target.expect_steady(3, |l| l == "main=42");
    } else {
        assert!(err.contains("seccomp"), "{err}");
        target.expect_steady(3, |l| l == "main=1041");
    }
}

/// S1 as refused since session 14, where the check of the threads the handler may run in is
/// made in the switch's first look, while the sync agent maps the patch memory (no longer
/// right after the attach): the refusal names seccomp, comes before anything of the patch is
/// written, and takes out what the apply made meanwhile — no trap area, no patch recorded —
/// and the target runs on unchanged (stop mode, which runs no handler, still patches it).
#[test]
fn review8_a_nonstop_apply_refused_for_a_filtered_worker_leaves_the_target_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let mut target = Target::spawn(&exe, &["thread"]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "main=42" || l == "worker=42");
    let before = maps_of(&pid);
    assert!(!before.contains("livepatch-trap"), "{before}");
    let (code, err) = livepatch_err(&nonstop_apply(&pid, &patch));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("seccomp"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!target.dies_within(Duration::from_millis(300)));
    assert_no_trap_area_added(&pid, &before);
    let st = lp_userspace::status::status(Some(target.child.id() as i32)).unwrap();
    assert!(st.iter().all(|p| p.patches.is_empty()), "{st:?}");
    target.expect_steady(3, |l| l == "main=42" || l == "worker=42");
    livepatch_ok(&["apply", &pid, &patch, "--timeout", "60"]);
    target.expect_steady(3, |l| l == "main=1041" || l == "worker=1041");
}

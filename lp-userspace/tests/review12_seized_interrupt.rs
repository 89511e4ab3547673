//! Review session 12: the borrowed thread is PTRACE_INTERRUPTed right at its seize (de0112e),
//! and its stop is only waited for at its first use (`Thread::interrupted`, `stop_thread`).
//!
//! - H1: the stop can be reported while the tracer waits for *another* thread: the nonstop
//!   seccomp check seizes and stops each thread whose filters differ from those vetted
//!   (`check_handler_threads`), and its wait reaps whatever report comes first — the borrowed
//!   thread's. It is marked stopped there, but its `interrupted` mark stayed: once let go (the
//!   revert's look at every thread after its switch), the next stop of it sent no interrupt
//!   and waited for ever for a stop that never came. The revert hung in its munmap.

mod common;

use common::*;

/// The main thread (named "lp-borrow": the test makes nonstop livepatches borrow it) has no
/// seccomp filter and prints compute(41) every 20 ms; a worker sandboxes itself with a filter
/// of its own (no TSYNC) that only kills on acct(2), which nobody calls — it lets every call of
/// livepatch's through — and then waits in pause().
const TARGET: &str = r#"
#define _GNU_SOURCE
#include "compute_loop.h"
#include "seccomp_filter.h"
#include <pthread.h>

static volatile int worker_ready;

static void *worker(void *arg) {
    (void)arg;
    filter_one_call(SYS_acct, SECCOMP_RET_KILL_PROCESS, 0);
    worker_ready = 1;
    for (;;) pause();
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_setname_np(pthread_self(), "lp-borrow");
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    while (!worker_ready) usleep(1000);
    printf("ready %d\n", getpid());
    print_compute_forever("main");
}
"#;

const BORROW: &[(&str, &str)] = &[("LIVEPATCH_BORROW_COMM", "lp-borrow")];

/// H1: nonstop applies and reverts of a target whose borrowed thread is unfiltered and whose
/// worker has a filter of its own, each bounded (a hang fails). Expected: every one succeeds
/// and the target prints the patched value, then the original one. (Several rounds: which
/// report the check's wait reaps first is up to the scheduler; nearly always the borrowed
/// thread's, stopped since its seize.)
#[test]
fn review12_a_nonstop_revert_after_the_seccomp_check_stopped_a_worker_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "sandboxed12", TARGET, &["-pthread"]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    // Premise: the main thread is not filtered, the worker is.
    assert_eq!(seccomp_of(&pid, &pid), "0");
    assert!(
        tasks(&pid).iter().any(|t| seccomp_of(&pid, t) == "2"),
        "the worker has no filter"
    );
    target.expect_steady(2, |l| l == "main=42");
    for round in 0..3 {
        let out = livepatch_bounded(&nonstop_apply(&pid, &patch), BORROW);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "round {round}: apply: {err}");
        target.expect_steady(2, |l| l == "main=1041");
        let revert = ["revert", &pid, "--mode", "nonstop", "--timeout", "60"];
        let out = livepatch_bounded(&revert, BORROW);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "round {round}: revert: {err}");
        target.expect_steady(2, |l| l == "main=42");
    }
    assert!(target.alive());
}

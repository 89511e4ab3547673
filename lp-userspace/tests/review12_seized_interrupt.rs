//! Review session 12: the borrowed thread is PTRACE_INTERRUPTed right at its seize (de0112e),
//! and its stop is only waited for at its first use (`Thread::interrupted`, `stop_thread`).
//!
//! - H1: the stop can be reported while the tracer waits for *another* thread: the nonstop
//!   seccomp check seizes and stops each thread whose filters differ from those vetted
//!   (`check_handler_threads`), and its wait reaps whatever report comes first — the borrowed
//!   thread's. It is marked stopped there, but its `interrupted` mark stayed: once let go (the
//!   revert's look at every thread after its switch), the next stop of it sent no interrupt
//!   and waited for ever for a stop that never came. The revert hung in its munmap.
//! - M1: interrupted at its seize, the borrowed thread stopped for operations refused by their
//!   checks (already applied, bytes changed, no such patch) too: a thread waiting in
//!   epoll_wait (which a stop ends with EINTR, even without a signal) saw EINTR from an apply
//!   that did nothing. It is asked to stop once those checks have passed
//!   (`Tracee::interrupt_early`).

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

/// M1's target: the main thread (named "lp-borrow") waits in epoll_wait(2) on an eventfd
/// nobody writes and has no signal handler; it prints "epoll R E" should the wait ever end
/// (R its result, E errno). epoll_wait ends with EINTR after a stop of its thread, even one
/// no signal caused (signal(7)). A worker ("lp-work") prints compute(41) every 20 ms.
const EPOLL_TARGET: &str = r#"
#define _GNU_SOURCE
#include "compute_loop.h"
#include <errno.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

static void *worker(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "lp-work");
    print_compute_forever("worker");
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_setname_np(pthread_self(), "lp-borrow");
    int ep = epoll_create1(0), ev = eventfd(0, 0);
    struct epoll_event e = {.events = EPOLLIN};
    if (ep < 0 || ev < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e) != 0) return 2;
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    printf("ready %d\n", getpid());
    for (;;) {
        int r = epoll_wait(ep, &e, 1, -1);
        printf("epoll %d %d\n", r, r < 0 ? errno : 0);
    }
}
"#;

/// M1: a nonstop apply refused once it has seized the thread it borrows — the patch is
/// applied already, the commonest mistake — changes nothing in the target: the thread it
/// borrowed is not stopped, and its epoll_wait goes on waiting. So for a nonstop revert of a
/// patch the process does not have. (On paced de0112e it was
/// interrupted at its seize: its epoll_wait returned EINTR to a program that never asked for
/// signals, for an apply that did nothing.) The first apply borrows the worker (whose
/// nanosleep restarts by itself); the refused ones borrow the waiting main thread.
#[test]
fn review12_a_refused_nonstop_apply_leaves_the_borrowed_thread_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) =
        compute_target_and_patch(dir.path(), "epoller12", EPOLL_TARGET, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "worker=42");
    let out = livepatch_env(
        &nonstop_apply(&pid, &patch),
        &[("LIVEPATCH_BORROW_COMM", "lp-work")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.expect_steady(2, |l| l == "worker=1041");
    for _ in 0..3 {
        let out = livepatch_env(
            &nonstop_apply(&pid, &patch),
            &[("LIVEPATCH_BORROW_COMM", "lp-borrow")],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("already"), "{err}");
        // So does a revert refused for a patch id the process does not have.
        let out = livepatch_env(
            &["revert", &pid, "0123abcd", "--mode", "nonstop"],
            &[("LIVEPATCH_BORROW_COMM", "lp-borrow")],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not applied"),
            "{err}"
        );
    }
    // The worker's lines go on; a line of the main thread would have come long before.
    target.expect_steady(5, |l| l == "worker=1041");
    let woken: Vec<String> = target
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("epoll"))
        .collect();
    assert!(
        woken.is_empty(),
        "refused applies woke the borrowed thread's epoll_wait: {woken:?}"
    );
}

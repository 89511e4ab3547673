//! Review session 9, F2 (s9-nsio 7e85069): "a borrowed thread seen with SIGTRAP blocked makes
//! the switch busy at once … try again". The borrow look prefers the idlest thread, and the
//! idlest thread of many programs is one that blocks every signal for good: glibc's helper
//! thread for `timer_create(SIGEV_THREAD)` timers waits in `sigwaitinfo` with every signal
//! blocked and is switched in only when a timer fires. It is borrowed at every try, and every
//! try answers "busy … try again": the user is told to retry something that cannot succeed,
//! where main answered (after the timeout) "keeps SIGTRAP blocked: … use --mode stop".
//!
//! (s9-borrow 01ad460 ranks a thread that blocks SIGTRAP last *in its class*: when it is the
//! only thread blocked in a system call — here the main thread computes, as a worker process
//! does — it is still the one borrowed.)

mod common;

use common::*;

/// The main thread computes without pause and prints compute(41) every 20 ms (it is running
/// whenever the tool looks: the look's class "main thread, running"); a SIGEV_THREAD timer
/// (armed for an hour) makes glibc start its helper thread, the only thread blocked in a
/// system call.
const TARGET: &str = r#"
#include "compute_loop.h"
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void tick(union sigval v) { (void)v; }

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigevent ev = {0};
    ev.sigev_notify = SIGEV_THREAD;
    ev.sigev_notify_function = tick;
    timer_t t;
    if (timer_create(CLOCK_MONOTONIC, &ev, &t)) { perror("timer_create"); return 2; }
    struct itimerspec its = {{3600, 0}, {3600, 0}};
    timer_settime(t, 0, &its, NULL);
    usleep(100000);
    printf("ready %d\n", getpid());
    volatile unsigned sink = 0;
    long last = 0;
    for (;;) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = now.tv_sec * 1000L + now.tv_nsec / 1000000L;
        if (ms - last >= 20) {
            printf("v=%d\n", compute(41));
            last = ms;
        }
        for (int i = 0; i < 1000; i++) sink += compute(41);
    }
}
"#;

#[test]
fn review9_a_refusal_that_says_try_again_can_succeed_when_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) =
        compute_target_and_patch(dir.path(), "timer_helper", TARGET, &["-pthread", "-lrt"]);
    // At nice 19: a CPU-bound fixture on a small shared machine (the tool still gets CPU).
    let mut target = Target::spawn_niced(&exe, &[]);
    let pid = target.pid();
    // The premise: a thread of the process blocks SIGTRAP (glibc's timer helper).
    let blocking = tasks(&pid)
        .into_iter()
        .filter(|t| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap();
            let blk = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            blk & 1 << (libc::SIGTRAP - 1) != 0
        })
        .count();
    assert_eq!(blocking, 1, "the premise: one thread blocks SIGTRAP");
    target.expect_steady(2, |l| l == "v=42");
    let mut answers = Vec::new();
    for _ in 0..5 {
        let out = livepatch(&["apply", &pid, &patch, "--mode", "nonstop", "--timeout", "2"]);
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() || !err.contains("try again") {
            // Applied, or a refusal that does not send the user round in circles.
            return;
        }
        answers.push(format!("{}: {err}", out.status));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(target.alive());
    panic!("5 tries in a row, each told to try again: {answers:#?}");
}

/// A process whose every thread blocks SIGTRAP (here its one thread blocks every signal for
/// good): the borrow has no other thread to take, and nonstop mode cannot switch it. The
/// answer is a refusal naming both ways out (exit 10, the target untouched), not "busy" (the
/// borrowed thread is reported at once: waiting for it to unblock would wait for ever, as it
/// is stopped); stop mode then applies and reverts.
#[test]
fn review9_every_thread_blocking_sigtrap_is_refused_with_both_ways_out() {
    const BLOCKER: &str = r#"
#include "compute_loop.h"
#include <signal.h>
#include <unistd.h>
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    printf("ready %d\n", getpid());
    struct timespec ts = {0, 20 * 1000000L};
    for (;;) {
        printf("v=%d\n", compute(41));
        nanosleep(&ts, NULL);
    }
}
"#;
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "all_blocked", BLOCKER, &[]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "v=42");
    let (code, line) = livepatch_err(&nonstop_apply(&pid, &patch));
    assert_eq!(code, 10, "{line}");
    assert!(
        line.contains("as every thread of it does") && line.contains("--mode stop"),
        "{line}"
    );
    target.expect_steady(3, |l| l == "v=42");
    livepatch_ok(&["apply", &pid, &patch, "--mode", "stop"]);
    target.expect_steady(3, |l| l == "v=1041");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == "v=42");
    assert!(target.alive());
}

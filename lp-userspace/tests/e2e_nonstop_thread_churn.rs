//! Nonstop switches of a process whose threads come and go all the time: a switch keeps every
//! thread's /proc files open from its first look to the restore of the SIGTRAP action, and
//! lists the threads again at each later look (the check right before the first int3, each
//! settle, the uninstall's wait and its look at the pending signals). Threads born meanwhile
//! (glibc starts each with every signal blocked) must be looked at, gone ones must count as
//! gone, and nothing may be mistaken for a thread it is not.
//!
//! The fixture: two workers call compute() between 50 µs sleeps; a spawner starts four
//! short-lived threads at a time, each calling compute() 50 times, joins them, and sleeps 1 ms
//! (without the sleep it would spend most of its time in pthread_create, which blocks every
//! signal around clone(): nonstop mode refuses a thread that keeps SIGTRAP blocked). Every call
//! must return the old value or the new one (the fixture aborts otherwise). Through 100
//! apply/revert cycles (the library, as e2e_stress does): every switch succeeds (one found
//! busy is tried again; fewer than 100 may be), the process
//! lives, threads were born and died during the cycles, the new code ran, and after the last
//! revert SIGTRAP has its own action back (SIG_DFL: not caught).
//!
//! The thread borrowed for the system calls is a worker (named lp-borrow, forced with
//! `LIVEPATCH_BORROW_COMM`): left to choose, the tool often borrows the spawner, blocked in a
//! system call — inside pthread_create, with every signal blocked — and a borrowed thread with
//! SIGTRAP blocked makes the switch busy (it cannot unblock it while stopped; see
//! `refuse_if_sigtrap_blocked`). That case is the test below this one.

mod common;
use common::*;
use lp_userspace::apply::{apply, ApplyOptions, Error, ErrorKind, Mode};
use lp_userspace::patchfile::Patch;
use std::time::Duration;

const CYCLES: usize = 100;

const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}

static volatile unsigned long seen_old, seen_new, born;

static void check(void) {
    int v = compute(41);
    if (v == 42) __atomic_fetch_add(&seen_old, 1, __ATOMIC_RELAXED);
    else if (v == 1041) __atomic_fetch_add(&seen_new, 1, __ATOMIC_RELAXED);
    else { fprintf(stderr, "churn: compute returned %d\n", v); abort(); }
}

static void *brief(void *arg) {
    (void)arg;
    for (int i = 0; i < 50; i++) check();
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    struct timespec ts = {0, 1000000};
    for (;;) {
        pthread_t t[4];
        for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, brief, NULL);
        for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
        __atomic_fetch_add(&born, 4, __ATOMIC_RELAXED);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void *worker(void *arg) {
    if (arg) pthread_setname_np(pthread_self(), "lp-borrow");
    struct timespec ts = {0, 50000};
    for (;;) { check(); nanosleep(&ts, NULL); }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    for (long i = 0; i < 2; i++) pthread_create(&t, NULL, worker, (void *)i);
    pthread_create(&t, NULL, spawner, NULL);
    printf("ready %d\n", getpid());
    struct timespec ts = {0, 20 * 1000000L};
    for (;;) {
        printf("old=%lu new=%lu born=%lu\n", seen_old, seen_new, born);
        nanosleep(&ts, NULL);
    }
}
"#;

/// (old, new, born) from a line "old=A new=B born=C".
fn counts(line: &str) -> (u64, u64, u64) {
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap())
        .collect();
    (v[0], v[1], v[2])
}

fn sigtrap_caught(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cgt = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .unwrap()
        .trim();
    u64::from_str_radix(cgt, 16).unwrap() & (1 << (libc::SIGTRAP - 1)) != 0
}

#[test]
fn e2e_nonstop_switches_a_process_whose_threads_come_and_go() {
    // Read by the library in this process only; both tests here borrow the thread so named.
    std::env::set_var("LIVEPATCH_BORROW_COMM", "lp-borrow");
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "churn", SOURCE, &["-pthread"]);
    let patch = Patch::load(std::path::Path::new(&compute_patch(dir.path(), &exe))).unwrap();
    let mut target = Target::spawn_niced(&exe, &[]);
    let pid = target.child.id() as i32;
    let first = target.wait_line(|l| l.starts_with("old="));
    let opts = ApplyOptions {
        mode: Mode::Nonstop,
        timeout: Duration::from_secs(30),
    };
    let mut new_seen = 0;
    // A switch may be busy (and then writes nothing): a thread seen right before the first
    // int3 with SIGTRAP blocked for 100 ms — the spawner inside pthread_create, or a thread it
    // has just started, waiting for a CPU on a loaded machine. Tried again, as a user would.
    let mut busy = 0;
    let mut retried = |what: &str, cycle: usize, op: &mut dyn FnMut() -> Result<(), Error>| loop {
        match op() {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::Busy && busy < CYCLES => {
                eprintln!("cycle {cycle}: {what}: {e} (again)");
                busy += 1;
            }
            Err(e) => panic!("cycle {cycle}: {what}: {e}"),
        }
    };
    for cycle in 0..CYCLES {
        retried("apply", cycle, &mut || apply(pid, &patch, opts).map(drop));
        if cycle % 25 == 0 {
            // The new code really runs while applied.
            let mark = target.count();
            let line =
                target.wait_line_after(mark, |l| l.starts_with("old=") && counts(l).1 > new_seen);
            new_seen = counts(&line).1;
        }
        retried("revert", cycle, &mut || {
            lp_userspace::revert::revert(pid, None, Mode::Nonstop, Duration::from_secs(30))
                .map(drop)
        });
        assert!(target.alive(), "target died in cycle {cycle}");
    }
    let mark = target.count();
    let last = target.wait_line_after(mark, |l| l.starts_with("old="));
    let (old, new, born) = counts(&last);
    assert!(old > 0 && new > 0, "{last}");
    assert!(
        born > counts(&first).2 + 4 * CYCLES as u64,
        "too few threads were born during the cycles: {first} then {last}"
    );
    assert!(target.alive());
    assert!(
        !sigtrap_caught(pid),
        "SIGTRAP is still caught after the last revert: our handler was kept"
    );
    let st = lp_userspace::status::status(Some(pid)).unwrap();
    assert!(st[0].patches.is_empty());
}

/// A thread stopped for the tool's system calls that has SIGTRAP blocked at that moment (here
/// for good: it blocks every signal and sleeps) cannot unblock it while stopped: the switch is
/// busy at once — not refused after the whole timeout as if the thread kept it blocked while
/// running — nothing is written, and the process keeps its own SIGTRAP action.
#[test]
fn e2e_nonstop_a_borrowed_thread_with_sigtrap_blocked_makes_the_switch_busy() {
    const HOLDER: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}

static void *holder(void *arg) {
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_setname_np(pthread_self(), "lp-borrow");
    for (;;) pause();
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    pthread_create(&t, NULL, holder, NULL);
    printf("ready %d\n", getpid());
    struct timespec ts = {0, 1000000};
    for (;;) { printf("value=%d\n", compute(41)); nanosleep(&ts, NULL); }
}
"#;
    std::env::set_var("LIVEPATCH_BORROW_COMM", "lp-borrow");
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "holder", HOLDER, &["-pthread"]);
    let patch = Patch::load(std::path::Path::new(&compute_patch(dir.path(), &exe))).unwrap();
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.child.id() as i32;
    // The holder has named itself once its signals are blocked.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "lp-borrow")
        })
    {
        assert!(std::time::Instant::now() < deadline, "no thread lp-borrow");
        std::thread::sleep(Duration::from_millis(5));
    }
    let opts = ApplyOptions {
        mode: Mode::Nonstop,
        timeout: Duration::from_secs(30),
    };
    let err = apply(pid, &patch, opts).expect_err("the switch went through");
    assert_eq!(err.kind(), lp_userspace::apply::ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("SIGTRAP blocked"), "{err}");
    assert!(target.alive());
    assert!(!sigtrap_caught(pid), "our handler was installed");
    let st = lp_userspace::status::status(Some(pid)).unwrap();
    assert!(st[0].patches.is_empty());
    let mark = target.count();
    let line = target.wait_line_after(mark, |l| l.starts_with("value="));
    assert_eq!(line, "value=42");
}

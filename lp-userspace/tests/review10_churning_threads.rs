//! Review 10, H1: a process whose main thread has exited (pthread_exit) is read through one of
//! its live threads (process/proc_dir.rs, from the s10-leader merge). When its threads come and
//! go — here each lives a few milliseconds and starts its successor — the thread picked exits
//! before or during the read: the process was taken for exited ("does not exist", "exited
//! while being patched", exit 5; "no permission to trace", exit 6) and its state for absent
//! ("has no livepatch applied" after an apply that succeeded, then "already applied"), with a
//! nonstop switch left half-done now and then. Every apply and revert here must succeed.
//!
//! An apply refused as busy ("try again": a thread met inside pthread_create, whose mask
//! blocks SIGTRAP for a moment) is an answer, not a wrong one; its revert is not asked.
//!
//! Ignored: failed on paced bb3d993 (8–11 wrong answers in 30 pairs); after 0046e80 about one
//! wrong answer in 200 pairs is left (a revert during which every thread it had stopped exited
//! says "exited while being patched": `Tracee::thread_gone`), too many for CI. Run it with
//! `--include-ignored`; un-ignore once that is fixed.
//! With the main thread alive (the same program, `pause()` instead of `pthread_exit`) the same
//! pairs all succeed.

mod common;
use common::*;

const CHURN: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static pthread_attr_t detached;
static void *relay(void *arg) {
    for (int i = 0; i < 20; i++) { volatile int v = compute(41); (void)v; usleep(100); }
    pthread_t t;
    pthread_create(&t, &detached, relay, arg);
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    for (long i = 0; i < 3; i++) pthread_create(&t, &detached, relay, (void *)i);
    printf("ready\n");
    pthread_exit(0);
}
"#;

#[test]
#[ignore = "review 10 H1: ~1 wrong answer in 200 pairs left (thread_gone)"]
fn review10_a_process_whose_main_thread_exited_and_whose_threads_come_and_go_is_patched() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "churn", CHURN, &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let mut wrong = Vec::new();
    for i in 0..30 {
        for (k, args) in [
            &[
                "apply",
                &pid,
                &patch,
                "--mode",
                "nonstop",
                "--timeout",
                "60",
            ][..],
            &["revert", &pid][..],
        ]
        .into_iter()
        .enumerate()
        {
            let out = livepatch(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if k == 0 && out.status.code() == Some(3) && stderr.contains("try again") {
                break; // busy: nothing applied, nothing to revert
            }
            if !out.status.success() {
                wrong.push(format!(
                    "{i} {}: {:?} {}",
                    args[0],
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        assert!(target.alive(), "the target died: {wrong:?}");
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {wrong:#?}",
        wrong.len()
    );
}

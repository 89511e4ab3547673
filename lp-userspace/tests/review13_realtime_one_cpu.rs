//! Review 13: the tracer runs SCHED_FIFO (priority 1) since session 13 (`process/realtime.rs`).
//! Confined to one CPU (`taskset -c 0`, or a one-CPU machine) beside a real-time thread of the
//! target that never sleeps, a real-time tracer never got that CPU back once it slept: the
//! kernel keeps a share of a CPU under real-time load for ordinary threads (5%), not for
//! real-time ones of the same priority. The apply never ended, and its own timeout could not
//! end it either (the tracer had to run to look at its clock). An ordinary tracer gets that 5%
//! and ends.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Instant;

/// compute() called in a loop by the main thread; a second thread runs SCHED_FIFO 1 and never
/// sleeps; every thread is confined to CPU 0. "ready nofifo": real-time was refused.
const TARGET: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static volatile int fifo_ok = -1;
static void *hog(void *arg) {
    (void)arg;
    struct sched_param p = {.sched_priority = 1};
    fifo_ok = pthread_setschedparam(pthread_self(), SCHED_FIFO, &p) == 0;
    for (;;) __asm__ volatile("" ::: "memory");
    return 0;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    sched_setaffinity(0, sizeof one, &one);
    pthread_t t;
    pthread_create(&t, NULL, hog, NULL);
    while (fifo_ok < 0) usleep(1000);
    printf("ready %s\n", fifo_ok ? "fifo" : "nofifo");
    struct timespec ts = {0, 20 * 1000000L};
    for (;;) {
        printf("value=%d\n", compute(41));
        nanosleep(&ts, NULL);
    }
}
"#;

#[test]
fn review13_an_apply_confined_to_the_cpu_of_a_real_time_busy_thread_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "hog", TARGET, &["-pthread"]);
    let mut target = Target::spawn(&exe, &[]);
    if target.lines().iter().any(|l| l == "ready nofifo") {
        eprintln!("skipped: this user may not make a thread SCHED_FIFO");
        return;
    }
    let pid = target.pid();
    let mut tool = Command::new("taskset")
        .args(["-c", "0", livepatch_bin()])
        .args(nonstop_apply(&pid, &patch))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run taskset");
    let deadline = Instant::now() + PATIENCE;
    while tool.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            // The busy thread goes first: a starved tool cannot even die of SIGKILL before it
            // gets the CPU.
            let _ = target.child.kill();
            let _ = tool.kill();
            let out = tool.wait_with_output().unwrap();
            panic!(
                "the apply did not end within {PATIENCE:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = tool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.wait_line(|l| l == "value=1041");
    assert!(target.alive());
}

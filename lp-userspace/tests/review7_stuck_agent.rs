//! Review session 7, finding 2: a nonstop switch whose sync agent is left holding a claimed
//! operation (`Stuck`: it cannot be stopped through ptrace within a second) is kept as a killed
//! livepatch leaves it — the tool says "the next apply or revert finishes it". That must hold:
//! the record keeps its write-ahead mark, and the next apply finishes the switch and applies.
//!
//! The agent is starved for real: the target's threads are all on CPU 1 (the agent inherits
//! that affinity), and a watcher thread of the target at SCHED_FIFO 2 (above the agent's 1)
//! takes the agent's futex wake-ups and passes them on; at the entries' last program (the one
//! writing compute's first byte, in the second apply) it lets the agent run a few µs at a time until it is between
//! claiming an operation and counting it done, then spins on CPU 1 for 3 s. The tool runs on
//! CPU 0.

mod common;

use common::*;
use std::process::Command;

const STARVER: &str = r#"
#include "agent_watched.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *watcher(void *arg) {
    (void)arg;
    volatile uint32_t *w = watch_agent_page();
    if (!w) return NULL;
    uint32_t seen = w[0];
    int reverted = 0; /* the setup's revert seen (see the_tests_apply) */
    int armed = 1;
    for (;;) {
        /* REQ (offset 0) is the word the agent waits on; CMD at 8 (3: a program), NOPS at
           212, NEXT at 216 (bit 31: cancelled), COMPLETED at 220, DONE at 4; the operations
           at 256, 32 bytes each: kind (1: write), length, address, data. */
        syscall(SYS_futex, (uint32_t *)&w[0], FUTEX_WAIT, seen, NULL, NULL, 0);
        uint32_t req = w[0];
        if (req == seen) continue;
        seen = req;
        uint32_t n = w[212 / 4];
        int target = the_tests_apply(w, &reverted) && armed;
        syscall(SYS_futex, (uint32_t *)&w[0], FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        if (!target) continue;
        armed = 0;
        for (int tries = 0; tries < 10000; tries++) {
            struct timespec ts = {0, 8000};
            nanosleep(&ts, NULL);
            uint32_t next = w[216 / 4] & 0x7fffffff, completed = w[220 / 4];
            /* A claimed sync needs no resolving (done late, it writes nothing: the tool
               syncs again and goes on); only a claimed write makes the switch stuck. */
            const volatile uint8_t *claimed =
                (const volatile uint8_t *)w + 256 + 32 * (next > 0 ? next - 1 : 0);
            if (next > completed && claimed[0] != 2) {
                double t0 = now();
                while (now() - t0 < 3.0) {
                }
                printf("starved the agent with %u claimed, %u done\n", next, completed);
                break;
            }
            if (completed >= n || w[1] == req || tries == 9999) {
                printf("missed: the agent was never caught mid-operation\n");
                armed = 1; /* the test takes that apply out and makes it again */
                break;
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int n = argc > 1 ? atoi(argv[1]) : 4;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(1, &one);
    if (sched_setaffinity(0, sizeof one, &one) != 0) printf("no CPU 1\n");
    pthread_t t;
    pthread_create(&t, NULL, watcher, NULL);
    for (long i = 0; i < n; i++) pthread_create(&t, NULL, worker, (void *)i);
    printf("ready %d\n", getpid());
    worker((void *)(long)n);
}
"#;

/// `livepatch args...` on CPU 0 (the target's threads are on CPU 1).
fn livepatch_on_cpu0(args: &[&str]) -> std::process::Output {
    Command::new("taskset")
        .args(["-c", "0", livepatch_bin()])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn review7_a_stuck_switch_is_finished_by_the_next_apply() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The trap area made (the watcher finds the agent's page meanwhile).
    let (mut target, pid, patch) = watched_target_with_area(dir.path(), "starver", STARVER);
    target.wait_line(|l| l.starts_with("agent page "));

    // The watcher looks every 8 µs and may miss the agent mid-operation (it says so and lets
    // that apply go through): that apply is taken out and made again, a few times at most.
    let mut misses = 0;
    let (first, stderr) = loop {
        let mark = target.lines().len();
        let first = livepatch_on_cpu0(&["apply", &pid, &patch, "--mode", "nonstop"]);
        let stderr = String::from_utf8_lossy(&first.stderr).into_owned();
        let caught = target.wait_line_after(mark, |l| {
            l.starts_with("starved") || l.starts_with("missed")
        });
        if caught.starts_with("starved") {
            break (first, stderr);
        }
        assert!(first.status.success(), "setup: {caught} (apply: {stderr})");
        misses += 1;
        assert!(misses < 5, "the watcher missed the agent {misses} times");
        livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
        target.expect_steady(2, |l| l.ends_with("value=42"));
    };
    // Stuck: the apply fails, leaving the switch for the next livepatch.
    assert!(!first.status.success(), "{stderr}");
    assert!(
        stderr.contains("the next apply or revert finishes it"),
        "{stderr}"
    );
    // The watcher's spin is over (it printed after it) and the agent ran on.
    target.wait_line(|l| l.ends_with("value=42"));

    // What the tool said: the next apply finishes the switch, and applies the patch. (When
    // the write the agent was caught in was the program's last — every redirect written once
    // it ran on — the next apply records the patch as applied, and then has nothing to do: it
    // says so, "already applied".)
    let again = livepatch_on_cpu0(&["apply", &pid, &patch, "--mode", "nonstop"]);
    let said = String::from_utf8_lossy(&again.stderr);
    let all_written = said.contains("recorded as applied") && said.contains("is already applied");
    assert!(
        again.status.success() || all_written,
        "the apply after the stuck one: {} (status: {})",
        String::from_utf8_lossy(&again.stderr).trim_end(),
        livepatch_ok(&["status", &pid]).trim_end()
    );
    target.expect_steady(5, |l| l.ends_with("value=1041"));
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(5, |l| l.ends_with("value=42"));
    assert!(target.alive());
}

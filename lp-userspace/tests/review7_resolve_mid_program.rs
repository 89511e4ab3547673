//! Review session 7 (coverage, no finding): the cancellation of a program whose agent stopped
//! between claiming an operation and counting it done, and its resolution through ptrace
//! (`SyncAgent::run` → `resolve`), which e2e_agent_writes does not reach (its target stops
//! while the agent waits between requests: nothing is claimed).
//!
//! The target's threads are all on CPU 1 (the agent inherits that affinity); a watcher thread
//! at SCHED_FIFO 2 (above the agent's 1) takes the agent's futex wake-ups and passes them on; in
//! the second apply's entries' last program (the one writing compute's first byte) it lets the
//! agent run a few µs at a time until it is between a claim and its count, then stops the
//! process (SIGSTOP). The tool cancels the program after 100 ms, resolves the claimed operation
//! after another second, and finishes the switch alone; once continued, the process runs the
//! new code, the agent writes nothing more and exits, and nothing stays traced.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STOPPER: &str = r#"
#include "agent_watched.h"

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
            /* A claimed sync needs no resolving (the tool syncs again at once): only a
               claimed write goes through the resolution this test is about. */
            const volatile uint8_t *claimed =
                (const volatile uint8_t *)w + 256 + 32 * (next > 0 ? next - 1 : 0);
            if (next > completed && claimed[0] != 2) {
                /* To the agent itself: it takes the stop on its way back from the current
                   system call (any other thread of CPU 1 would wait behind it). */
                syscall(SYS_tgkill, getpid(), w[16 / 4], SIGSTOP);
                printf("stopped the agent with %u claimed, %u done\n", next, completed);
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

/// The threads of `pid` a tracer holds, each as "TID traced by TRACER".
fn tracers(pid: &str) -> Vec<String> {
    tasks(pid)
        .iter()
        .filter_map(|t| Some(format!("{t} traced by {}", tracer_of(pid, t)?)))
        .collect()
}

#[test]
fn review7_a_program_stopped_mid_operation_is_resolved_and_finished_by_the_tool() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The trap area made (the watcher finds the agent's page meanwhile).
    let (mut target, pid, patch) = watched_target_with_area(dir.path(), "stopper", STOPPER);
    let deadline = Instant::now() + PATIENCE;
    while !target.lines().iter().any(|l| l.starts_with("agent page ")) {
        let other: Vec<String> = target
            .lines()
            .into_iter()
            .filter(|l| !l.starts_with("thread="))
            .collect();
        assert!(
            Instant::now() < deadline,
            "the watcher did not find the area: {other:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let threads = tasks(&pid).len();

    // The watcher looks every 8 µs and may miss the agent mid-operation (it says so and lets
    // that apply go through): that apply is taken out and made again, a few times at most.
    let mut misses = 0;
    let (tool, mark) = loop {
        let mark = target.lines().len();
        let mut tool = Command::new("taskset")
            .args(["-c", "0", livepatch_bin()])
            .args(["apply", &pid, &patch, "--mode", "nonstop"])
            .env("LIVEPATCH_TRACE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + PATIENCE;
        let stopped = loop {
            if job_stopped(&pid) {
                break true;
            }
            if tool.try_wait().unwrap().is_some() && !job_stopped(&pid) {
                break false;
            }
            assert!(
                Instant::now() < deadline,
                "the target never stopped: {:?}",
                target
                    .lines()
                    .into_iter()
                    .filter(|l| !l.starts_with("thread="))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        if stopped {
            break (tool, mark);
        }
        let said = target.wait_line_after(mark, |l| {
            l.starts_with("missed") || l.starts_with("stopped the agent")
        });
        assert!(said.starts_with("missed"), "{said} but the target runs");
        misses += 1;
        assert!(misses < 5, "the watcher missed the agent {misses} times");
        let _ = tool.wait_with_output();
        livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
        target.expect_steady(2, |l| l.ends_with("value=42"));
    };
    let out = tool.wait_with_output().unwrap();
    let trace = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{trace}");
    // The last program went to the agent, which did not finish it: cancelled, and resolved
    // after the claimed operation's second.
    let resolved = trace
        .lines()
        .filter_map(|l| l.split_once("agent ran ")?.1.split_once(" operations +"))
        .filter_map(|(counts, us)| {
            let (done, queued) = counts.split_once(" of ")?;
            let us: u64 = us.trim_end_matches(" us").parse().ok()?;
            Some((
                done.parse::<usize>().ok()?,
                queued.parse::<usize>().ok()?,
                us,
            ))
        })
        .find(|&(done, queued, _)| done < queued);
    assert!(
        resolved.is_some_and(|(_, _, us)| us >= 1_000_000),
        "{resolved:?}: {trace}"
    );
    // SAFETY: kill only sends SIGCONT to the target.
    unsafe { libc::kill(target.child.id() as i32, libc::SIGCONT) };
    let caught = target.wait_line_after(mark, |l| {
        l.starts_with("stopped the agent") || l.starts_with("missed")
    });
    assert!(caught.starts_with("stopped the agent"), "setup: {caught}");
    target.expect_steady(10, |l| l.ends_with("value=1041"));
    // The agent is gone, and nothing of the target stays traced.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tasks(&pid).len() > threads {
        assert!(Instant::now() < deadline, "the agent is still there");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tracers(&pid), Vec::<String>::new());
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(5, |l| l.ends_with("value=42"));
    assert!(target.alive());
}

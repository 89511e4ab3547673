//! Review session 8, B1: which thread nonstop mode borrows (`Tracee::seize_one`).
//!
//! Since c660d8b the look at the threads ends after 300 us when a thread blocked in a system
//! call other than futex used at most 2% of a CPU *during those 300 us*, and ties are broken
//! by the lowest tid. A thread that works half of the time in periods longer than the look (a
//! main loop that computes for 2 ms, then sleeps for 2 ms) looks idle whenever the short look
//! falls in its sleep, and beats a thread that never runs (blocked in a read nobody answers):
//! both used nothing, and the main thread has the lower tid. The busy thread is then held for
//! the whole apply (milliseconds of its own work delayed), which the 2 ms look (before
//! c660d8b) did not do: over 2 ms it shows ~1 ms of CPU.

mod common;

use common::*;
use lp_userspace::process::{with_tracer_thread, ProcessError, Tracee};

/// The main thread computes for 2 ms (a busy loop on the clock) then sleeps 2 ms in
/// nanosleep, for ever: half a CPU. The second thread is blocked in a read of a pipe nobody
/// writes: it never runs. It prints its tid.
const TARGET: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int fds[2];
static volatile int idle_tid;

static void *idle(void *arg) {
    (void)arg;
    char c;
    idle_tid = (int)syscall(SYS_gettid);
    for (;;) read(fds[0], &c, 1);
    return NULL;
}

static long ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(fds) != 0) return 2;
    pthread_t t;
    pthread_create(&t, NULL, idle, NULL);
    while (!idle_tid) usleep(1000);
    printf("ready %d idle %d\n", getpid(), idle_tid);
    struct timespec nap = {0, 2000000};
    volatile unsigned long spin = 0;
    for (;;) {
        long start = ns();
        while (ns() - start < 2000000) spin++;
        nanosleep(&nap, NULL);
    }
}
"#;

/// Waits until thread `tid` of `pid` is blocked in a system call again: the borrow just made
/// woke it (the seize and the detach), and on a loaded machine it may wait long for a CPU to
/// go back to its read; meanwhile it runs, and is no thread to borrow (the CI probe at load
/// ~20 and session 9 at load ~15: the busy main thread borrowed 1 of 40 so).
fn wait_blocked(pid: i32, tid: i32) {
    let deadline = std::time::Instant::now() + PATIENCE;
    let path = format!("/proc/{pid}/task/{tid}/syscall");
    let blocked = |s: String| {
        s.split(' ')
            .next()
            .is_some_and(|nr| nr.parse::<u32>().is_ok())
    };
    while !std::fs::read_to_string(&path).is_ok_and(blocked) {
        assert!(
            std::time::Instant::now() < deadline,
            "thread {tid} not blocked again"
        );
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// The thread a nonstop tracee borrows from `pid`.
fn borrowed(pid: i32) -> i32 {
    with_tracer_thread(|| {
        let t = Tracee::attach_one(pid)?;
        let tids = t.threads();
        t.detach()?;
        Ok::<_, ProcessError>(tids[0])
    })
    .expect("attach_one")
}

#[test]
fn review8_a_thread_busy_half_the_time_is_not_borrowed() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "duty", TARGET, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    let ready = target.wait_line(|l| l.starts_with("ready"));
    let idle: i32 = ready.split_whitespace().nth(3).unwrap().parse().unwrap();
    let rounds = 40;
    let picks: Vec<i32> = (0..rounds)
        .map(|i| {
            wait_blocked(pid, idle);
            // Spread the looks over the main thread's 4 ms cycle.
            std::thread::sleep(std::time::Duration::from_micros(97 * i as u64 % 4000));
            borrowed(pid)
        })
        .collect();
    let busy_picks = picks.iter().filter(|&&p| p == pid).count();
    assert_eq!(
        busy_picks, 0,
        "the main thread, busy half of the time, was borrowed {busy_picks} times of {rounds} \
         (the never-running thread {idle} was there to borrow)"
    );
}

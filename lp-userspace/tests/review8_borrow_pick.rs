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

#[test]
fn review8_a_thread_busy_half_the_time_is_not_borrowed() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "duty", TARGET, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    let ready = target.wait_line(|l| l.starts_with("ready"));
    let idle: i32 = ready.split_whitespace().nth(3).unwrap().parse().unwrap();
    let rounds = 40;
    // The looks spread over the main thread's 4 ms cycle.
    let picks = borrow_picks(pid, rounds, (97, 4000), || wait_blocked(pid, idle));
    let busy_picks = picks.iter().filter(|&&p| p == pid).count();
    assert_eq!(
        busy_picks, 0,
        "the main thread, busy half of the time, was borrowed {busy_picks} times of {rounds} \
         (the never-running thread {idle} was there to borrow)"
    );
}

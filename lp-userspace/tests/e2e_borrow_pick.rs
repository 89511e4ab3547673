//! Which thread nonstop mode borrows (`Tracee::attach_one`, `process/borrow.rs`) in the
//! shapes of ordinary servers: the borrowed thread is stopped for the whole switch, so it must
//! be one the program does not need meanwhile.

mod common;

use common::*;
use lp_userspace::process::{with_tracer_thread, ProcessError, Tracee};

/// The main thread wakes every millisecond (`usleep(1000)`, a timer or housekeeping loop);
/// one thread waits in `poll` for input that never comes; four workers wait on a condition
/// variable (futex). Every thread prints its tid.
const SERVER: &str = r#"
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;
static volatile int started;

static void *poller(void *arg) {
    (void)arg;
#ifdef RT_POLLER
    struct sched_param rt = {.sched_priority = 1};
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &rt) != 0) printf("no SCHED_FIFO\n");
#endif
    printf("poller %ld\n", (long)syscall(SYS_gettid));
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) poll(NULL, 0, -1);
    return NULL;
}

static void *worker(void *arg) {
    (void)arg;
    printf("worker %ld\n", (long)syscall(SYS_gettid));
    pthread_mutex_lock(&lock);
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) pthread_cond_wait(&work, &lock);
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    pthread_create(&t, NULL, poller, NULL);
    for (int i = 0; i < 4; i++) pthread_create(&t, NULL, worker, NULL);
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < 5) usleep(1000);
    printf("ready %d\n", getpid());
    for (;;) usleep(1000);
}
"#;

/// A thread that wakes every millisecond used nothing in most short looks, like the thread
/// waiting in `poll`; it wants a CPU a thousand times a second and would be held for the
/// whole switch: the poller is borrowed, every time (the look ranked the two as equals and
/// took the lower thread id, the main thread, in most looks).
#[test]
fn e2e_borrow_a_thread_waiting_for_input_not_one_that_wakes_every_millisecond() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "server", SERVER, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    target.wait_line(|l| l.starts_with("ready"));
    let poller: i32 = target.wait_line(|l| l.starts_with("poller "))["poller ".len()..]
        .parse()
        .unwrap();
    // A second old: its start-up and the borrows below (each wakes the borrowed thread ~3
    // times) weigh little in the threads' histories, as in a program patched now and then.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let rounds = 40;
    // The looks spread over the main thread's millisecond.
    let picks = borrow_picks(pid, rounds, (137, 1000), || wait_blocked(pid, poller));
    let others: Vec<&i32> = picks.iter().filter(|&&p| p != poller).collect();
    assert!(
        others.is_empty(),
        "threads other than the poller {poller} were borrowed {} times of {rounds}: {others:?} \
         (the main thread is {pid})",
        others.len()
    );
}

/// The same server whose poller runs under SCHED_FIFO (a thread the program wants served at
/// once): it is never borrowed while a thread of the default policy is there — here the main
/// thread and the futex waiters (without the rule it is borrowed every time, as above).
#[test]
fn e2e_borrow_not_a_real_time_thread() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "server", SERVER, &["-pthread", "-DRT_POLLER"]);
    let target = Target::spawn(&exe, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    target.wait_line(|l| l.starts_with("ready"));
    if target.lines().iter().any(|l| l == "no SCHED_FIFO") {
        eprintln!("skipped: SCHED_FIFO refused here");
        return;
    }
    let poller: i32 = target.wait_line(|l| l.starts_with("poller "))["poller ".len()..]
        .parse()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let rounds = 20;
    let picks = borrow_picks(pid, rounds, (137, 1000), || wait_blocked(pid, poller));
    let rt = picks.iter().filter(|&&p| p == poller).count();
    assert_eq!(
        rt, 0,
        "the SCHED_FIFO poller {poller} was borrowed {rt} times of {rounds}"
    );
}

/// Every thread waits in a futex: the main thread in `pthread_join`, four workers on a
/// condition variable; one more worker is busy half of the time in periods longer than a
/// short look (2 ms of computing, then 2 ms blocked on the condition variable with a
/// timeout). Every thread prints its tid.
const JOINER: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;
static volatile int started;

static long ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *worker(void *arg) {
    (void)arg;
    printf("worker %ld\n", (long)syscall(SYS_gettid));
    pthread_mutex_lock(&lock);
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) pthread_cond_wait(&work, &lock);
    return NULL;
}

static void *busy(void *arg) {
    (void)arg;
    printf("busy %ld\n", (long)syscall(SYS_gettid));
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    volatile unsigned long spin = 0;
    pthread_mutex_lock(&lock);
    for (;;) {
        pthread_mutex_unlock(&lock);
        long start = ns();
        while (ns() - start < 2000000) spin++;
        pthread_mutex_lock(&lock);
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 2000000;
        if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
        pthread_cond_timedwait(&work, &lock, &until);
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t, b;
    for (int i = 0; i < 4; i++) pthread_create(&t, NULL, worker, NULL);
    pthread_create(&b, NULL, busy, NULL);
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < 5) usleep(1000);
    printf("ready %d\n", getpid());
    pthread_join(b, NULL);
}
"#;

/// The threads blocked in a futex are equals by class; the one busy half of the time looks
/// idle whenever a short look falls in its wait, and must never be borrowed (review 8, B1,
/// with futex waits: a look that ends early for a futex-blocked thread must not take it).
#[test]
fn e2e_borrow_never_a_thread_busy_half_the_time_among_futex_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "joiner", JOINER, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    target.wait_line(|l| l.starts_with("ready"));
    let busy: i32 = target.wait_line(|l| l.starts_with("busy "))["busy ".len()..]
        .parse()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let rounds = 40;
    // The looks spread over the busy thread's 4 ms cycle.
    let picks = borrow_picks(pid, rounds, (97, 4000), || {});
    let busy_picks = picks.iter().filter(|&&p| p == busy).count();
    assert_eq!(
        busy_picks, 0,
        "the thread busy half of the time ({busy}) was borrowed {busy_picks} times of {rounds}"
    );
}

/// The main thread waits in `pause`; a signal thread blocks every signal and waits in
/// `sigwait`. Both are idle in system calls; prints the signal thread's tid.
const SIGNAL_THREAD: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile int waiter;

static void *waits(void *arg) {
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    waiter = (int)syscall(SYS_gettid);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    int sig;
    for (;;) sigwait(&usr1, &sig);
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    pthread_create(&t, NULL, waits, NULL);
    while (!waiter) usleep(1000);
    printf("ready %d waiter %d\n", getpid(), waiter);
    for (;;) pause();
}
"#;

/// A thread that blocks SIGTRAP is the last choice: borrowed, it cannot unblock it during the
/// switch (a thread inside `pthread_create` blocks every signal for a moment), and the switch
/// would be refused as busy. The idle main thread is borrowed, every time.
#[test]
fn e2e_borrow_not_a_thread_that_blocks_sigtrap() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "sigwaiter", SIGNAL_THREAD, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    let ready = target.wait_line(|l| l.starts_with("ready"));
    let waiter: i32 = ready.split_whitespace().nth(3).unwrap().parse().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let picks = borrow_picks(pid, 20, (0, 0), || {
        wait_blocked(pid, pid);
        wait_blocked(pid, waiter);
    });
    assert!(
        picks.iter().all(|&p| p == pid),
        "the thread blocking SIGTRAP ({waiter}) was borrowed: {picks:?}"
    );
}

/// 600 threads waiting in `poll`, and the main thread in `pause`.
const MANY: &str = r#"
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *waits(void *arg) {
    (void)arg;
    for (;;) poll(NULL, 0, -1);
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_attr_t small;
    pthread_attr_init(&small);
    pthread_attr_setstacksize(&small, 64 * 1024);
    for (int i = 0; i < 600; i++) {
        pthread_t t;
        if (pthread_create(&t, &small, waits, NULL) != 0) return 2;
    }
    printf("ready %d\n", getpid());
    for (;;) pause();
}
"#;

/// The look keeps two descriptors open per thread it looks at: a process with more threads
/// than half the usual descriptor limit (1024) is borrowed from all the same (the tracee's
/// own files, opened during the look, still open), and nonstop apply works on it.
#[test]
fn e2e_borrow_from_a_process_with_600_threads() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "many", MANY, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    target.wait_line(|l| l.starts_with("ready"));
    // The limit the tool usually runs with, whatever this test runner was given.
    let limit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    let picked = with_tracer_thread(|| {
        // SAFETY: setrlimit reads the struct it is given; lowering our own limit is allowed.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        let t = Tracee::attach_one(pid)?;
        let tids = t.threads();
        t.detach()?;
        Ok::<_, ProcessError>(tids[0])
    })
    .expect("attach_one on 601 threads");
    assert!(
        std::fs::metadata(format!("/proc/{pid}/task/{picked}")).is_ok(),
        "borrowed {picked}, not a thread of {pid}"
    );
}

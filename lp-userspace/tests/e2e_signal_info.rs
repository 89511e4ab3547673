//! A signal that comes while the tool holds a thread reaches the program's handler with the
//! siginfo it was sent with: a `sigqueue()`'s value and sender, a POSIX timer's code and value.
//!
//! The tool cannot let a thread it uses run a handler, so a signal that thread is about to take
//! is held back and sent again once the thread runs its own code (process/held_signal.rs).
//! Sent again with `tgkill` (before), the handler saw `si_code` SI_TKILL, the tool's pid, and
//! no value: a program using sigqueue() for IPC lost its data.
//!
//! The target's main thread (named lp-borrow) waits in read(); it alone takes SIGUSR1,
//! SIGRTMIN and SIGRTMIN+1 (its worker blocks them: a process-directed signal waits for the
//! main thread), whose SA_SIGINFO handler prints every run: "got SIG CODE VALUE PID UID" (for
//! a timer's signal PID is the timer id, UID the overrun). It is the thread the tool borrows
//! for its system calls in both modes (stop mode: the main thread; nonstop mode: the only
//! thread blocked in a call other than futex, and LIVEPATCH_BORROW_COMM where a test sets it).
//! - Held: the tool is stopped (`LIVEPATCH_DEBUG_STOP=remote-syscall`) with the main thread
//!   stopped for its first guarded remote system call; the test sends sigqueue(SIGRTMIN,
//!   4242) and kill(SIGUSR1), sees both pending, lets the tool go: the thread meets them on its
//!   way into our system call, and the tool must hold them and send them again.
//! - Stream: apply/revert cycles while a sender queues SIGRTMIN with the values 1, 2, 3...
//!   every 200 µs and a timer sends SIGRTMIN+1 every 3 ms: every value arrives exactly once as
//!   SI_QUEUE from the sender, in the order sent, every timer signal as SI_TIMER with the
//!   timer's value. This one also meets the signals the borrowed thread takes while it starts
//!   nonstop's sync agent (`run_start_up`'s `held`).
//!
//! Against the code before held_signal.rs all four failed (8 of 8 runs): the held SIGRTMIN came
//! as SI_TKILL from the tool, value 0; the streams lost 3 (stop) and 146-187 (nonstop) values
//! and 6-45 timer signals came as SI_TKILL. The order check failed in nonstop mode (3 of 3
//! runs, 3-6 values late) until the sync-agent start-up's signals joined the thread's others
//! (`Tracee::hold`): they were sent again ahead of older ones.

mod common;
use common::*;
use lp_userspace::process::observe;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TARGET: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int __attribute__((noipa)) compute(int x) { int r = x + 1; if (x > 1000000) r = x * 5; return r; }

/* Writes `what` and the numbers in `n` as one line (write(2): the handler prints too). */
static void say(const char *what, const long *n, int k) {
    char buf[160];
    size_t len = strlen(what);
    memcpy(buf, what, len);
    for (int i = 0; i < k; i++) {
        char digits[24];
        int d = 0;
        long v = n[i];
        unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;
        do { digits[d++] = '0' + u % 10; u /= 10; } while (u);
        buf[len++] = ' ';
        if (v < 0) buf[len++] = '-';
        while (d) buf[len++] = digits[--d];
    }
    buf[len++] = '\n';
    ssize_t w = write(1, buf, len);
    (void)w;
}

/* si_pid/si_uid share their places with a timer's si_timerid/si_overrun. */
static void on_signal(int sig, siginfo_t *si, void *ctx) {
    (void)ctx;
    int saved = errno;
    long n[5] = {sig, si->si_code, si->si_value.sival_int, si->si_pid, si->si_uid};
    say("got", n, 5);
    errno = saved;
}

/* Calls compute(41) every 20 ms, asleep in a futex in between. */
static void *worker(void *arg) {
    (void)arg;
    sem_t never;
    sem_init(&never, 0, 0);
    for (;;) {
        long v = compute(41);
        say("value", &v, 1);
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_nsec += 20 * 1000 * 1000;
        if (t.tv_nsec >= 1000000000) { t.tv_sec++; t.tv_nsec -= 1000000000; }
        sem_timedwait(&never, &t);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int sigs[3] = {SIGUSR1, SIGRTMIN, SIGRTMIN + 1};
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO;
    sigset_t mine, old;
    sigemptyset(&mine);
    for (int i = 0; i < 3; i++) {
        sigaction(sigs[i], &sa, NULL);
        sigaddset(&mine, sigs[i]);
    }
    /* The worker inherits the block; the main thread unblocks them again. */
    pthread_sigmask(SIG_BLOCK, &mine, &old);
    pthread_t w;
    if (pthread_create(&w, NULL, worker, NULL)) return 1;
    pthread_setname_np(w, "worker");
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_setname_np(pthread_self(), "lp-borrow");
    if (argc > 1 && strcmp(argv[1], "timer") == 0) {
        struct sigevent ev;
        memset(&ev, 0, sizeof ev);
        ev.sigev_notify = SIGEV_SIGNAL;
        ev.sigev_signo = SIGRTMIN + 1;
        ev.sigev_value.sival_int = 77;
        timer_t t;
        struct itimerspec every = {{0, 3000000}, {0, 3000000}};
        if (timer_create(CLOCK_MONOTONIC, &ev, &t) || timer_settime(t, 0, &every, NULL)) return 2;
    }
    int p[2];
    if (pipe(p)) return 3;
    long pid = getpid();
    say("ready", &pid, 1);
    for (;;) {
        char c;
        ssize_t r = read(p[0], &c, 1); /* nobody writes: only a signal (EINTR) ends it */
        (void)r;
    }
}
"#;

/// `sigq PID SIG FIRST COUNT GAP_US`: sigqueue(PID, SIG) with the values FIRST, FIRST+1...,
/// COUNT times (0: until SIGTERM), GAP_US apart; then prints "sent N".
const SENDER: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }

int main(int argc, char **argv) {
    if (argc != 6) return 2;
    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    pid_t pid = atoi(argv[1]);
    int sig = atoi(argv[2]);
    long first = atol(argv[3]), count = atol(argv[4]), gap = atol(argv[5]);
    long n = 0;
    while (!stop && (count == 0 || n < count)) {
        union sigval v;
        v.sival_int = (int)(first + n);
        if (sigqueue(pid, sig, v) != 0) {
            if (errno == EAGAIN) { usleep(1000); continue; } /* the queue is full: later */
            perror("sigqueue");
            return 1;
        }
        n++;
        if (gap) usleep(gap);
    }
    printf("sent %ld\n", n);
    return 0;
}
"#;

const SI_TIMER: i64 = -2;

/// One run of the target's handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Got {
    sig: i32,
    code: i64,
    value: i64,
    /// si_pid (a timer's signal: the timer id).
    pid: i64,
    /// si_uid (a timer's signal: the overrun).
    uid: i64,
}

fn handler_runs(target: &Target) -> Vec<Got> {
    target
        .lines()
        .iter()
        .filter_map(|l| {
            let n: Vec<i64> = l
                .strip_prefix("got ")?
                .split(' ')
                .map(|f| f.parse().unwrap())
                .collect();
            Some(Got {
                sig: n[0] as i32,
                code: n[1],
                value: n[2],
                pid: n[3],
                uid: n[4],
            })
        })
        .collect()
}

/// The target, the patch (compute(41): 42 becomes 1041) and the sender, built in `dir`.
fn build(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let exe = executable_from_source(dir, "target", TARGET, &["-pthread"]);
    let sender = executable_from_source(dir, "sigq", SENDER, &[]);
    let obj = object(dir, "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir, &exe, &obj, &[], "p.lp");
    (exe, patch, sender)
}

/// Starts the sender (see [`SENDER`]) of `count` values from `first` to `pid`.
fn sender(exe: &Path, pid: i32, sig: i32, first: i64, count: u64, gap_us: u64) -> Child {
    Command::new(exe)
        .args([pid as i64, sig as i64, first, count as i64, gap_us as i64].map(|a| a.to_string()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the sender")
}

/// Waits for the sender to end and returns how many signals it sent.
fn sent_by(child: Child) -> u64 {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "sender failed: {text}");
    text.trim()
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("sender said {text:?}"))
}

/// The target's output after the patch: compute(41) returns 1041.
fn expect_patched(target: &Target, pid: i32) {
    target.wait_line_after(target.count(), |l| l == "value 1041");
    let status = status_json(&pid.to_string());
    assert_eq!(
        status[0]["patches"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
}

/// The "held" scenario (see the module documentation) in `mode`.
fn signals_held_by_the_tool(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch, sigq) = build(dir.path());
    let target = Target::spawn(&exe, &[]);
    let pid = target.child.id() as i32;
    target.wait_line(|l| l == "value 42");
    let patch_s = patch.display().to_string();
    let tool = stop_tool_at(
        &["apply", &pid.to_string(), &patch_s, "--mode", mode],
        "remote-syscall",
    );
    let tool_pid = tool.id() as i32;
    // The main thread is the one held for the tool's system call.
    assert_eq!(
        observe::tracer_pid(pid, pid),
        tool_pid,
        "{mode}: the main thread is not the one the tool borrowed"
    );
    let worker = observe::tasks(pid)
        .into_iter()
        .find(|&t| t != pid)
        .expect("a worker");
    if mode == "nonstop" {
        assert_eq!(observe::tracer_pid(pid, worker), 0, "nonstop traces one");
    }
    let before = handler_runs(&target).len();
    let rtmin = libc::SIGRTMIN();
    let sender = sender(&sigq, pid, rtmin, 4242, 1, 0);
    let sender_pid = sender.id() as i64;
    assert_eq!(sent_by(sender), 1);
    // SAFETY: kill only sends a signal to the target process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    // Both wait for the main thread (the worker blocks them), which the tool holds.
    let deadline = Instant::now() + PATIENCE;
    while !(observe::signal_in(pid, pid, rtmin, &["ShdPnd"])
        && observe::signal_in(pid, pid, libc::SIGUSR1, &["ShdPnd"]))
    {
        assert!(
            Instant::now() < deadline,
            "the signals never became pending"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(handler_runs(&target).len(), before, "a handler ran early");
    // SAFETY: kill only sends a signal to the tool we started.
    assert_eq!(unsafe { libc::kill(tool_pid, libc::SIGCONT) }, 0);
    let out = tool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{mode}: apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    expect_patched(&target, pid);
    // Some more of the target's life: a signal sent twice would show now.
    let mark = target.count();
    for k in 0..5 {
        target.wait_line_after(mark + k, |l| l.starts_with("value"));
    }
    let runs: Vec<Got> = handler_runs(&target)[before..].to_vec();
    let queued: Vec<&Got> = runs.iter().filter(|g| g.sig == rtmin).collect();
    // SAFETY: getuid has no arguments and cannot fail.
    let uid = i64::from(unsafe { libc::getuid() });
    let want = Got {
        sig: rtmin,
        code: i64::from(libc::SI_QUEUE),
        value: 4242,
        pid: sender_pid,
        uid,
    };
    assert_eq!(
        queued,
        vec![&want],
        "{mode}: the sigqueue()d SIGRTMIN must reach the handler once, as it was sent \
         (SI_QUEUE {}, value 4242, from the sender {sender_pid}); handler runs: {runs:?}",
        libc::SI_QUEUE
    );
    // kill()'s SI_USER cannot be sent again by another process (the kernel refuses): it comes
    // back as tgkill's SI_TKILL. Exactly once all the same.
    let usr1: Vec<&Got> = runs.iter().filter(|g| g.sig == libc::SIGUSR1).collect();
    assert_eq!(usr1.len(), 1, "{mode}: SIGUSR1 once: {runs:?}");
    assert!(
        [libc::SI_USER, libc::SI_TKILL]
            .map(i64::from)
            .contains(&usr1[0].code),
        "{mode}: {runs:?}"
    );
    assert_eq!(runs.len(), 2, "{mode}: handler runs: {runs:?}");
}

#[test]
fn e2e_stop_mode_keeps_the_siginfo_of_a_signal_it_held() {
    signals_held_by_the_tool("stop");
}

#[test]
fn e2e_nonstop_keeps_the_siginfo_of_a_signal_it_held() {
    signals_held_by_the_tool("nonstop");
}

/// Apply/revert cycles in `mode` under the stream of the module documentation.
fn signal_stream_while_patching(mode: &str, cycles: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch, sigq) = build(dir.path());
    let target = Target::spawn(&exe, &["timer"]);
    let pid = target.child.id() as i32;
    let pid_s = pid.to_string();
    let patch_s = patch.display().to_string();
    let rtmin = libc::SIGRTMIN();
    let sender = sender(&sigq, pid, rtmin, 1, 0, 200);
    let sender_pid = sender.id() as i64;
    for cycle in 0..cycles {
        for args in [
            &["apply", &pid_s, &patch_s, "--mode", mode][..],
            &["revert", &pid_s, "--mode", mode],
        ] {
            let out = Command::new(livepatch_bin())
                .args(args)
                .env("LIVEPATCH_BORROW_COMM", "lp-borrow")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{mode} cycle {cycle}: {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // SAFETY: kill only sends a signal to the sender we started.
    assert_eq!(unsafe { libc::kill(sender.id() as i32, libc::SIGTERM) }, 0);
    let sent = sent_by(sender);
    assert!(sent > 0, "no signal sent");
    let deadline = Instant::now() + PATIENCE;
    let queued = |runs: &[Got]| runs.iter().filter(|g| g.sig == rtmin).count() as u64;
    while queued(&handler_runs(&target)) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Some more of the target's life: a signal sent twice would show now.
    let mark = target.count();
    target.wait_line_after(mark, |l| l.starts_with("value"));
    target.wait_line_after(target.count(), |l| l.starts_with("value"));
    let runs = handler_runs(&target);
    let mut values: BTreeMap<i64, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for g in runs.iter().filter(|g| g.sig == rtmin) {
        *values.entry(g.value).or_default() += 1;
        if g.code != i64::from(libc::SI_QUEUE) || g.pid != sender_pid {
            wrong.push(*g);
        }
    }
    // Queued signals of one number are taken in the order they were sent.
    let order: Vec<i64> = runs
        .iter()
        .filter(|g| g.sig == rtmin && g.code == i64::from(libc::SI_QUEUE))
        .map(|g| g.value)
        .collect();
    let out_of_order: Vec<(i64, i64)> = order
        .windows(2)
        .filter(|w| w[1] < w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    let timer: Vec<&Got> = runs.iter().filter(|g| g.sig == rtmin + 1).collect();
    let timer_id = timer.iter().find(|g| g.code == SI_TIMER).map(|g| g.pid);
    let wrong_timer: Vec<&&Got> = timer
        .iter()
        .filter(|g| g.code != SI_TIMER || g.value != 77 || Some(g.pid) != timer_id)
        .collect();
    eprintln!(
        "{mode}: {sent} queued signals sent, {} received; {} timer signals ({} overruns)",
        queued(&runs),
        timer.len(),
        timer.iter().map(|g| g.uid).sum::<i64>()
    );
    let missing: Vec<i64> = (1..=sent as i64)
        .filter(|v| !values.contains_key(v))
        .collect();
    let not_once: Vec<(&i64, &usize)> = values.iter().filter(|(_, &n)| n != 1).collect();
    // Every problem at once: which kinds of signal came changed tells the path that lost it.
    let mut problems = Vec::new();
    if !wrong.is_empty() {
        problems.push(format!(
            "{} of {sent} sigqueue()d signals reached the handler changed (want SI_QUEUE from \
             the sender {sender_pid}), e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        ));
    }
    if !missing.is_empty() || !not_once.is_empty() || values.len() as u64 != sent {
        problems.push(format!(
            "{} values lost (first: {:?}); values not received once: {not_once:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    if !out_of_order.is_empty() {
        problems.push(format!(
            "{} values came after a later one (later, earlier: {:?})",
            out_of_order.len(),
            &out_of_order[..out_of_order.len().min(5)]
        ));
    }
    if timer.is_empty() {
        problems.push("the timer never fired".to_string());
    }
    if !wrong_timer.is_empty() {
        problems.push(format!(
            "{} of {} timer signals changed (want SI_TIMER, value 77, one timer), e.g. {:?}",
            wrong_timer.len(),
            timer.len(),
            &wrong_timer[..wrong_timer.len().min(3)]
        ));
    }
    assert!(problems.is_empty(), "{mode}: {}", problems.join("; "));
}

#[test]
fn e2e_stop_mode_keeps_the_siginfo_of_a_signal_stream() {
    signal_stream_while_patching("stop", 10);
}

#[test]
fn e2e_nonstop_keeps_the_siginfo_of_a_signal_stream() {
    signal_stream_while_patching("nonstop", 10);
}

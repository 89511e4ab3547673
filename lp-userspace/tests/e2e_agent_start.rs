//! The sync agent's start-up (nonstop mode, `SyncAgent::start` in sync_agent.rs): the tool sets
//! the borrowed thread's masks itself (PTRACE_SETSIGMASK) and steps it through one system call,
//! the clone. Whatever happens, the thread goes back to its own code with its own mask, no
//! signal is lost, and no handler of the program runs on the agent.
//!
//! The target's main thread (named lp-borrow: the thread the tool borrows) keeps SIGUSR1 and
//! SIGUSR2 blocked and waits in `ppoll` with a mask that lets SIGUSR1 through (the kernel puts
//! the thread's own mask back when the call returns): so SIGUSR1, sent to the process or to
//! the thread, is taken by that thread inside `ppoll` only. Its worker keeps both blocked. Each
//! turn it prints `value=V mask=M` (M: its mask, signals 1–64, as the thread sees it after the
//! call); the handler prints `got TID` (the thread it ran on).
//!
//! - Killed: the tool is stopped after each step of the start-up (`agent-start.N`, see
//!   `start_point`), SIGUSR1 is sent to the borrowed thread, and the tool is killed. The thread
//!   must run on (`value=42`), with its own mask, take that SIGUSR1 once, and a SIGUSR1 sent to
//!   the process then must reach it (not the agent a clone made, which exits once its tool is
//!   gone); the process has its own threads only again; the next apply and revert work.
//! - Cycles: nonstop apply/revert cycles while SIGUSR1 is sent to the process every 2 ms: every
//!   one is handled by the main thread, whose mask stays its own.
//! - Stopped: in a process stopped by SIGSTOP the agent would stop too, and answer nothing:
//!   none is started, whether the main thread is borrowed or its worker (the look at the
//!   threads' states starts with the main thread).

mod common;
use common::*;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const TARGET: &str = r#"
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int __attribute__((noipa)) compute(int x) { int r = x + 1; if (x > 1000000) r = x * 5; return r; }

/* "got TID\n" with write(2) only (async-signal-safe). */
static void on_usr1(int sig) {
    (void)sig;
    char buf[32] = "got ";
    char digits[16];
    long tid = syscall(SYS_gettid);
    int n = 0, k = 4;
    do { digits[n++] = '0' + tid % 10; tid /= 10; } while (tid);
    while (n) buf[k++] = digits[--n];
    buf[k++] = '\n';
    write(1, buf, k);
}

static void *worker(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "lp-worker");
    volatile int sink;
    for (;;) { sink = compute(41); usleep(200); }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t own, in_wait;
    sigemptyset(&own);
    sigaddset(&own, SIGUSR1);
    sigaddset(&own, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &own, NULL);
    pthread_t w;
    pthread_create(&w, NULL, worker, NULL);
    prctl(PR_SET_NAME, "lp-borrow");
    sigemptyset(&in_wait);
    sigaddset(&in_wait, SIGUSR2);
    printf("ready\n");
    for (;;) {
        struct timespec t = {0, 20 * 1000 * 1000};
        ppoll(NULL, 0, &t, &in_wait);
        sigset_t now;
        pthread_sigmask(SIG_BLOCK, NULL, &now);
        unsigned long bits = 0;
        for (int s = 1; s <= 64; s++)
            if (sigismember(&now, s)) bits |= 1UL << (s - 1);
        printf("value=%d mask=%lx\n", compute(41), bits);
    }
}
"#;

/// The main thread's own mask as it prints it: SIGUSR1 and SIGUSR2.
fn own_mask() -> String {
    format!(
        "mask={:x}",
        (1u64 << (libc::SIGUSR1 - 1)) | (1u64 << (libc::SIGUSR2 - 1))
    )
}

/// `livepatch args...` (the borrowed thread forced to lp-borrow) run until it stops itself at
/// `point`; returned stopped there.
/// The target, built in `dir` as `name` with its patch, started and steady (`value=42` with its
/// own mask): (target, its pid, as a number, the patch, its mask, its number of threads).
struct Started {
    target: Target,
    pid: String,
    pid_n: i32,
    patch: String,
    mask: String,
    threads: usize,
}

fn start(dir: &std::path::Path, name: &str) -> Started {
    let (exe, patch) = compute_target_and_patch(dir, name, TARGET, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let pid_n: i32 = pid.parse().unwrap();
    let mask = own_mask();
    target.expect_steady(2, |l| l == format!("value=42 {mask}"));
    let threads = tasks(&pid).len();
    Started {
        target,
        pid,
        pid_n,
        patch,
        mask,
        threads,
    }
}

fn tool_stopped_at(args: &[&str], point: &str) -> Child {
    stop_tool_at_with(args, point, &[("LIVEPATCH_BORROW_COMM", "lp-borrow")])
}

/// How many `got TID` lines the target printed, and whether each came from `tid`.
fn handled(target: &Target, tid: &str) -> (usize, Vec<String>) {
    let got: Vec<String> = target
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("got "))
        .collect();
    let elsewhere = got
        .iter()
        .filter(|l| l.as_str() != format!("got {tid}"))
        .cloned()
        .collect();
    (got.len(), elsewhere)
}

/// Waits until the target printed `n` `got` lines in all, then a few more turns, and checks
/// that there are exactly `n`, every one from thread `tid`.
fn expect_handled(target: &Target, tid: &str, n: usize, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while handled(target, tid).0 < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} SIGUSR1 handled",
            handled(target, tid).0
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mark = target.count();
    target.wait_line_after(mark, |l| l.starts_with("value="));
    target.wait_line_after(target.count(), |l| l.starts_with("value="));
    let (count, elsewhere) = handled(target, tid);
    assert_eq!(count, n, "{what}: a SIGUSR1 handled twice");
    assert!(
        elsewhere.is_empty(),
        "{what}: handled elsewhere: {elsewhere:?}"
    );
}

/// Waits until the process has `n` threads again (an agent whose tool is gone exits at its
/// next futex timeout, 10 ms).
fn expect_threads(pid: &str, n: usize, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while tasks(pid).len() != n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} threads, want {n}",
            tasks(pid).len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn send(pid: i32, tid: Option<i32>) {
    // SAFETY: plain signal-sending system calls to the target we started.
    let r = unsafe {
        match tid {
            Some(t) => libc::syscall(libc::SYS_tgkill, pid, t, libc::SIGUSR1) as i32,
            None => libc::kill(pid, libc::SIGUSR1),
        }
    };
    assert_eq!(r, 0, "SIGUSR1 to {pid}/{tid:?}");
}

#[test]
fn e2e_agent_start_killed_after_each_step_leaves_the_thread_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let Started {
        mut target,
        pid,
        pid_n,
        patch,
        mask,
        threads,
    } = start(dir.path(), "agent_start");
    let mut sent = 0;
    for step in 1..=6 {
        let what = format!("killed at agent-start.{step}");
        let mut tool =
            tool_stopped_at(&nonstop_apply(&pid, &patch), &format!("agent-start.{step}"));
        // Pending while the tool holds the thread: blocked from step 2 on, or not dequeued.
        send(pid_n, Some(pid_n));
        sent += 1;
        tool.kill().unwrap();
        tool.wait().unwrap();
        // To the process: only the main thread takes it (in ppoll), never the agent.
        send(pid_n, None);
        sent += 1;
        assert!(target.alive(), "{what}: the target died");
        expect_handled(&target, &pid, sent, &what);
        target.expect_steady(3, |l| l == format!("value=42 {mask}"));
        expect_threads(&pid, threads, &what);
    }
    // The next invocation takes the half-started apply out and applies; a revert follows.
    let out = Command::new(livepatch_bin())
        .args(nonstop_apply(&pid, &patch))
        .env("LIVEPATCH_BORROW_COMM", "lp-borrow")
        .env("LIVEPATCH_TRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "apply: {stderr}");
    assert!(
        stderr.contains("sync agent Some("),
        "no agent started: {stderr}"
    );
    target.expect_steady(3, |l| l == format!("value=1041 {mask}"));
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == format!("value=42 {mask}"));
    expect_threads(&pid, threads, "after the apply and revert");
}

#[test]
fn e2e_agent_start_keeps_the_borrowed_threads_mask_and_signals() {
    let dir = tempfile::tempdir().unwrap();
    let Started {
        target,
        pid,
        pid_n,
        patch,
        mask,
        threads,
    } = start(dir.path(), "agent_cycles");
    // SIGUSR1 to the process every 2 ms while the cycles run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                send(pid_n, None);
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    for cycle in 0..8 {
        for args in [
            &nonstop_apply(&pid, &patch)[..],
            &["revert", &pid, "--mode", "nonstop", "--timeout", "60"],
        ] {
            let out = Command::new(livepatch_bin())
                .args(args)
                .env("LIVEPATCH_BORROW_COMM", "lp-borrow")
                .env("LIVEPATCH_TRACE", "1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "cycle {cycle}: {args:?}: {stderr}");
            assert!(
                stderr.contains("sync agent Some("),
                "cycle {cycle}: no agent started: {stderr}"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    // Signals of one kind sent while one is pending merge into it: at most `sent` handled.
    let mark = target.count();
    target.wait_line_after(mark, |l| l.starts_with("value="));
    target.wait_line_after(target.count(), |l| l.starts_with("value="));
    let (count, elsewhere) = handled(&target, &pid);
    assert!(elsewhere.is_empty(), "handled elsewhere: {elsewhere:?}");
    assert!(count > 0 && count <= sent, "{count} handled of {sent} sent");
    // Every turn of the main thread saw its own mask, the whole time.
    let wrong: Vec<String> = target
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("value=") && !l.ends_with(&mask))
        .collect();
    assert!(
        wrong.is_empty(),
        "the main thread's mask changed: {wrong:?}"
    );
    target.expect_steady(3, |l| l == format!("value=42 {mask}"));
    expect_threads(&pid, threads, "after the cycles");
}

/// `livepatch args...` with the borrowed thread forced to `borrow` and its trace on; checks
/// that it succeeds and returns its "sync agent" trace line.
fn agent_line(args: &[&str], borrow: &str) -> String {
    let out = Command::new(livepatch_bin())
        .args(args)
        .env("LIVEPATCH_BORROW_COMM", borrow)
        .env("LIVEPATCH_TRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    assert!(
        stderr.contains("borrowed thread ["),
        "{args:?}: not a nonstop switch: {stderr}"
    );
    stderr
        .lines()
        .find(|l| l.contains("nonstop sync agent"))
        .unwrap_or_else(|| panic!("{args:?}: no sync agent line: {stderr}"))
        .to_string()
}

#[test]
fn e2e_agent_start_is_skipped_in_a_stopped_process() {
    let dir = tempfile::tempdir().unwrap();
    let Started {
        target,
        pid,
        pid_n,
        patch,
        mask,
        threads,
    } = start(dir.path(), "agent_stopped");
    // SAFETY: kill only sends a signal to the target we started.
    assert_eq!(unsafe { libc::kill(pid_n, libc::SIGSTOP) }, 0);
    let deadline = Instant::now() + PATIENCE;
    while !tasks(&pid)
        .iter()
        .all(|t| task_stat(&pid, t, 3).is_some_and(|s| s == "T"))
    {
        assert!(Instant::now() < deadline, "the target did not stop");
        std::thread::sleep(Duration::from_millis(2));
    }
    for borrow in ["lp-borrow", "lp-worker"] {
        for args in [
            &nonstop_apply(&pid, &patch)[..],
            &["revert", &pid, "--mode", "nonstop", "--timeout", "60"],
        ] {
            let line = agent_line(args, borrow);
            assert!(
                line.contains("sync agent None"),
                "{borrow} borrowed, {args:?}: {line}"
            );
            assert_eq!(tasks(&pid).len(), threads, "{borrow}: a thread was added");
        }
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid_n, libc::SIGCONT) }, 0);
    target.expect_steady(3, |l| l == format!("value=42 {mask}"));
    // Running again: the agent starts.
    let line = agent_line(&nonstop_apply(&pid, &patch), "lp-worker");
    assert!(line.contains("sync agent Some("), "{line}");
    target.expect_steady(3, |l| l == format!("value=1041 {mask}"));
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == format!("value=42 {mask}"));
    expect_threads(&pid, threads, "after the apply and revert");
}

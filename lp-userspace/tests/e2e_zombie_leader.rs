//! A process whose main thread has exited while its other threads run on: a server's `main`
//! starts its workers, then calls `pthread_exit`. The main thread stays a zombie until the
//! whole process ends, and /proc/PID (which is the main thread) shows neither the address
//! space nor anything else the main thread no longer holds. livepatch reads them through a
//! live thread, never seizes or borrows the main thread, and takes the process for exited only
//! once every thread is gone: apply, status and revert work in both modes. A process whose
//! every thread has exited, not reaped yet, is refused as exited.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// argv[1] workers, worker I printing "wI=compute(41)" every 20 ms, sleeping in between, or
/// with argv[2] == "busy" calling it all the time (never blocked: no worker is a better thread
/// to borrow than the main thread would be); the main thread prints "ready PID" and exits with
/// pthread_exit.
const TARGET: &str = r#"
#include "compute_loop.h"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char labels[16][8];

static void *worker(void *a) { print_compute_forever(a); return NULL; }

static long ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *busy(void *a) {
    long last = ns();
    for (;;) {
        int v = compute(41);
        if (ns() - last > 20000000L) {
            printf("%s=%d\n", (char *)a, v);
            last = ns();
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int n = argc > 1 ? atoi(argv[1]) : 3;
    int is_busy = argc > 2 && !strcmp(argv[2], "busy");
    pthread_t t;
    for (int i = 0; i < n && i < 16; i++) {
        snprintf(labels[i], sizeof labels[i], "w%d", i);
        if (pthread_create(&t, NULL, is_busy ? busy : worker, labels[i])) {
            perror("pthread_create");
            return 2;
        }
    }
    printf("ready %d\n", getpid());
    pthread_exit(NULL);
}
"#;

const WORKERS: usize = 2;

/// Waits until the threads of `pid` other than the main thread are `others` in number and the
/// main thread's state is Z (it has exited; the process is not reaped).
fn wait_main_exited(pid: &str, others: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let main_z = task_stat(pid, pid, 3).is_some_and(|s| s == "Z");
        let live = tasks(pid).iter().filter(|t| *t != pid).count();
        if main_z && live == others {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "main thread state {:?}, {live} other threads",
            task_stat(pid, pid, 3)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every worker prints `value`, then until each has printed 3 lines more, and
/// asserts that none printed another value after its first `value`: each worker switched once,
/// for good. (Per worker: a line of one computed before the switch may be written after
/// another's first new line.)
fn expect_switched(target: &Target, value: u32) {
    let mark = target.count();
    let mine = |w: usize| {
        let prefix = format!("w{w}=");
        let lines = target.lines();
        lines[mark..]
            .iter()
            .filter(|l| l.starts_with(&prefix))
            .cloned()
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + PATIENCE;
    for w in 0..WORKERS {
        let want = format!("w{w}={value}");
        loop {
            let lines = mine(w);
            if let Some(first) = lines.iter().position(|l| *l == want) {
                if lines.len() > first + 3 {
                    assert!(
                        lines[first..].iter().all(|l| *l == want),
                        "worker {w} went back: {lines:?}"
                    );
                    break;
                }
            }
            assert!(Instant::now() < deadline, "worker {w}: {lines:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts the target with its main thread exited, its workers `busy` or not (at the lowest
/// priority then: the tool must get CPU time beside them); returns it with its patch.
fn start(dir: &std::path::Path, busy: bool) -> (Target, String) {
    let (exe, patch) = compute_target_and_patch(dir, "zombie_main", TARGET, &["-pthread"]);
    let target = if busy {
        Target::spawn_niced(&exe, &[&WORKERS.to_string(), "busy"])
    } else {
        Target::spawn(&exe, &[&WORKERS.to_string()])
    };
    wait_main_exited(&target.pid(), WORKERS);
    expect_switched(&target, 42);
    (target, patch)
}

/// Apply, status and revert in `mode` on a process whose main thread has exited, its workers
/// `busy` or not: the workers print the new value, then the old one again; the process runs on
/// as it was, nobody traces it.
fn apply_status_revert(mode: &str, busy: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut target, patch) = start(dir.path(), busy);
    let pid = target.pid();

    let out = livepatch_ok(&["apply", &pid, &patch, "--mode", mode, "--timeout", "60"]);
    assert!(out.contains(&format!("{mode} mode")), "{out}");
    expect_switched(&target, 1041);

    let st = status_json(&pid);
    let patches = st[0]["patches"].as_array().unwrap();
    assert_eq!(patches.len(), 1, "{st}");
    assert_eq!(patches[0]["mode"], mode);
    assert_eq!(patches[0]["functions"][0]["name"], "compute");
    let all = livepatch_ok(&["status"]);
    assert!(all.contains(&format!("process {pid} ")), "{all}");

    livepatch_ok(&["revert", &pid, "--mode", mode, "--timeout", "60"]);
    expect_switched(&target, 42);
    assert_eq!(status_json(&pid)[0]["patches"].as_array().unwrap().len(), 0);

    assert!(target.alive(), "the target died");
    wait_main_exited(&pid, WORKERS);
    for tid in tasks(&pid) {
        assert_eq!(tracer_of(&pid, &tid), None, "thread {tid} still traced");
    }
}

#[test]
fn e2e_exited_main_thread_stop_mode() {
    apply_status_revert("stop", false);
}

#[test]
fn e2e_exited_main_thread_nonstop_mode() {
    apply_status_revert("nonstop", false);
}

/// Every live thread runs (none is blocked in a system call): the main thread, were it looked
/// at, would be the borrow's pick. It is not: an exited thread cannot be seized.
#[test]
fn e2e_exited_main_thread_busy_workers_nonstop_mode() {
    apply_status_revert("nonstop", true);
}

/// Every thread has exited (the process was killed) and the process is not reaped yet: apply
/// and revert in both modes are refused with one line saying it exited (exit 5), at once.
#[test]
fn e2e_a_process_whose_every_thread_exited_is_refused_as_exited() {
    let dir = tempfile::tempdir().unwrap();
    let (mut target, patch) = start(dir.path(), false);
    let pid = target.pid();
    // SIGKILL, not reaped: Child::kill does not wait.
    target.child.kill().unwrap();
    wait_main_exited(&pid, 0);
    for mode in ["stop", "nonstop"] {
        let started = Instant::now();
        let (code, line) =
            livepatch_err(&["apply", &pid, &patch, "--mode", mode, "--timeout", "60"]);
        assert_eq!(code, 5, "{line}");
        assert!(line.contains(&format!("process {pid} exited")), "{line}");
        let (code, line) = livepatch_err(&["revert", &pid, "--mode", mode]);
        assert_eq!(code, 5, "{line}");
        assert!(line.contains(&format!("process {pid} exited")), "{line}");
        // Not after a wait for threads that will never come.
        assert!(started.elapsed() < Duration::from_secs(10), "{mode}: slow");
    }
    // Still not reaped: the refusals were about a zombie, not a process that is gone.
    assert_eq!(task_stat(&pid, &pid, 3).as_deref(), Some("Z"));
}

/// A worker sleeps inside sleepy() for ever (a patch of sleepy() is busy), another prints
/// "v=compute(41)" every 20 ms; the main thread waits for SIGUSR1, then calls pthread_exit.
const EXITS_LATER: &str = r#"
#include "compute_loop.h"
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

int __attribute__((noipa)) sleepy(int x) { for (;;) sleep(1000); return x; }
static void *sleeper(void *a) { return (void *)(long)sleepy((int)(long)a); }
static void *printer(void *a) { (void)a; print_compute_forever("v"); return NULL; }

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
    pthread_t t;
    pthread_create(&t, NULL, sleeper, NULL);
    pthread_create(&t, NULL, printer, NULL);
    printf("ready %d\n", getpid());
    int sig;
    sigwait(&s, &sig);
    pthread_exit(NULL);
}
"#;

/// The main thread exits while a stop-mode apply that retries (its patch's function is busy)
/// traces it: the apply ends at its timeout as busy, as it would have with the main thread
/// alive — it does not wait for ever for a stop of the exited main thread (a main thread's
/// exit is reported to its tracer only when the whole process ends) — and the process then
/// takes a patch as any other.
#[test]
fn e2e_main_thread_exiting_during_a_stop_mode_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) =
        compute_target_and_patch(dir.path(), "exits_later", EXITS_LATER, &["-pthread"]);
    let busy_obj = object(dir.path(), "new_busy.c", "busy.o", &[]);
    let (busy, _) = pack(dir.path(), &exe, &busy_obj, &[], "busy.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "v=42");
    let mut apply = std::process::Command::new(livepatch_bin())
        .args([
            "apply",
            &pid,
            busy.to_str().unwrap(),
            "--mode",
            "stop",
            "--timeout",
            "3",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while tracer_of(&pid, &pid).is_none() {
        assert!(
            Instant::now() < deadline,
            "livepatch never traced the main thread"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill() takes plain integers; the target blocks SIGUSR1 and waits for it.
    assert_eq!(
        unsafe { libc::kill(target.child.id() as i32, libc::SIGUSR1) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while apply.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = apply.kill();
            panic!("the apply hung after the main thread exited");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = apply.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("is in function sleepy"), "{stderr}");
    wait_main_exited(&pid, 2);
    target.expect_steady(3, |l| l == "v=42");
    for tid in tasks(&pid) {
        assert_eq!(tracer_of(&pid, &tid), None, "thread {tid} still traced");
    }
    livepatch_ok(&["apply", &pid, &patch, "--mode", "stop"]);
    target.expect_steady(3, |l| l == "v=1041");
    livepatch_ok(&["revert", &pid, "--mode", "stop"]);
    target.expect_steady(3, |l| l == "v=42");
}

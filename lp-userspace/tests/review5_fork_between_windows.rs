//! Review session 5: a process forked while a nonstop apply with dispatches runs.
//! - Forked between the callers' window and the entries' (the callers already lead to the
//!   dispatch, the entries untouched): the child keeps the old code everywhere (its flag is
//!   clear), its copy of the state says "applying", and the next apply in the child takes
//!   that out and applies.
//! - Forked in the entries' window (their int3s in place): the child gets the final bytes and
//!   the flag (finish_children), so it runs the new code like its parent.
//!
//! The target forks from a worker thread on SIGUSR1 (its main thread sleeps: the tool borrows
//! it and keeps it stopped for the whole switch). The tool is stopped at a sync meanwhile.

mod common;
use common::*;
use std::time::Duration;

const TARGET: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int __attribute__((noipa)) work(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 7;
    return r;
}
int __attribute__((noipa)) filler(int x) {
    volatile int v[64];
    for (int i = 0; i < 64; i++) v[i] = x * i;
    return v[x & 63] + v[(x >> 3) & 63] + v[(x >> 6) & 63] + v[(x >> 9) & 63];
}
int __attribute__((noipa)) tail(int x) { return work(x + 100000); }
int (*volatile work_ptr)(int) = work;

static volatile sig_atomic_t fork_asked;
static void on_usr1(int sig) { (void)sig; fork_asked = 1; }

static void *loop(void *arg) {
    (void)arg;
    const char *who = "parent";
    struct timespec ts = {0, 2000000L};
    for (;;) {
        if (fork_asked) {
            fork_asked = 0;
            if (fork() == 0) {
                who = "child";
                printf("child %d\n", getpid());
            }
        }
        printf("%s direct=%d tail=%d pointer=%d\n", who, work(41), tail(20), work_ptr(41));
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGUSR1, on_usr1);
    pthread_t t;
    pthread_create(&t, NULL, loop, NULL);
    printf("ready %d\n", getpid());
    for (;;) pause();
}
"#;

const ORIGINAL: &str = "direct=42 tail=100021 pointer=42";
const NEW: &str = "direct=1041 tail=101020 pointer=1041";

fn unfinished(pid: &str) -> Option<String> {
    status_json(pid)[0]["patches"]
        .as_array()?
        .iter()
        .find_map(|p| p["unfinished"].as_str().map(str::to_string))
}

/// Forks the target while the apply is stopped at `point`; returns the child's pid.
fn fork_during(target: &Target, patch: &str, point: &str) -> String {
    let pid = target.pid();
    let mut tool = stop_tool_at(&["apply", &pid, patch, "--mode", "nonstop"], point);
    let mark = target.count();
    // SAFETY: signals to processes this test started.
    unsafe { libc::kill(pid.parse().unwrap(), libc::SIGUSR1) };
    let line = target.wait_line_after(mark, |l| l.starts_with("child "));
    let child = line.split_whitespace().nth(1).unwrap().to_string();
    std::thread::sleep(Duration::from_millis(50));
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    let status = tool.wait().unwrap();
    assert!(status.success(), "apply stopped at {point} failed");
    child
}

/// The `n` lines of `who` ("parent" or "child") after its next one (which may have been
/// computed before the change just made), all equal to `want`.
fn expect_who(target: &Target, who: &str, n: usize, want: &str, ctx: &str) {
    let prefix = format!("{who} ");
    let mut mark = target.count();
    for k in 0..=n {
        target.wait_line_after(mark, |l| l.starts_with(&prefix));
        let lines = target.lines();
        let (i, l) = lines
            .iter()
            .enumerate()
            .skip(mark)
            .find(|(_, l)| l.starts_with(&prefix))
            .unwrap();
        if k > 0 {
            assert_eq!(*l, format!("{who} {want}"), "{ctx}");
        }
        mark = i + 1;
    }
}

fn kill(pid: &str) {
    // SAFETY: a child process of the test's target.
    unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
}

#[test]
fn review5_a_child_forked_between_the_windows_keeps_the_old_code_and_is_finished_next() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("t.c");
    std::fs::write(&src, TARGET).unwrap();
    let exe = dir.path().join("t");
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-Wl,--build-id",
            src.to_str().unwrap(),
            "-o",
            exe.to_str().unwrap(),
            "-lpthread",
        ],
    );
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let patch = patch.display().to_string();
    let target = Target::spawn(&exe, &[]);
    expect_who(&target, "parent", 3, ORIGINAL, "check 1");

    // The callers' window's last sync (its first bytes written): the entries come next.
    let child = fork_during(&target, &patch, "nonstop-sync:3");
    expect_who(&target, "parent", 3, NEW, "check 2");
    expect_who(&target, "child", 3, ORIGINAL, "check 3");
    assert_eq!(unfinished(&child).as_deref(), Some("applying"));
    // In the child, the next apply takes the half-switched patch out, then applies it.
    livepatch_ok(&["apply", &child, &patch, "--mode", "nonstop"]);
    assert_eq!(unfinished(&child), None);
    expect_who(&target, "child", 3, NEW, "check 4");
    kill(&child);
    livepatch_ok(&["revert", &target.pid(), "--mode", "nonstop"]);
    expect_who(&target, "parent", 3, ORIGINAL, "check 5");

    // The entries' window (their int3s written, not yet synced): the child is finished.
    let child = fork_during(&target, &patch, "nonstop-sync:4");
    expect_who(&target, "parent", 3, NEW, "check 6");
    expect_who(&target, "child", 3, NEW, "check 7");
    kill(&child);
}

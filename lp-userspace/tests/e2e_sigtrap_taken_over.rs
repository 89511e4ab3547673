//! A program that sets its own SIGTRAP action while a nonstop switch has ours installed keeps
//! it: the uninstall gives the previous action back and reads the one it replaces in the same
//! call, and when that is not ours, puts it back at once (session 11: before, a look at the
//! action came first and the restore after the wait).

mod common;
use common::*;

/// compute() called by two workers, which print their tids; SIGTRAP handled by on_trap; a
/// SIGUSR1 makes the thread that takes it set on_trap2 instead (and say so). The main thread
/// shows the action on each line.
const TARGET: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static void on_trap(int s) { (void)s; }
static void on_trap2(int s) { (void)s; }
static void on_usr1(int s) {
    (void)s;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_trap2;
    sigaction(SIGTRAP, &sa, NULL);
    static const char said[] = "taken over\n";
    write(1, said, sizeof said - 1);
}
static void *worker(void *arg) {
    (void)arg;
    printf("worker %ld\n", (long)syscall(SYS_gettid));
    for (;;) { volatile int v = compute(41); (void)v; usleep(200); }
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTRAP, on_trap);
    signal(SIGUSR1, on_usr1);
    pthread_t t;
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    for (;;) {
        struct sigaction sa;
        sigaction(SIGTRAP, NULL, &sa);
        printf("value=%d action=%s\n", compute(41),
               sa.sa_handler == on_trap ? "prog" : sa.sa_handler == on_trap2 ? "prog2" : "other");
        usleep(20000);
    }
}
"#;

#[test]
fn e2e_a_sigtrap_action_the_program_sets_during_a_nonstop_switch_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "target", TARGET, &["-pthread"]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42 action=prog");
    let worker: i32 = target
        .wait_line(|l| l.starts_with("worker "))
        .trim_start_matches("worker ")
        .parse()
        .unwrap();

    // The switch done, our action still installed: the program takes SIGTRAP over.
    let tool = stop_tool_at(&nonstop_apply(&pid, &patch), "uninstall");
    let mark = target.lines().len();
    // SAFETY: tgkill sends SIGUSR1 (handled by the target) to one of its threads.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            pid.parse::<i32>().unwrap(),
            worker,
            libc::SIGUSR1,
        )
    };
    assert_eq!(sent, 0);
    target.wait_line_after(mark, |l| l == "taken over");
    // SAFETY: kill sends SIGCONT to the stopped tool, a child of this test.
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    let out = tool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Patched, and the program's own new action kept (not ours, not its first one).
    target.expect_steady(3, |l| l == "value=1041 action=prog2");
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "value=42 action=prog2");
    assert!(target.alive());
}

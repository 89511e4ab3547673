//! Review 11: the sync agent's calls before the first int3 are one program (nonstop.rs
//! `early_calls`): our SIGTRAP action, the membarrier registration and a look at each handled
//! signal's action; after the switch the uninstall reads our action back and restores the
//! program's. The tool killed (SIGKILL) at each `agent-call.NR:k` stop point — the early
//! program's points all come before it is asked for, the uninstall's after the switch — leaves
//! a target that runs on, with its own SIGTRAP action or ours (which chains to it); the next
//! nonstop apply and revert then work and give the program its own action back.

mod common;
use common::*;

/// compute() called by two workers; handlers for SIGTRAP, SIGUSR1 and SIGUSR2 (the early
/// program looks at the latter two); the SIGTRAP action shown on each line.
const TARGET: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static void on_trap(int s) { (void)s; }
static void on_usr(int s) { (void)s; }
static void *worker(void *arg) {
    (void)arg;
    for (;;) { volatile int v = compute(41); (void)v; usleep(200); }
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTRAP, on_trap);
    signal(SIGUSR1, on_usr);
    signal(SIGUSR2, on_usr);
    pthread_t t;
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    for (;;) {
        struct sigaction sa;
        sigaction(SIGTRAP, NULL, &sa);
        printf("value=%d action=%s\n", compute(41),
               sa.sa_handler == on_trap ? "prog" : sa.sa_handler == SIG_DFL ? "dfl" : "ours");
        usleep(20000);
    }
}
"#;

#[test]
fn review11_the_tool_killed_at_each_agent_call_leaves_a_target_the_next_livepatch_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "target", TARGET, &["-pthread"]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42 action=prog");
    // 13: rt_sigaction (our action, then the looks at SIGUSR1 and SIGUSR2, then the
    // uninstall's read and its restore); 324: membarrier (the registration).
    for point in [
        "agent-call.13:1",
        "agent-call.324:1",
        "agent-call.13:2",
        "agent-call.13:3",
        "agent-call.13:4",
        "agent-call.13:5",
    ] {
        let mut tool = stop_tool_at(&nonstop_apply(&pid, &patch), point);
        tool.kill().unwrap();
        tool.wait().unwrap();
        assert!(target.alive(), "the target died after a kill at {point}");
        target.expect_steady(2, |l| {
            l.starts_with("value=") && (l.ends_with("action=prog") || l.ends_with("action=ours"))
        });
        // The next livepatch finishes or takes out what the killed one left, applies, reverts.
        let out = livepatch(&nonstop_apply(&pid, &patch));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("already applied"),
            "{point}: the next apply: {err}"
        );
        target.expect_steady(2, |l| l.starts_with("value=1041"));
        livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
        target.expect_steady(3, |l| l == "value=42 action=prog");
    }
    assert!(target.alive());
}

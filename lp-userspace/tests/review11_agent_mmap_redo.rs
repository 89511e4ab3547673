//! Review 11: the sync agent makes the apply's patch memory mapping (`Early::map_patch`, one
//! program: mmap then the mprotects). An mmap the agent made but did not count (its process
//! stopped right after the call) is made again through ptrace (`SyncAgent::calls` answers
//! None, as for a call never made: see review 10's M1 for the SIGTRAP action). With
//! MAP_FIXED_NOREPLACE the second mmap fails (EEXIST: the agent's mapping is there), the apply
//! picks another gap and maps there — and the agent's mapping stays in the target for good:
//! a populated anonymous mapping of the patch memory's size, left by every such apply.
//!
//! The moment is made exact as in review10_agent_call_redo: a helper traces the agent from
//! system call to system call and, at the exit of its mmap, stops the target (SIGSTOP).

mod common;
use common::*;

/// compute() called by two workers (no handlers of its own).
const TARGET: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static void *worker(void *arg) {
    (void)arg;
    for (;;) { volatile int v = compute(41); (void)v; usleep(200); }
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    for (;;) { printf("value=%d\n", compute(41)); usleep(20000); }
}
"#;

/// The target's anonymous private mappings (start-end, protection), the stack and heap aside.
fn anonymous(pid: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().count() == 5)
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn review11_an_agent_mmap_made_but_not_answered_leaves_no_mapping_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "target", TARGET, &["-pthread"]);
    let helper = executable_from_source(dir.path(), "helper", AGENT_STOPPER, &[]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    // A first apply and revert: the area and the state mapping stay from now on.
    livepatch_ok(&nonstop_apply(&pid, &patch));
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(2, |l| l == "value=42");
    let before = anonymous(&pid);

    // The tool stopped with the patch memory's program loaded (agent-call.9), the agent
    // waiting; the helper stops the process at the exit of the agent's mmap.
    let tool = stop_tool_at(&nonstop_apply(&pid, &patch), "agent-call.9");
    let line = stop_the_agent_after_call(&helper, &pid, &tool, 9);
    assert!(
        line.starts_with("made "),
        "the agent did not make our mmap: {line}"
    );
    let out = tool.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // SAFETY: as above (the target is a child of this test).
    unsafe { libc::kill(target.child.id() as i32, libc::SIGCONT) };
    assert!(out.status.success(), "apply failed: {stderr}");
    target.expect_steady(2, |l| l == "value=1041");
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(2, |l| l == "value=42");

    let after = anonymous(&pid);
    let left: Vec<&String> = after.iter().filter(|m| !before.contains(m)).collect();
    assert!(
        left.is_empty(),
        "mappings left behind: {left:?} (apply: {stderr})"
    );
    assert!(target.alive());
}

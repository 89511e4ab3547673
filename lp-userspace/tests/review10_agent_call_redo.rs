//! Review 10: a system call of ours that the sync agent made but did not answer for (its process
//! stopped right after the call, before the agent counted it) is made again through ptrace
//! (`SyncAgent::call` → `None`, see `resolve_claim`: "redoing one whose count was not yet
//! stored"). A write or a sync made twice is the same; our SIGTRAP action's swap is not: its
//! second `rt_sigaction` returns our own action as the "previous" one, and `install` took that
//! for the program changing its action meanwhile — the apply failed with "busy: ... its SIGTRAP
//! action (changed while we installed ours)" (exit 3) though nothing but our agent had touched
//! it.
//!
//! The moment is made exact by a helper process that traces the agent from system call to
//! system call (no breakpoint, no single step: their forced SIGTRAP would reset the action of a
//! signal the agent blocks) and, at the exit of its `rt_sigaction`, stops the target
//! (SIGSTOP) and lets the agent go: it stays right after the call, its count not stored.

mod common;
use common::*;

/// The target: `fixtures/proc/sigtrap_action.c` (its SIGTRAP action shown on each line).
const TARGET: &str = include_str!("fixtures/proc/sigtrap_action.c");

#[test]
fn review10_an_agent_call_made_but_not_answered_is_not_taken_for_the_program_changing_sigtrap() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "target", TARGET, &["-pthread"]);
    let helper = executable_from_source(dir.path(), "helper", AGENT_STOPPER, &[]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42 action=prog");

    // The tool stopped with our action's rt_sigaction loaded in the agent's page (the second
    // agent-call.13 is the install's: the first, since paced 9ed698a, is the agent's read of
    // the program's action, whose redo is harmless), the agent waiting for it.
    let tool = stop_tool_at(&nonstop_apply(&pid, &patch), "agent-call.13:2");
    let line = stop_the_agent_after_call(&helper, &pid, &tool, 13);
    assert_eq!(
        line.trim(),
        "made 0",
        "the agent did not make our rt_sigaction"
    );
    let out = tool.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // SAFETY: as above (the target is a child of this test).
    unsafe { libc::kill(target.child.id() as i32, libc::SIGCONT) };

    assert!(
        !stderr.contains("changed while we installed ours"),
        "our own call made twice taken for the program's change: {stderr}"
    );
    assert!(out.status.success(), "apply failed: {stderr}");
    target.expect_steady(3, |l| l == "value=1041 action=prog");
    assert!(target.alive());
}

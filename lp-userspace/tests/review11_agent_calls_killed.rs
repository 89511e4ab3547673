//! Review 11: the sync agent's calls before the first int3 are one program (nonstop.rs
//! `calls_before_int3`): our SIGTRAP action, the membarrier registration and a look at each
//! handled signal's action; after the switch the uninstall gives the program's action back
//! (and reads what it replaced) in one call. The tool killed (SIGKILL) at each `agent-call.NR:k` stop point — the early
//! program's points all come before it is asked for, the uninstall's after the switch — leaves
//! a target that runs on, with its own SIGTRAP action or ours (which chains to it); the next
//! nonstop apply and revert then work and give the program its own action back.

mod common;
use common::*;

/// The target: `fixtures/proc/sigtrap_action.c` (its SIGTRAP action shown on each line).
const TARGET: &str = include_str!("fixtures/proc/sigtrap_action.c");

#[test]
fn review11_the_tool_killed_at_each_agent_call_leaves_a_target_the_next_livepatch_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "target", TARGET, &["-pthread"]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42 action=prog");
    // 13: rt_sigaction (our action, then the looks at SIGUSR1 and SIGUSR2, then the
    // uninstall's); 324: membarrier (the registration).
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

//! Review session 6, finding 2: a nonstop apply killed right before its flag store
//! (`LIVEPATCH_DEBUG_STOP=dispatch-flag`: every site leads to its dispatch) is rolled forward
//! by the next invocation ("recorded as applied"), but its direct callers stay on the branch
//! to the dispatch while the state records their final branch (straight to the new code).
//! A later patch of the same function verifies those callers against the state and refuses
//! the whole apply, in either mode: "call site main+0x.. is not what the patch expects ...
//! changed by someone else; nothing written" (exit 4) — for as long as the process lives,
//! unless the patch below is reverted and applied again.

mod common;
use common::*;

#[test]
fn review6_2_a_patch_stacks_on_one_whose_killed_apply_was_rolled_forward() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let n1 = object(dir.path(), "new_work.c", "n1.o", &[]);
    let n2 = object(dir.path(), "new_work2.c", "n2.o", &[]);
    let (p1, _) = pack(dir.path(), &exe, &n1, &[], "p1.lp");
    let (p2, _) = pack(dir.path(), &exe, &n2, &[], "p2.lp");
    let (p1, p2) = (p1.display().to_string(), p2.display().to_string());
    let mut target = Target::spawn(&exe, &["2"]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "direct=42 tail=100021 pointer=42");

    // Killed with every site at its dispatch, the flag not yet set.
    let mut tool = stop_tool_at(&["apply", &pid, &p1, "--mode", "nonstop"], "dispatch-flag");
    tool.kill().unwrap();
    tool.wait().unwrap();
    assert!(target.alive());
    // The next invocation rolls it forward.
    let out = livepatch(&["apply", &pid, &p1, "--mode", "nonstop"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recorded as applied"),
        "{out:?}"
    );
    target.expect_steady(3, |l| l == "direct=1041 tail=101020 pointer=1041");

    // A second patch of work stacks on it (stop mode, then nonstop mode after a revert).
    let out = livepatch(&["apply", &pid, &p2]);
    assert!(
        out.status.success(),
        "a patch stacked on the rolled-forward one was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.expect_steady(3, |l| l == "direct=2041 tail=102020 pointer=2041");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == "direct=1041 tail=101020 pointer=1041");
    let out = livepatch(&["apply", &pid, &p2, "--mode", "nonstop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.expect_steady(3, |l| l == "direct=2041 tail=102020 pointer=2041");
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "direct=42 tail=100021 pointer=42");
    assert!(target.alive());
}

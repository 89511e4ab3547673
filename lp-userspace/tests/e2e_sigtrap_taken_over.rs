//! A program that sets its own SIGTRAP action while a nonstop switch has ours installed keeps
//! it: the uninstall gives the previous action back and reads the one it replaces in the same
//! call, and when that is not ours, puts it back at once (session 11: before, a look at the
//! action came first and the restore after the wait).

mod common;
use common::*;

/// The target: `fixtures/proc/sigtrap_action.c` (its SIGTRAP action shown on each line).
const TARGET: &str = include_str!("fixtures/proc/sigtrap_action.c");

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

//! Review session 5: a nonstop apply (and revert) with direct callers, the tool killed at
//! every sync of its windows and right before the flag store. Until the flag is set no new
//! code may run (every line of the target stays the original one); after it (the callers
//! being pointed on from the dispatch to the new code) only the new code runs; a revert runs
//! the new code until its flag store (after its callers' window), the old code from there on.
//! The target lives, and the next invocation finishes or takes out what was left: the patch
//! then goes in and out as usual.
//!
//! `review5_7_...` failed at paced 297fc25 (finding 7, fixed in fa30afb: the target dies of
//! SIGSEGV when the apply killed in the callers' window is taken out: a thread at tail()'s
//! `jmp work` is sent to that site's trampoline, over which the stubs' .eh_frame was written).
//! `review5_nonstop_...` covers the other points (entries' window, flag, revert) and passes.

mod common;
use common::*;

const ORIGINAL: &str = "direct=42 tail=100021 pointer=42";
const NEW: &str = "direct=1041 tail=101020 pointer=1041";

fn kill_at(args: &[&str], point: &str) {
    let mut tool = stop_tool_at(args, point);
    tool.kill().unwrap();
    tool.wait().unwrap();
}

fn unfinished(pid: &str) -> Option<String> {
    status_json(pid)[0]["patches"]
        .as_array()?
        .iter()
        .find_map(|p| p["unfinished"].as_str().map(str::to_string))
}

fn patches(pid: &str) -> usize {
    status_json(pid)[0]["patches"]
        .as_array()
        .map_or(0, |p| p.len())
}

fn setup() -> (tempfile::TempDir, String, Target) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let patch = patch.display().to_string();
    let target = Target::spawn(&exe, &["2"]);
    target.expect_steady(3, |l| l == ORIGINAL);
    (dir, patch, target)
}

/// Kills `apply` at each of `points`; each time the next apply finishes or takes out what was
/// left, and a revert takes the patch out.
fn killed_applies(target: &mut Target, patch: &str, points: &[(&str, &str)]) {
    let pid = target.pid();
    let apply = ["apply", pid.as_str(), patch, "--mode", "nonstop"];
    for &(point, running) in points {
        kill_at(&apply, point);
        assert!(target.alive(), "apply killed at {point}: the target died");
        // Nothing of the patch runs before the flag, only the patch after it.
        target.expect_steady(5, |l| l == running);
        assert_eq!(unfinished(&pid).as_deref(), Some("applying"), "{point}");
        // The next apply finishes it (every site written: recorded, flag set) or takes it
        // out and applies again.
        let out = livepatch(&apply);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || stderr.contains("already applied"),
            "apply after one killed at {point}: {stderr}"
        );
        assert_eq!(unfinished(&pid), None, "{point}");
        assert_eq!(patches(&pid), 1, "{point}");
        target.expect_steady(5, |l| l == NEW);
        livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
        target.expect_steady(3, |l| l == ORIGINAL);
    }
}

#[test]
fn review5_7_an_apply_killed_in_the_callers_window_is_taken_out_without_killing_the_target() {
    let (_dir, patch, mut target) = setup();
    killed_applies(
        &mut target,
        &patch,
        &[
            ("nonstop-sync:1", ORIGINAL),
            ("nonstop-sync:2", ORIGINAL),
            ("nonstop-sync:3", ORIGINAL),
        ],
    );
}

#[test]
fn review5_7_a_revert_killed_in_the_callers_window_is_completed_without_killing_the_target() {
    let (_dir, patch, mut target) = setup();
    killed_reverts(
        &mut target,
        &patch,
        &[("nonstop-sync:1", NEW), ("nonstop-sync:2", NEW)],
    );
}

#[test]
fn review5_nonstop_apply_and_revert_killed_in_the_entries_window_or_before_the_flag() {
    let (_dir, patch, mut target) = setup();
    // callers.c has two direct callers: one window of them (syncs 1-3), the entries' (4-6),
    // then the callers pointed on to the new code (7-9).
    killed_applies(
        &mut target,
        &patch,
        &[
            ("nonstop-sync:4", ORIGINAL),
            ("nonstop-sync:5", ORIGINAL),
            ("dispatch-flag", ORIGINAL),
            ("nonstop-sync:7", NEW),
            ("nonstop-sync:8", NEW),
        ],
    );
    killed_reverts(
        &mut target,
        &patch,
        &[
            ("nonstop-sync:3", NEW),
            ("nonstop-sync:4", ORIGINAL),
            ("nonstop-sync:5", ORIGINAL),
        ],
    );
}

/// Applies, kills `revert` at each of `points`; each time the next revert completes it.
fn killed_reverts(target: &mut Target, patch: &str, points: &[(&str, &str)]) {
    let pid = target.pid();
    let apply = ["apply", pid.as_str(), patch, "--mode", "nonstop"];
    let revert = ["revert", pid.as_str(), "--mode", "nonstop"];
    for &(point, running) in points {
        livepatch_ok(&apply);
        target.expect_steady(3, |l| l == NEW);
        kill_at(&revert, point);
        assert!(target.alive(), "revert killed at {point}: the target died");
        target.expect_steady(5, |l| l == running);
        assert_eq!(unfinished(&pid).as_deref(), Some("reverting"), "{point}");
        let out = livepatch(&revert);
        assert!(
            out.status.success(),
            "revert after one killed at {point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(patches(&pid), 0, "{point}");
        target.expect_steady(3, |l| l == ORIGINAL);
    }
}

//! Review session 5: patches stacked across modes — a nonstop patch (sites through dispatches,
//! a flag) under or over a stop-mode one (sites straight to the new code) — with direct
//! callers, reverted in either mode. Every state shows the version on top in all three kinds
//! of call (direct `call`, tail `jmp`, pointer), status counts both callers as retargeted, and
//! the reverts restore the version below, then the original.

mod common;
use common::*;

const ORIGINAL: &str = "direct=42 tail=100021 pointer=42";
const NEW: &str = "direct=1041 tail=101020 pointer=1041";
const NEW2: &str = "direct=2041 tail=102020 pointer=2041";

/// Retargeted callers of each function of each patch, as `status --json` reports them.
fn direct_callers(pid: &str) -> Vec<u64> {
    status_json(pid)[0]["patches"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["functions"].as_array().unwrap().clone())
        .map(|f| f["call_sites"].as_u64().unwrap_or(0))
        .collect()
}

fn run(lower: &str, upper: &str, revert_upper: &str, revert_lower: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let o1 = object(dir.path(), "new_work.c", "n1.o", &[]);
    let o2 = object(dir.path(), "new_work2.c", "n2.o", &[]);
    let (p1, _) = pack(dir.path(), &exe, &o1, &[], "p1.lp");
    let (p2, _) = pack(dir.path(), &exe, &o2, &[], "p2.lp");
    let (p1, p2) = (p1.display().to_string(), p2.display().to_string());
    let target = Target::spawn(&exe, &["2"]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == ORIGINAL);
    livepatch_ok(&["apply", &pid, &p1, "--mode", lower]);
    target.expect_steady(3, |l| l == NEW);
    livepatch_ok(&["apply", &pid, &p2, "--mode", upper]);
    target.expect_steady(3, |l| l == NEW2);
    assert_eq!(direct_callers(&pid), [2, 2], "{lower} then {upper}");
    livepatch_ok(&["revert", &pid, "--mode", revert_upper]);
    target.expect_steady(3, |l| l == NEW);
    assert_eq!(direct_callers(&pid), [2], "{lower} then {upper}");
    // The lower one again on top of nothing: a new stacked apply over it works as well.
    livepatch_ok(&["apply", &pid, &p2, "--mode", upper]);
    target.expect_steady(3, |l| l == NEW2);
    livepatch_ok(&["revert", &pid, "--mode", revert_upper]);
    target.expect_steady(3, |l| l == NEW);
    livepatch_ok(&["revert", &pid, "--mode", revert_lower]);
    target.expect_steady(3, |l| l == ORIGINAL);
    assert_eq!(direct_callers(&pid), Vec::<u64>::new());
}

#[test]
fn review5_stop_patch_over_a_nonstop_one() {
    run("nonstop", "stop", "nonstop", "stop");
}

#[test]
fn review5_nonstop_patch_over_a_stop_one() {
    run("stop", "nonstop", "stop", "nonstop");
}

#[test]
fn review5_nonstop_over_nonstop_reverted_in_stop_mode() {
    run("nonstop", "nonstop", "stop", "stop");
}

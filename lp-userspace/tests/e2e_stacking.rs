//! Stacking on live processes: the same patch twice is refused; a different patch on the same
//! function stacks (newest wins); reverting the top re-exposes the one below; a lower patch
//! cannot be reverted while another stacks on it.

mod common;
use common::*;

fn stacking(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let o1 = object(dir.path(), "new_compute.c", "n1.o", &[]);
    let o2 = object(dir.path(), "new_compute2.c", "n2.o", &[]);
    let (p1, id1) = pack(dir.path(), &exe, &o1, &[], "p1.lp");
    let (p2, id2) = pack(dir.path(), &exe, &o2, &[], "p2.lp");
    assert_ne!(id1, id2);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();

    livepatch_ok(&["apply", &pid, p1.to_str().unwrap(), "--mode", mode]);
    target.expect_steady(2, |l| l == "direct=1041 pointer=1041");

    let (code, line) = livepatch_err(&["apply", &pid, p1.to_str().unwrap(), "--mode", mode]);
    assert_eq!(code, 8, "{line}");
    assert!(line.contains("already applied"), "{line}");
    target.expect_steady(2, |l| l == "direct=1041 pointer=1041");

    livepatch_ok(&["apply", &pid, p2.to_str().unwrap(), "--mode", mode]);
    target.expect_steady(2, |l| l == "direct=2041 pointer=2041");
    let st = status_json(&pid);
    assert_eq!(st[0]["patches"][0]["id"], id1.as_str());
    assert_eq!(st[0]["patches"][1]["id"], id2.as_str());

    let (code, line) = livepatch_err(&["revert", &pid, &id1, "--mode", mode]);
    assert_eq!(code, 9, "{line}");
    assert!(line.contains(&id2) && line.contains("stacked"), "{line}");
    target.expect_steady(2, |l| l == "direct=2041 pointer=2041");

    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.expect_steady(2, |l| l == "direct=1041 pointer=1041");
    livepatch_ok(&["revert", &pid, &id1, "--mode", mode]);
    target.expect_steady(2, |l| l == "direct=42 pointer=42");
    let (code, line) = livepatch_err(&["revert", &pid]);
    assert_eq!(code, 9, "{line}");
    assert!(line.contains("no livepatch applied"), "{line}");
}

#[test]
fn e2e_stacking_and_ordered_revert_stop() {
    stacking("stop");
}

#[test]
fn e2e_stacking_and_ordered_revert_nonstop() {
    stacking("nonstop");
}

//! Review session 6, finding 3: a nonstop switch whose callers' last windows (`flag.then`: an
//! apply's callers pointed on from the dispatch to the new code) find a caller changed by
//! someone else — a uprobe put on it after its first window — fails and rolls back every site
//! it started, that caller included: its first window's plan is rolled back over the probe's
//! `int3`, which is gone afterwards (the probe silently stops firing; the kernel still
//! counts it as installed). The docs promise that a uprobe's int3 is never undone, and this
//! session's recovery fix (3c59e9c) keeps foreign int3s for the same reason.
//!
//! callers.c, nonstop apply stopped at `dispatch-flag` (every site at its dispatch, entries
//! written, the flag not yet set); a real uprobe (tracefs) goes on main's `call work`; the
//! apply goes on. Whatever it does then (going on without that caller, or failing), the
//! probe's int3 must still be there and fire, and the target must print consistent lines.
//! Needs root and tracefs (skipped otherwise).

mod common;
use common::uprobe::{
    assert_probe_kept, byte_at, main_call_of_work, tracefs_missing, Stopped, Uprobe,
};
use common::*;

#[test]
fn review6_3_a_failed_window_never_rolls_back_over_a_uprobe() {
    if tracefs_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let patch = patch.display().to_string();
    let mut target = Target::spawn(&exe, &["2"]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "direct=42 tail=100021 pointer=42");
    let vaddr = main_call_of_work(&exe);
    let site = bias(pid.parse().unwrap(), &exe) + vaddr;
    assert_eq!(byte_at(&pid, site), 0xe8);

    let mut tool = Stopped::at(
        &["apply", &pid, &patch, "--mode", "nonstop"],
        "dispatch-flag",
    );
    let Some(probe) = Uprobe::add("lpreview6", &format!("c6_{pid}"), &exe, vaddr) else {
        eprintln!("cannot add a uprobe: skipped");
        return;
    };
    assert_eq!(byte_at(&pid, site), 0xcc, "the uprobe's int3 is in place");
    // (callers.c's only thread is the one the tool borrowed: stopped until the end.)
    let out = tool.go_on();
    assert_probe_kept(&mut target, &pid, site, &probe, &out, "apply");
    // Whatever the apply did, every line is one version or the other.
    if out.status.success() {
        target.expect_steady(3, |l| l == "direct=1041 tail=101020 pointer=1041");
    } else {
        target.expect_steady(3, |l| l == "direct=42 tail=100021 pointer=42");
    }
}

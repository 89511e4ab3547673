//! Review session 6, finding 6 (the revert side of finding 3): a nonstop revert of a patch
//! stacked on another moves the callers the patch below had retargeted in two steps (to the
//! top patch's dispatch, then, after the flag's store, on to the patch below's code). When a
//! caller was changed by someone else between the two (a uprobe put on it), the second step's
//! window fails and the whole switch is rolled back — that caller included, from its first
//! window: its bytes are written over the probe's `int3`, which silently stops firing (the
//! kernel still counts it as installed). Finding 3's fix (0bbaa2a) covers an apply's second
//! step only (a caller left at a dispatch that stays); a revert cannot leave a caller at the
//! dispatch it frees, but its rollback need not write over the probe either (the site leads
//! to the dispatch, which runs the top patch again once the flag is set back).
//!
//! callers.c, patches below (1000 more) and on top (2000 more), both nonstop; the revert of
//! the top one is stopped at the last sync of its first callers' window (every caller at the
//! top patch's dispatch, the flag still set); a real uprobe goes on main's `call work`; the
//! revert goes on. Whatever it does then, the probe's int3 must still be there and fire, and
//! the target must print consistent lines. Needs root and tracefs (skipped otherwise).

mod common;
use common::uprobe::{
    assert_probe_kept, byte_at, main_call_of_work, tracefs_missing, Stopped, Uprobe,
};
use common::*;

#[test]
fn review6_6_a_failed_stacked_revert_never_rolls_back_over_a_uprobe() {
    if tracefs_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let n1 = object(dir.path(), "new_work.c", "n1.o", &[]);
    let n2 = object(dir.path(), "new_work2.c", "n2.o", &[]);
    let (below, _) = pack(dir.path(), &exe, &n1, &[], "below.lp");
    let (top, _) = pack(dir.path(), &exe, &n2, &[], "top.lp");
    let (below, top) = (below.display().to_string(), top.display().to_string());
    let mut target = Target::spawn(&exe, &["2"]);
    let pid = target.pid();
    let vaddr = main_call_of_work(&exe);
    let site = bias(pid.parse().unwrap(), &exe) + vaddr;
    livepatch_ok(&["apply", &pid, &below, "--mode", "nonstop"]);
    livepatch_ok(&["apply", &pid, &top, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "direct=2041 tail=102020 pointer=2041");

    // Which sync ends the revert's first callers' window (LIVEPATCH_TRACE): a revert, and the
    // top patch applied again.
    let n = revert_syncs_before(&pid, "callers' windows done");
    assert!(n > 0, "no sync before the callers' windows were done");
    target.expect_steady(3, |l| l == "direct=1041 tail=101020 pointer=1041");
    livepatch_ok(&["apply", &pid, &top, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "direct=2041 tail=102020 pointer=2041");

    let mut tool = Stopped::at(
        &["revert", &pid, "--mode", "nonstop"],
        &format!("nonstop-sync:{n}"),
    );
    let Some(probe) = Uprobe::add("lpreview6", &format!("s6_{pid}"), &exe, vaddr) else {
        eprintln!("cannot add a uprobe: skipped");
        return;
    };
    assert_eq!(byte_at(&pid, site), 0xcc, "the uprobe's int3 is in place");
    let out = tool.go_on();
    assert_probe_kept(&mut target, &pid, site, &probe, &out, "revert");
    if out.status.success() {
        target.expect_steady(3, |l| l == "direct=1041 tail=101020 pointer=1041");
    } else {
        target.expect_steady(3, |l| l == "direct=2041 tail=102020 pointer=2041");
    }
}

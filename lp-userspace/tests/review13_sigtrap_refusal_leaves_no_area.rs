//! Review 13: a nonstop apply refused because a thread keeps SIGTRAP blocked leaves the target
//! as it was. Since session 13 the switch's first look at the threads (`FirstLook`, which
//! makes that refusal) is taken while the sync agent maps the patch memory, in the
//! preparation; its refusal was still returned by the switch, after the patch was planned and
//! written, and the switch drops the apply's early agent without taking out the trap area this
//! apply made (a memfd mapping, `livepatch-trap...`): it stayed in a process never patched —
//! what review 11 fixed for the preparation's own refusals.

mod common;
use common::*;

#[test]
fn review13_a_nonstop_apply_refused_for_a_sigtrap_blocker_leaves_no_area() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["trapper.c"], "trapper", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let target = Target::spawn_niced(&exe, &["blocker"]);
    let pid = target.pid();
    let before = maps_of(&pid);
    assert!(!before.contains("livepatch-trap"), "{before}");
    let (code, err) = livepatch_err(&nonstop_apply(&pid, &patch));
    assert_eq!(code, 10, "{err}");
    assert!(err.contains("keeps SIGTRAP blocked"), "{err}");
    assert_no_trap_area_added(&pid, &before);
    // Nothing else of the apply either: no patch recorded, and stop mode still patches it.
    let st = lp_userspace::status::status(Some(target.child.id() as i32)).unwrap();
    assert!(st.iter().all(|p| p.patches.is_empty()), "{st:?}");
    livepatch_ok(&["apply", &pid, &patch, "--timeout", "60"]);
}

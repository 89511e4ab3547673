//! Review session 7, finding 3: the sync agent writes a window's bytes through whatever
//! `/proc/self/mem` names in the target's mount namespace, and the tool counts the window as
//! written on the agent's word. In a target whose /proc is no procfs but holds a writable
//! `self/mem` (a tmpfs here), the writes went into that file: the apply said "applied", the
//! process ran its old code, and the revert then refused ("changed by someone else").
//!
//! What a user must see: the patch in effect after a successful apply (or an apply that fails
//! and changes nothing), and a revert that works.

mod common;

use common::*;
use std::path::Path;

#[test]
fn review7_an_apply_through_a_fake_proc_self_mem_is_in_effect() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["threads.c"], "threads", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let exe = exe.display().to_string();
    // unshare and sh exec: the target keeps the pid we started. Its /proc: a tmpfs with a
    // regular file at self/mem.
    let mut target = Target::spawn(
        Path::new("unshare"),
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs none /proc && mkdir /proc/self && : > /proc/self/mem && exec \"$0\" 4",
            &exe,
        ],
    );
    let pid = target.pid();
    target.expect_steady(5, |l| l.ends_with("value=42"));
    let fake = format!("/proc/{pid}/root/proc/self/mem");
    assert!(
        std::fs::metadata(&fake).is_ok_and(|m| m.is_file()),
        "setup: {fake}"
    );

    let out = livepatch(&["apply", &pid, &patch, "--mode", "nonstop"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        // Applied: in effect.
        let mark = target.count();
        target.wait_line_after(mark + 10, |_| true);
        let recent: Vec<String> = target.lines()[mark + 5..].to_vec();
        assert!(
            recent.iter().all(|l| l.ends_with("value=1041")),
            "the apply said {:?}, but the process runs its old code: {recent:?}",
            String::from_utf8_lossy(&out.stdout).lines().next()
        );
        livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    } else {
        // Refused: nothing changed, nothing recorded.
        assert!(!stderr.contains("panicked"), "{stderr}");
        let status = livepatch_ok(&["status", &pid]);
        assert!(status.contains("no patches applied"), "{stderr}: {status}");
    }
    target.expect_steady(5, |l| l.ends_with("value=42"));
    // Nothing of ours went into the program's file.
    let len = std::fs::metadata(&fake).unwrap().len();
    assert_eq!(len, 0, "bytes of the switch written into {fake}");
    assert!(target.alive());
}

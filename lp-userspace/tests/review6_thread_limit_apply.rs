//! Review session 6, finding 5: under a limit on threads (RLIMIT_NPROC, a cgroup's pids.max)
//! `livepatch apply` panics (exit 101, "failed to spawn thread") instead of the one-line error
//! review session 4 (S9) asked for and `revert` still gives: the per-process lock now creates
//! its socket on a short-lived thread entered into the target's network namespace
//! (`lock_socket`, ebe79ac), with `std::thread::scope`'s `spawn`, which panics when the thread
//! cannot be started. (When the CLI's tracer thread could start but that one cannot, the panic
//! is on the tracer thread and the CLI hangs: finding 4.)
//!
//! As user nobody (root is exempt from RLIMIT_NPROC), with room for the target and the tool's
//! process but no thread more. Fixed: the lock makes its socket without a thread when the
//! target shares our network namespace, and falls back to our namespace when the thread is
//! refused; the apply then either succeeds on the command thread or fails in one line.

mod common;
use common::*;
use std::process::Command;

/// Tasks (threads included: RLIMIT_NPROC counts them) whose real uid is `uid`.
fn tasks_of(uid: u32) -> usize {
    let mut n = 0;
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let real = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next()?.parse::<u32>().ok());
            n += usize::from(real == Some(uid));
        }
    }
    n
}

#[test]
fn review6_5_apply_under_a_thread_limit_is_a_one_line_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    // nobody must read the patch and run the target.
    let mut perms = std::fs::metadata(dir.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(dir.path(), perms).unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let mut perms = std::fs::metadata(&patch).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&patch, perms).unwrap();

    // setpriv execs the target: same pid.
    let target = Target::spawn(
        std::path::Path::new("setpriv"),
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            exe.to_str().unwrap(),
            "20",
        ],
    );
    let pid = target.pid();
    target.expect_steady(2, |l| l == "direct=42 tail=100021 pointer=42");

    // Room for nobody's tasks now (the target's included) and the tool's process: no thread.
    let nproc = format!("--nproc={n}:{n}", n = tasks_of(65534) + 1);
    let out = Command::new("prlimit")
        .args([nproc.as_str(), "setpriv", "--reuid=65534", "--regid=65534"])
        .args(["--clear-groups", livepatch_bin(), "apply", &pid])
        .arg(&patch)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if out.status.success() {
        // The lock needs no thread of its own when the target shares our network namespace
        // (the usual case): the command thread then does the whole apply.
        target.expect_steady(2, |l| l == "direct=1041 tail=101020 pointer=1041");
    } else {
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("livepatch: error: "), "{stderr}");
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        target.expect_steady(2, |l| l == "direct=42 tail=100021 pointer=42");
    }
}

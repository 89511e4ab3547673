//! `livepatch` killed with SIGKILL (the OOM killer, `kill -9`, a CI timeout) while it has a
//! thread of the target borrowed for a remote system call or function call: the target must
//! keep running as it was (review session 3, R2: it died of SIGSEGV, running on from our
//! `syscall` instruction with the tool's registers), and a fresh `livepatch` afterwards works.
//!
//! The tool is stopped at exactly the harmful moment by its debugging hook
//! (`LIVEPATCH_DEBUG_STOP`, see process/stop_point.rs: the borrowed thread stopped with our
//! registers set), then killed.

mod common;
use common::*;
use std::process::Command;

/// Runs `livepatch args...` until it stops itself at `point`, then SIGKILLs it.
fn kill_at(args: &[&str], point: &str) {
    let mut tool = stop_tool_at(args, point);
    tool.kill().unwrap();
    tool.wait().unwrap();
}

fn busy_setup(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let exe = executable(dir, &["busy.c"], "busy", &["-pthread"]);
    let obj = object(dir, "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir, &exe, &obj, &[], "p.lp");
    (exe, patch.display().to_string())
}

#[test]
fn e2e_kill_9_in_a_remote_syscall_leaves_the_target_running() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = busy_setup(dir.path());
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    // Stop mode: the state's memfd_create, its mmap (which the orphaned thread still makes:
    // the next apply finds the state mapping), the patch memory's mmap, an mprotect of the
    // patch code. The borrowed thread (main, inside nanosleep) has our registers each time.
    for point in [
        "remote-syscall:1",
        "remote-syscall.9:1",
        "remote-syscall.9:1",
        "remote-syscall.10:1",
    ] {
        kill_at(&["apply", &pid, &patch], point);
        assert!(
            target.alive(),
            "the target died when the tool was killed at {point}"
        );
        target.expect_steady(3, |l| l == "value=42");
    }
    // A fresh invocation: nothing applied, and the patch goes in and out as usual.
    assert_eq!(
        status_json(&pid)[0]["patches"]
            .as_array()
            .map_or(0, |p| p.len()),
        0
    );
    livepatch_ok(&["apply", &pid, &patch]);
    target.expect_steady(3, |l| l == "value=1041");
    // A revert killed in its munmap of the patch memory (the switch is done): patch reverted.
    kill_at(&["revert", &pid], "remote-syscall.11:1");
    assert!(target.alive(), "the target died when revert was killed");
    target.expect_steady(3, |l| l == "value=42");
}

#[test]
fn e2e_kill_9_in_a_nonstop_membarrier_leaves_the_target_running() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = busy_setup(dir.path());
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    // The preparation's mmap and mprotects of the patch memory (one program of the sync agent,
    // which the apply starts first: nothing is marked yet, the orphaned agent is left), the
    // membarrier registration (before the first int3; made by the sync agent), then the first
    // sync (int3s in place, handled by our trap handler in the target once the tool is gone).
    for (point, marked) in [
        ("agent-call.9:1", false),
        ("agent-call.324:1", true),
        ("nonstop-sync:1", true),
    ] {
        kill_at(&["apply", &pid, &patch, "--mode", "nonstop"], point);
        assert!(
            target.alive(),
            "the target died when the tool was killed at {point}"
        );
        target.expect_steady(3, |l| l == "value=42");
        // The switch was marked in the state before its first int3 (review L5).
        let mark = marked.then_some("applying");
        assert_eq!(unfinished(&pid).as_deref(), mark, "{point}");
    }
    // The next apply (nonstop, as the killed one) takes the half-switched patch out, int3s
    // included, then applies.
    livepatch_ok(&["apply", &pid, &patch, "--mode", "nonstop"]);
    assert_eq!(unfinished(&pid), None);
    assert_eq!(status_json(&pid)[0]["patches"].as_array().unwrap().len(), 1);
    target.expect_steady(3, |l| l == "value=1041");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == "value=42");
}

#[test]
fn e2e_kill_9_in_a_remote_function_call_leaves_the_target_running() {
    // A C++ target: apply registers the patch's unwind information with libgcc's
    // __register_frame, called inside the target on a borrowed thread.
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("catcher");
    let obj = dir.path().join("new_work.o");
    let src = fixture("catcher.cpp").display().to_string();
    let new_src = fixture("new_catcher_work.cpp").display().to_string();
    let exe_s = exe.to_str().unwrap();
    cc(
        "g++",
        &[
            "-O2",
            "-g",
            "-Wl,--build-id",
            &src,
            "-o",
            exe_s,
            "-lpthread",
        ],
    );
    cc(
        "g++",
        &["-O2", "-c", "-fPIC", &new_src, "-o", obj.to_str().unwrap()],
    );
    let (p, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = p.display().to_string();
    let mut target = Target::spawn_niced(&exe, &[]);
    let pid = target.pid();
    // Nonstop mode: four threads throwing through work() could keep a stop-mode switch busy
    // past its timeout on a loaded machine.
    kill_at(&["apply", &pid, &patch, "--mode", "nonstop"], "remote-call");
    assert!(
        target.alive(),
        "the target died when the tool was killed in a remote call"
    );
    // Still computing the old results and catching (a wrong register would abort it).
    let counts = |l: &str| -> Vec<u64> {
        l.split_whitespace()
            .map(|kv| kv.split_once('=').unwrap().1.parse().unwrap())
            .collect()
    };
    let mark = target.count();
    let first = counts(&target.wait_line_after(mark, |_| true));
    target.wait_line_after(mark + 1, |l| {
        let c = counts(l);
        c[0] > first[0] && c[2] > first[2]
    });
    assert!(target.alive());
    // A fresh apply works; the new code runs.
    livepatch_ok(&["apply", &pid, &patch, "--mode", "nonstop"]);
    let mark = target.count();
    let first = counts(&target.wait_line_after(mark, |_| true));
    target.wait_line_after(mark + 1, |l| counts(l)[1] > first[1]);
    assert!(target.alive());
}

/// The state's write-ahead mark as `status --json` shows it (review L5).
fn unfinished(pid: &str) -> Option<String> {
    status_json(pid)[0]["patches"]
        .as_array()?
        .iter()
        .find_map(|p| p["unfinished"].as_str().map(str::to_string))
}

#[test]
fn e2e_kill_9_between_a_reverts_writes_and_its_commit_is_completed_by_the_next_revert() {
    // Stop mode writes every original byte back, then drops the record: killed in between,
    // the bytes are restored but the record stays. The next revert completes it (before the
    // fix: "no longer holds patch's redirect", and the patch could never be applied again).
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = busy_setup(dir.path());
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    livepatch_ok(&["apply", &pid, &patch]);
    target.expect_steady(3, |l| l == "value=1041");
    kill_at(&["revert", &pid], "switch-written");
    assert!(target.alive());
    target.expect_steady(3, |l| l == "value=42");
    assert_eq!(unfinished(&pid).as_deref(), Some("reverting"));
    livepatch_ok(&["revert", &pid]);
    assert_eq!(status_json(&pid)[0]["patches"].as_array().unwrap().len(), 0);
    target.expect_steady(3, |l| l == "value=42");
    livepatch_ok(&["apply", &pid, &patch]);
    target.expect_steady(3, |l| l == "value=1041");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == "value=42");
}
#[test]
fn e2e_kill_9_between_an_applys_writes_and_its_commit_is_finished_by_the_next_invocation() {
    // Stop mode writes every redirect, then commits the state: killed in between, the process
    // runs the new code with no applied patch recorded (before the fix: status showed
    // nothing, revert said no patch, a new apply refused the changed bytes). Every redirect
    // is in, only the commit is missing: the next invocation records the patch as applied
    // (rolling it back instead could wait for ever on a hot function: review session 4, S3).
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = busy_setup(dir.path());
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    // `revert` then takes it out...
    kill_at(&["apply", &pid, &patch], "switch-written");
    assert!(target.alive());
    target.expect_steady(3, |l| l == "value=1041");
    assert_eq!(unfinished(&pid).as_deref(), Some("applying"));
    livepatch_ok(&["revert", &pid]);
    assert_eq!(status_json(&pid)[0]["patches"].as_array().unwrap().len(), 0);
    target.expect_steady(3, |l| l == "value=42");
    // ... and a new `apply` of the same patch finds it applied.
    for mode in ["stop", "nonstop"] {
        kill_at(&["apply", &pid, &patch], "switch-written");
        target.expect_steady(3, |l| l == "value=1041");
        let out = livepatch(&["apply", &pid, &patch, "--mode", mode]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("recorded as applied"), "{stderr}");
        assert!(stderr.contains("already applied"), "{stderr}");
        let st = status_json(&pid);
        assert_eq!(st[0]["patches"].as_array().unwrap().len(), 1, "{st}");
        assert_eq!(unfinished(&pid), None);
        target.expect_steady(3, |l| l == "value=1041");
        livepatch_ok(&["revert", &pid, "--mode", mode]);
        target.expect_steady(3, |l| l == "value=42");
    }
}

#[test]
fn e2e_kill_9_before_a_nonstop_applys_flag_store_keeps_the_old_code_and_is_finished_next() {
    // A nonstop apply points every site at its function's dispatch, which runs the old code
    // until the commit's first store sets the patch's flag (apply/dispatch.rs). Killed right
    // before that store: every site is written, yet the process still computes the old value
    // (nothing of the patch ran), the state says "applying", and the next invocation finishes
    // the apply — the flag included: the new value appears. A revert then takes it out.
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = busy_setup(dir.path());
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    kill_at(
        &["apply", &pid, &patch, "--mode", "nonstop"],
        "dispatch-flag",
    );
    assert!(target.alive());
    target.expect_steady(3, |l| l == "value=42");
    assert_eq!(unfinished(&pid).as_deref(), Some("applying"));
    // A version older tools refuse: they would record the patch applied without the flag.
    assert_eq!(state_version(pid.parse().unwrap()), 4);
    let out = livepatch(&["apply", &pid, &patch, "--mode", "nonstop"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("recorded as applied"), "{stderr}");
    assert!(stderr.contains("already applied"), "{stderr}");
    target.expect_steady(3, |l| l == "value=1041");
    assert_eq!(unfinished(&pid), None);
    // Killed in a nonstop revert's first window (its callers', which come before its flag
    // store: they lead through the entry to the dispatch, which still runs the new code): the
    // new code runs on, consistently, and the next revert completes it.
    kill_at(&["revert", &pid, "--mode", "nonstop"], "nonstop-sync:2");
    assert!(target.alive());
    target.expect_steady(3, |l| l == "value=1041");
    assert_eq!(unfinished(&pid).as_deref(), Some("reverting"));
    livepatch_ok(&["revert", &pid]);
    assert_eq!(status_json(&pid)[0]["patches"].as_array().unwrap().len(), 0);
    target.expect_steady(3, |l| l == "value=42");
}

#[test]
fn e2e_state_is_per_process_after_fork() {
    // The state is the target's own: a child forked from a patched process keeps a copy, and
    // reverting the child leaves the parent's record (review session 4, S6: with the state
    // mapped shared, the child's revert erased it; the parent stayed patched for good).
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["fork_on_usr1.c"], "forker", &[]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = patch.display().to_string();
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    livepatch_ok(&["apply", &pid, &patch]);
    target.expect_steady(2, |l| l == "parent value=1041");
    // SAFETY: a plain kill(2) of the process we started.
    assert_eq!(
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGUSR1) },
        0
    );
    let child = target.wait_line(|l| l.starts_with("child ") && !l.contains('='));
    let child = child.split_whitespace().nth(1).unwrap().to_string();
    let mark = target.count();
    target.wait_line_after(mark, |l| l == "child value=1041");
    assert_eq!(status_json(&child)[0]["patches"][0]["id"], id.as_str());
    livepatch_ok(&["revert", &child]);
    let mark = target.count();
    target.wait_line_after(mark, |l| l == "child value=42");
    target.wait_line_after(mark, |l| l == "parent value=1041");
    assert_eq!(status_json(&pid)[0]["patches"][0]["id"], id.as_str());
    livepatch_ok(&["revert", &pid]);
    let mark = target.count();
    target.wait_line_after(mark, |l| l == "parent value=42");
    // SAFETY: a plain kill(2) of the child the fixture forked.
    unsafe { libc::kill(child.parse().unwrap(), libc::SIGKILL) };
}

#[test]
fn e2e_a_thread_limit_is_a_one_line_error_not_a_panic() {
    // Under RLIMIT_NPROC (or a cgroup's pids.max) livepatch cannot start its tracer thread:
    // a one-line error, exit 1, the target untouched (review session 4, S9: a panic, exit 101).
    // As user nobody, since root is exempt from RLIMIT_NPROC.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let out = Command::new("prlimit")
        .args(["--nproc=1:1", "setpriv", "--reuid=65534", "--regid=65534"])
        .args(["--clear-groups", livepatch_bin(), "revert"])
        .arg(sleeper.id().to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("livepatch: error: cannot start a thread of livepatch"),
        "{stderr}"
    );
    assert!(
        matches!(sleeper.try_wait(), Ok(None)),
        "the target was touched"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

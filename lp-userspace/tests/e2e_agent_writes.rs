//! Nonstop mode's windows are written by the sync agent, a thread of ours inside the target
//! (apply/switch/nonstop/sync_agent.rs): it carries out a window's writes (through a
//! `/proc/self/mem` descriptor in a descriptor table of its own) and syncs in one burst. These
//! tests check, on a live multi-threaded process, that the agent does write the windows, that
//! the program's own descriptors never change, and that the tool writes in its place when the
//! agent cannot: a target with no /proc in its mount namespace, a target stopped mid-switch.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn build(dir: &Path) -> (PathBuf, String) {
    let exe = executable(dir, &["threads.c"], "threads", &["-pthread"]);
    let obj = object(dir, "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir, &exe, &obj, &[], "p.lp");
    (exe, patch.display().to_string())
}

/// The (carried out, queued) counts of the trace's "agent ran X of Y operations" lines.
fn agent_runs(trace: &str) -> Vec<(usize, usize)> {
    trace
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("agent ran ")?.1;
            let (done, rest) = rest.split_once(" of ")?;
            let queued = rest.split_whitespace().next()?;
            Some((done.parse().ok()?, queued.parse().ok()?))
        })
        .collect()
}

/// Every window went to the agent, which carried all of it out.
fn assert_agent_wrote(trace: &str) {
    let runs = agent_runs(trace);
    assert!(!runs.is_empty(), "no window went to the agent: {trace}");
    assert!(
        runs.iter()
            .all(|&(done, queued)| done == queued && queued > 0),
        "{runs:?}: {trace}"
    );
}

/// The program's descriptors: (number, what it refers to), from the thread group leader's
/// table.
fn descriptors(pid: &str, task: &str) -> Vec<(String, String)> {
    let dir = format!("/proc/{pid}/task/{task}/fd");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), target)
        })
        .collect();
    v.sort();
    v
}

fn tasks(pid: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn e2e_agent_writes_every_window_of_an_apply_and_a_revert() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let mut target = Target::spawn(&exe, &["4"]);
    let pid = target.pid();
    target.expect_steady(5, |l| l.ends_with("value=42"));
    for _ in 0..2 {
        assert_agent_wrote(&traced(&["apply", &pid, &patch, "--mode", "nonstop"]));
        target.expect_steady(5, |l| l.ends_with("value=1041"));
        assert_agent_wrote(&traced(&["revert", &pid, "--mode", "nonstop"]));
        target.expect_steady(5, |l| l.ends_with("value=42"));
    }
    assert!(target.alive());
}

/// Sites close together are one operation of the agent's program (a merged run: read right
/// before, our bytes put in, written back): callers.c's direct callers of work() are written
/// that way, and the switch is right — the new code runs, then the old code again.
#[test]
fn e2e_agent_writes_nearby_sites_as_one_run() {
    const ORIGINAL: &str = "direct=42 tail=100021 pointer=42";
    const NEW: &str = "direct=1041 tail=101020 pointer=1041";
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let patch = patch.display().to_string();
    let mut target = Target::spawn(&exe, &["2"]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == ORIGINAL);
    let merged = |trace: &str| {
        trace
            .lines()
            .filter_map(|l| {
                let n = l
                    .split_once("agent program: ")?
                    .1
                    .split_whitespace()
                    .next()?;
                n.parse::<usize>().ok()
            })
            .sum::<usize>()
    };
    let trace = traced(&["apply", &pid, &patch, "--mode", "nonstop"]);
    assert_agent_wrote(&trace);
    assert!(merged(&trace) > 0, "no merged run: {trace}");
    target.expect_steady(5, |l| l == NEW);
    let trace = traced(&["revert", &pid, "--mode", "nonstop"]);
    assert_agent_wrote(&trace);
    assert!(merged(&trace) > 0, "no merged run: {trace}");
    target.expect_steady(5, |l| l == ORIGINAL);
    assert!(target.alive());
}

/// The agent opens `/proc/self/mem` in a table of its own: the program's table (shared by its
/// threads) never holds a descriptor of ours, not even mid-switch, and holds all of its own.
#[test]
fn e2e_agent_keeps_to_a_descriptor_table_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let mut target = Target::spawn(&exe, &["4"]);
    let pid = target.pid();
    let before = descriptors(&pid, &pid);
    let threads = tasks(&pid).len();
    // Mid-switch: the agent is running (the tool stopped itself before a sync).
    let mut tool = stop_tool_at(
        &["apply", &pid, &patch, "--mode", "nonstop"],
        "nonstop-sync:2",
    );
    assert_eq!(descriptors(&pid, &pid), before);
    let agents: Vec<(String, Vec<(String, String)>)> = tasks(&pid)
        .into_iter()
        .map(|t| {
            let fds = descriptors(&pid, &t);
            (t, fds)
        })
        .filter(|(_, fds)| *fds != before)
        .collect();
    assert_eq!(
        agents.len(),
        1,
        "one thread with a table of its own: {agents:?}"
    );
    let fds = &agents[0].1;
    assert_eq!(fds.len(), 1, "{fds:?}");
    assert_eq!(fds[0].1, format!("/proc/{pid}/mem"), "{fds:?}");
    // SAFETY: kill only sends a signal to the tool's process.
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    assert!(tool.wait().unwrap().success());
    target.expect_steady(5, |l| l.ends_with("value=1041"));
    assert_eq!(descriptors(&pid, &pid), before);
    assert_eq!(tasks(&pid).len(), threads, "the agent is gone");
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(5, |l| l.ends_with("value=42"));
    assert!(target.alive());
}

/// A target whose mount namespace has no /proc: the agent cannot open `/proc/self/mem`, and
/// the tool writes the windows itself (the agent still syncs).
#[test]
fn e2e_agent_without_proc_leaves_the_writes_to_the_tool() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let exe = exe.display().to_string();
    // unshare and sh exec: the target keeps the pid we started.
    let mut target = Target::spawn(
        Path::new("unshare"),
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "umount -l /proc && exec \"$0\" 4",
            &exe,
        ],
    );
    let pid = target.pid();
    target.expect_steady(5, |l| l.ends_with("value=42"));
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&pid),
        ns("self"),
        "the target has a mount namespace of its own"
    );
    for args in [
        vec!["apply", &pid, &patch, "--mode", "nonstop"],
        vec!["revert", &pid, "--mode", "nonstop"],
    ] {
        let trace = traced(&args);
        let runs = agent_runs(&trace);
        assert!(
            !runs.is_empty() && runs.iter().all(|&(done, _)| done == 0),
            "{runs:?}: {trace}"
        );
        assert!(trace.contains("agent sync in"), "the agent syncs: {trace}");
    }
    target.expect_steady(5, |l| l.ends_with("value=42"));
    livepatch_ok(&["apply", &pid, &patch, "--mode", "nonstop"]);
    target.expect_steady(5, |l| l.ends_with("value=1041"));
    assert!(target.alive());
}

/// A target stopped (SIGSTOP) in the middle of a nonstop apply: the agent stops with it and
/// answers no more; the tool finishes the switch alone, and the process runs the new code once
/// it is continued.
#[test]
fn e2e_agent_of_a_stopped_process_leaves_the_writes_to_the_tool() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let mut target = Target::spawn(&exe, &["4"]);
    let pid = target.pid();
    target.expect_steady(5, |l| l.ends_with("value=42"));
    let tool = Command::new(livepatch_bin())
        .args(["apply", &pid, &patch, "--mode", "nonstop"])
        .env("LIVEPATCH_TRACE", "1")
        .env("LIVEPATCH_DEBUG_STOP", "nonstop-sync:2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_stopped(tool.id() as i32);
    let pid_n: i32 = pid.parse().unwrap();
    // SAFETY: kill only sends signals to the target and to the tool.
    unsafe {
        libc::kill(pid_n, libc::SIGSTOP);
        libc::kill(tool.id() as i32, libc::SIGCONT);
    }
    let out = tool.wait_with_output().unwrap();
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{trace}");
    let runs = agent_runs(&trace);
    assert!(
        runs.iter().any(|&(done, _)| done == 0),
        "the tool wrote after the stop: {runs:?}: {trace}"
    );
    assert!(trace.contains("agent sync failed"), "{trace}");
    // SAFETY: as above.
    unsafe { libc::kill(pid_n, libc::SIGCONT) };
    target.expect_steady(5, |l| l.ends_with("value=1041"));
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(5, |l| l.ends_with("value=42"));
    assert!(target.alive());
}

/// Waits until process `pid` is in a stop (state T).
fn wait_stopped(pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('T'))
    }) {
        assert!(std::time::Instant::now() < deadline, "{pid} never stopped");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

//! Nonstop mode gives way to the target (apply/courtesy.rs): the tool's thread runs at nice 19
//! while it switches, so that a runnable thread of the target is always run before it; the
//! target's own threads keep their priorities and the sync agent its SCHED_FIFO. Stop mode,
//! whose stopped threads wait for the tool, does not; nor does `--boost`.

mod common;

use common::*;
use std::time::Duration;

/// The nice value (stat field 19) and the scheduling policy of every thread of process `pid`,
/// by thread id.
fn priorities(pid: u32) -> Vec<(i32, i32, i32)> {
    nice_values(pid)
        .into_iter()
        // SAFETY: a plain system call on a thread id.
        .map(|(tid, nice)| (tid, nice, unsafe { libc::sched_getscheduler(tid) }))
        .collect()
}

/// The nice value (stat field 19) of every thread of process `pid`, by thread id.
fn nice_values(pid: u32) -> Vec<(i32, i32)> {
    let mut out: Vec<(i32, i32)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let tid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            // Fields after the command's closing parenthesis start at field 3 (state).
            let nice = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(16)?
                .parse()
                .ok()?;
            Some((tid, nice))
        })
        .collect();
    out.sort();
    out
}

/// Runs `args` until the tool stops itself at `point`, returns the nice values of the
/// tool's threads and of the target's then, lets the tool go on and asserts it succeeded.
fn nice_values_at(args: &[&str], point: &str, target: u32) -> (Vec<i32>, Vec<(i32, i32, i32)>) {
    let mut tool = stop_tool_at(args, point);
    // The tool's thread that traces the target (the command line's main thread for an apply,
    // a tracer thread of its own for a revert): TracerPid of the target's borrowed thread.
    let tracer = std::fs::read_dir(format!("/proc/{target}/task"))
        .unwrap()
        .flatten()
        .find_map(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let t: i32 = status
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))?
                .trim()
                .parse()
                .ok()?;
            (t != 0).then_some(t)
        })
        .expect("a thread of the target traced by the tool");
    let tool_nice: Vec<i32> = nice_values(tool.id())
        .into_iter()
        .filter(|&(tid, _)| tid == tracer)
        .map(|(_, n)| n)
        .collect();
    let target_nice = priorities(target);
    // SAFETY: a plain system call on our child's pid.
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    let status = tool.wait().unwrap();
    assert!(status.success(), "{args:?}: {status}");
    (tool_nice, target_nice)
}

#[test]
fn e2e_a_nonstop_switch_runs_the_tool_at_nice_19_and_stop_mode_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["stress.c"], "stress", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = patch.display().to_string();
    let mut target = Target::spawn(&exe, &["4"]);
    let pid = target.pid();
    let pid_n: u32 = pid.parse().unwrap();
    let before = nice_values(pid_n);
    assert!(before.iter().all(|&(_, n)| n == 0), "{before:?}");

    // Nonstop: stopped inside the int3 window, at the agent's first sync.
    let (tool, during) = nice_values_at(&nonstop_apply(&pid, &patch), "nonstop-sync:1", pid_n);
    assert_eq!(tool, vec![19], "the tool's tracer in a nonstop apply");
    // The target's threads as they were; the one more is our sync agent (nice 0, SCHED_FIFO).
    let (agents, program): (Vec<_>, Vec<_>) = during
        .iter()
        .partition(|(tid, _, _)| !before.iter().any(|(t, _)| t == tid));
    for (tid, nice, policy) in &program {
        assert_eq!(
            (*nice, *policy),
            (0, libc::SCHED_OTHER),
            "target thread {tid}: {during:?}"
        );
    }
    assert_eq!(agents.len(), 1, "{during:?} vs {before:?}");
    assert_eq!(agents[0].2, libc::SCHED_FIFO, "the sync agent: {during:?}");

    // The revert too.
    let (tool, _) = nice_values_at(
        &["revert", &pid, "--mode", "nonstop", "--timeout", "60"],
        "nonstop-sync:1",
        pid_n,
    );
    assert_eq!(tool, vec![19], "the tool's tracer in a nonstop revert");

    // Stop mode: the tool keeps the caller's priority (the threads wait for it).
    let (tool, during) = nice_values_at(
        &["apply", &pid, &patch, "--mode", "stop"],
        "remote-syscall",
        pid_n,
    );
    assert_eq!(tool, vec![0], "the tool's tracer in a stop-mode apply");
    let unchanged: Vec<(i32, i32, i32)> = before
        .iter()
        .map(|&(t, n)| (t, n, libc::SCHED_OTHER))
        .collect();
    assert_eq!(during, unchanged);
    livepatch_ok(&["revert", &pid]);

    // --boost asked for the opposite: nice -20, kept.
    let (tool, _) = nice_values_at(
        &[
            "apply",
            &pid,
            &patch,
            "--mode",
            "nonstop",
            "--timeout",
            "60",
            "--boost",
        ],
        "nonstop-sync:1",
        pid_n,
    );
    assert_eq!(tool, vec![-20], "the tool's tracer under --boost");
    livepatch_ok(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);

    // Nothing left changed in the target.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(nice_values(pid_n), before);
    assert!(target.alive());
}

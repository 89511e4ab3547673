//! A signal sent to a process while it is being patched reaches it exactly as without us,
//! whichever thread the tool borrows: the thread that waits in read() for the signal, or a
//! worker that blocks it (a nonstop switch borrows one thread for its system calls; the
//! worker case is what a process with no idle thread gets). Session 6 saw a read()'s EINTR
//! lost 1 time in 4-10 runs of e2e_signals once a worker was borrowed.
//!
//! The fixture's main thread reads a pipe nobody writes; its signals' handler has no
//! SA_RESTART. `livepatch apply` / `revert` cycles run (the CLI, with `LIVEPATCH_BORROW_COMM`
//! naming the thread to borrow: checked in its trace) while:
//! - one SIGUSR1 at a time is sent with kill() (process-directed), each once the main thread is
//!   seen waiting in read(): every signal runs the handler once and ends that read() with
//!   EINTR;
//! - a stream of queued SIGRTMIN (never merged) is sent: the handler runs exactly once per
//!   signal, and every read() ends with EINTR;
//! - the fixture itself sends SIGUSR1 in the microseconds in which the kernel restarts a read()
//!   that the tool's stop interrupted ("catch"): deterministic; before process/restart.rs each
//!   such signal ran the handler and read() waited on (its EINTR lost), in both modes, whichever
//!   thread was borrowed. That was the loss session 6 saw: the borrowed worker was not the
//!   cause; every stop of the reader by the tool (at the end of a switch that borrowed it, in
//!   every stop-mode stop, and in every nonstop revert before session 12, which stopped each
//!   thread) opens that window.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const CYCLES: usize = 10;
/// Apply/revert cycles of the signal-stream tests.
const STREAM_CYCLES: usize = 20;

/// Whether thread `pid` of `pid` (the main thread) is blocked in read() (or held by a tracer
/// inside it: the call has not returned either way).
fn blocked_in_read(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/syscall"))
        .is_ok_and(|s| s.split_whitespace().next() == Some("0"))
}

/// The named thread's id.
fn tid_named(pid: i32, name: &str) -> i32 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim_end() == name)
        })
        .unwrap_or_else(|| panic!("no thread named {name}"))
}

/// Runs `livepatch ARGS` with the thread named lp-borrow forced as the borrowed one; returns
/// the threads its nonstop switch reports borrowed (from its trace).
fn livepatch_borrowing(args: &[&str]) -> Vec<String> {
    let out = Command::new(livepatch_bin())
        .args(args)
        .env("LIVEPATCH_BORROW_COMM", "lp-borrow")
        .env("LIVEPATCH_TRACE", "1")
        .output()
        .expect("run livepatch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "livepatch {args:?} failed: {stderr}");
    stderr
        .lines()
        .filter_map(|l| {
            l.split_once("installed (borrowed thread ")?
                .1
                .split_once(')')
        })
        .map(|(tids, _)| tids.to_string())
        .collect()
}

/// Sends SIGUSR1 to the fixture once its main thread waits in read(), and checks what came of
/// it: the `k`-th run of the handler, then that read() ending with EINTR.
fn one_signal(target: &Target, pid: i32, k: usize, during: &str) {
    let mark = target.count();
    let deadline = Instant::now() + PATIENCE;
    while !blocked_in_read(pid) {
        assert!(
            Instant::now() < deadline,
            "the main thread never waits in read()"
        );
        std::thread::yield_now();
    }
    // SAFETY: kill only sends a signal to the fixture process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    target.wait_line_after(mark, |l| {
        l.starts_with("read ") || l.starts_with("restarted")
    });
    let lines = target.lines()[mark..].to_vec();
    assert!(
        !lines.iter().any(|l| l.starts_with("restarted")),
        "signal {k} ({during}) found read() restarted: its EINTR is lost: {lines:?}"
    );
    let read = lines.get(1).map(String::as_str).unwrap_or("");
    assert!(
        lines.len() == 2
            && lines[0] == format!("handled {k}")
            && read.starts_with("read ")
            && read.ends_with(&format!(" -1 {}", libc::EINTR)),
        "signal {k} ({during}): expected its handler's run {k} and read() ending with EINTR, got {lines:?}"
    );
}

/// Apply/revert cycles in `mode` on the fixture started with `args`, signals sent one at a time
/// meanwhile (see the module documentation). Returns how many signals were checked.
fn signals_while_patching(mode: &str, args: &[&str]) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["borrowed_signals.c"], "target", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    // Busy workers spin on both CPUs of a small machine: niced, the tool still gets one.
    let target = if args.contains(&"busy") {
        Target::spawn_niced(&exe, args)
    } else {
        Target::spawn(&exe, args)
    };
    let pid = target.child.id() as i32;
    let borrow = tid_named(pid, "lp-borrow").to_string();
    let patcher = {
        let (patch, mode, pid_s) = (patch.clone(), mode.to_string(), pid.to_string());
        std::thread::spawn(move || {
            let patch = Path::new(&patch).display().to_string();
            let mut borrowed = Vec::new();
            for _ in 0..CYCLES {
                borrowed.extend(livepatch_borrowing(&[
                    "apply", &pid_s, &patch, "--mode", &mode,
                ]));
                borrowed.extend(livepatch_borrowing(&["revert", &pid_s, "--mode", &mode]));
            }
            borrowed
        })
    };
    let mut k = 0;
    while !patcher.is_finished() {
        k += 1;
        one_signal(&target, pid, k, "while patching");
    }
    let borrowed = patcher.join().unwrap();
    // One more once the tool is gone: a signal held back and sent twice, or a handler run
    // counted by none of the above, shows here.
    one_signal(&target, pid, k + 1, "after patching");
    if mode == "nonstop" {
        assert_eq!(borrowed.len(), 2 * CYCLES, "switches traced: {borrowed:?}");
        assert!(
            borrowed.iter().all(|b| *b == format!("[{borrow}]")),
            "the thread named lp-borrow ({borrow}) was not always the borrowed one: {borrowed:?}"
        );
    }
    eprintln!("{mode} {args:?}: {} signals checked", k + 1);
    k + 1
}

#[test]
fn e2e_nonstop_borrowing_a_worker_that_blocks_the_signal_keeps_every_eintr() {
    let n = signals_while_patching("nonstop", &[]);
    assert!(n > CYCLES, "too few signals: {n}");
}

#[test]
fn e2e_nonstop_borrowing_a_busy_worker_keeps_every_eintr() {
    let n = signals_while_patching("nonstop", &["busy"]);
    assert!(n > CYCLES, "too few signals: {n}");
}

#[test]
fn e2e_nonstop_borrowing_the_reader_keeps_every_eintr() {
    let n = signals_while_patching("nonstop", &["main"]);
    assert!(n > CYCLES, "too few signals: {n}");
}

#[test]
fn e2e_stop_mode_keeps_every_eintr() {
    let n = signals_while_patching("stop", &[]);
    assert!(n > CYCLES, "too few signals: {n}");
}

/// The fixture's output lines from the `mark`-th on, once its handler has run `n` times in all
/// (or PATIENCE has passed: a signal lost for good; the caller's count check then fails).
fn lines_after_handler_runs(target: &Target, n: usize) -> Vec<String> {
    let runs = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.starts_with("handled") || l.starts_with("restarted"))
            .count()
    };
    let deadline = Instant::now() + PATIENCE;
    while runs(&target.lines()) < n && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    target.lines()
}

/// Apply/revert cycles in `mode` while a queued real-time signal (SIGRTMIN, never merged with
/// another) is sent to the fixture every 50 µs: its handler must run exactly once per signal,
/// never at a restarted read() ("restarted": the EINTR lost), and every read() must end with
/// EINTR. Unlike [`signals_while_patching`], signals also come while a thread is being stopped
/// or let go, so they can meet the few microseconds in which the kernel restarts a call our
/// stop interrupted.
fn signal_stream_while_patching(mode: &str, args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["borrowed_signals.c"], "target", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, args);
    let pid = target.child.id() as i32;
    let patcher = {
        let (patch, mode, pid_s) = (patch.clone(), mode.to_string(), pid.to_string());
        std::thread::spawn(move || {
            let patch = Path::new(&patch).display().to_string();
            for _ in 0..STREAM_CYCLES {
                livepatch_borrowing(&["apply", &pid_s, &patch, "--mode", &mode]);
                livepatch_borrowing(&["revert", &pid_s, "--mode", &mode]);
            }
        })
    };
    let mut sent = 0;
    while !patcher.is_finished() {
        sent += 1;
        // SAFETY: kill only sends a signal to the fixture process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGRTMIN()) }, 0);
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    patcher.join().unwrap();
    let lines = lines_after_handler_runs(&target, sent);
    let restarted: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("restarted"))
        .collect();
    let runs = lines.iter().filter(|l| l.starts_with("handled")).count() + restarted.len();
    eprintln!(
        "{mode} {args:?}: {sent} signals sent, {runs} handler runs, restarted: {restarted:?}"
    );
    assert!(
        restarted.is_empty(),
        "{mode} {args:?}: a signal found read() restarted: its EINTR was lost ({restarted:?})"
    );
    assert_eq!(
        runs, sent,
        "{mode} {args:?}: handler runs for {sent} signals"
    );
    for l in lines.iter().filter(|l| l.starts_with("read ")) {
        assert!(
            l.ends_with(&format!(" -1 {}", libc::EINTR)),
            "{mode} {args:?}: {l}"
        );
    }
}

#[test]
fn e2e_nonstop_borrowing_a_worker_under_a_signal_stream_keeps_every_eintr() {
    signal_stream_while_patching("nonstop", &[]);
}

#[test]
fn e2e_nonstop_borrowing_the_reader_under_a_signal_stream_keeps_every_eintr() {
    signal_stream_while_patching("nonstop", &["main"]);
}

#[test]
fn e2e_stop_mode_under_a_signal_stream_keeps_every_eintr() {
    signal_stream_while_patching("stop", &[]);
}

/// Apply/revert cycles in `mode` on the fixture in its "catch" mode: each time the tool's stop
/// makes the main thread's read() start over, the fixture itself sends it a SIGUSR1 in the
/// microseconds before it is inside the call again ("caught K"). The read() never returned, so
/// each such signal must end it with EINTR, exactly as it does without a tracer — the kernel
/// alone would run the handler and enter read() again ("restarted": the EINTR lost).
///
/// `stopped`: whether the tool stops the reading thread at all. A nonstop switch that borrows
/// a worker does not, since session 12 (its revert sees the reader, blocked far from the patch
/// memory, outside it through /proc: `nonstop/outside.rs`): no read() is restarted then.
fn caught_restarts_while_patching(mode: &str, args: &[&str], stopped: bool) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["borrowed_signals.c"], "target", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let mut all_args = vec!["catch"];
    all_args.extend_from_slice(args);
    let target = Target::spawn(&exe, &all_args);
    let pid = target.child.id().to_string();
    let patch = patch.display().to_string();
    for _ in 0..CYCLES {
        livepatch_borrowing(&["apply", &pid, &patch, "--mode", mode]);
        livepatch_borrowing(&["revert", &pid, "--mode", mode]);
    }
    let caught = target
        .lines()
        .iter()
        .filter(|l| l.starts_with("caught"))
        .count();
    let lines = lines_after_handler_runs(&target, caught);
    let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    let restarted: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("restarted"))
        .collect();
    eprintln!(
        "{mode} {args:?}: {caught} restarts caught, {} handled, {} restarted, {} reads",
        count("handled"),
        restarted.len(),
        count("read ")
    );
    // Stop mode stops the reading thread in every switch, a nonstop switch that borrows it at
    // its end: without a caught restart this test would show nothing.
    if stopped {
        assert!(
            caught > 0,
            "{mode} {args:?}: no restart of read() was caught"
        );
    } else {
        assert_eq!(
            caught, 0,
            "{mode} {args:?}: the reader, blocked far from the patch, was stopped"
        );
    }
    assert!(
        restarted.is_empty(),
        "{mode} {args:?}: a signal came while read() started over after our stop, and read() went on waiting: its EINTR was lost ({} of {caught})",
        restarted.len()
    );
    assert_eq!(count("handled"), caught, "{mode} {args:?}: handler runs");
    let reads: Vec<&String> = lines.iter().filter(|l| l.starts_with("read ")).collect();
    assert_eq!(
        reads.len(),
        caught,
        "{mode} {args:?}: reads ended: {reads:?}"
    );
    for l in reads {
        assert!(
            l.ends_with(&format!(" -1 {}", libc::EINTR)),
            "{mode} {args:?}: {l}"
        );
    }
}

#[test]
fn e2e_nonstop_borrowing_a_worker_never_stops_the_reader() {
    caught_restarts_while_patching("nonstop", &[], false);
}

#[test]
fn e2e_nonstop_borrowing_the_reader_keeps_the_eintr_of_a_signal_during_the_restart() {
    caught_restarts_while_patching("nonstop", &["main"], true);
}

#[test]
fn e2e_stop_mode_keeps_the_eintr_of_a_signal_during_the_restart() {
    caught_restarts_while_patching("stop", &[], true);
}

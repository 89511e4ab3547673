//! A long-lived caller of the library (this test process, like lp-py or a management daemon:
//! one pid for many applies) removes the gdb files a dead process left in /tmp within eight
//! applies (review session 5, #5). When the sweep was chosen by the caller's pid alone, seven
//! processes in eight never swept, however many patches they applied.
//!
//! Other livepatch processes on the machine (tests running beside this one) sweep /tmp too
//! and may remove the files first: then this test passes without showing that this process
//! swept (the choice itself is unit-tested in debug_info.rs). Run alone, it fails for seven
//! pids in eight with a choice by pid alone.

mod common;
use common::*;
use lp_userspace::apply::{apply, ApplyOptions, Mode};
use lp_userspace::patchfile::Patch;
use lp_userspace::revert::revert;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A pid with no process (a child that has been reaped).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    c.wait().unwrap();
    c.id()
}

#[test]
fn e2e_a_long_lived_library_caller_sweeps_stale_gdb_files() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (path, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = Patch::load(&path).unwrap();
    let target = Target::spawn(&exe, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    target.wait_line(|l| l.starts_with("ready"));

    // What a process that died patched leaves: its script and its objects.
    let dead = dead_pid();
    let left: Vec<PathBuf> = [
        format!("livepatch-{dead}.gdb"),
        format!("livepatch-{dead}-0123456789abcdef.o"),
        format!("livepatch-{dead}-0123456789abcdef-stubs.o"),
    ]
    .iter()
    .map(|n| PathBuf::from("/tmp").join(n))
    .collect();
    for p in &left {
        std::fs::write(p, "# left by a dead process\n").unwrap();
    }

    let gone = || left.iter().all(|p| !p.exists());
    let opts = ApplyOptions {
        mode: Mode::Stop,
        timeout: Duration::from_secs(5),
    };
    // Eight applies (each with its revert) from this one process.
    for _ in 0..8 {
        apply(pid, &patch, opts).unwrap();
        revert(pid, None, Mode::Stop, Duration::from_secs(5)).unwrap();
        if gone() {
            break;
        }
    }
    // The sweep runs on the apply's warm-up thread, which no apply waits for.
    let deadline = Instant::now() + PATIENCE;
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let kept: Vec<_> = left.iter().filter(|p| p.exists()).collect();
    for p in &left {
        let _ = std::fs::remove_file(p);
    }
    assert!(kept.is_empty(), "still in /tmp after 8 applies: {kept:?}");
}

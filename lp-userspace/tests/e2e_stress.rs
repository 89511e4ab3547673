//! Stress: 8 threads call the patched function in a tight loop through 200 apply/revert cycles
//! in each mode. Every call returns the old or the new value (the fixture aborts otherwise) and
//! the process never crashes. The cycles go through the library (the same code the CLI runs)
//! to keep the test's own overhead low.

mod common;
use common::*;
use lp_userspace::apply::{apply, ApplyOptions, Mode};
use lp_userspace::patchfile::Patch;
use std::time::Duration;

const CYCLES: usize = 200;

fn counts(line: &str) -> (u64, u64) {
    let mut it = line
        .split_whitespace()
        .map(|kv| kv.split('=').nth(1).unwrap().parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn stress(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["stress.c"], "stress", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch_path, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = Patch::load(&patch_path).unwrap();
    let mut target = Target::spawn_niced(&exe, &["8"]);
    let pid = target.child.id() as i32;
    let opts = ApplyOptions {
        mode,
        timeout: Duration::from_secs(30),
    };
    let mut last_new = 0;
    let started = std::time::Instant::now();
    for cycle in 0..CYCLES {
        apply(pid, &patch, opts).unwrap_or_else(|e| panic!("cycle {cycle}: apply: {e}"));
        if cycle % 50 == 0 {
            eprintln!("{mode:?}: cycle {cycle} after {:?}", started.elapsed());
            // The new code really runs while applied.
            let mark = target.count();
            target.wait_line_after(mark, |l| counts(l).1 > last_new);
            last_new = counts(&target.lines()[target.count() - 1]).1;
        }
        lp_userspace::revert::revert(pid, None, mode, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("cycle {cycle}: revert: {e}"));
        assert!(target.alive(), "target died in cycle {cycle}");
    }
    let mark = target.count();
    let line = target.wait_line_after(mark, |_| true);
    let (old, new) = counts(&line);
    assert!(old > 0 && new > 0, "{line}");
    assert!(target.alive());
    let st = lp_userspace::status::status(Some(pid)).unwrap();
    assert!(st[0].patches.is_empty());
}

#[test]
fn e2e_stress_stop_mode() {
    stress(Mode::Stop);
}

#[test]
fn e2e_stress_nonstop_mode() {
    stress(Mode::Nonstop);
}

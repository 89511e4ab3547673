//! Targets that watch the sync agent's page (fixtures including `agent_watched.h`): the
//! review 7 tests that stop, starve or resolve the agent in the middle of a program.

use super::*;

/// `source` (a program including agent_watched.h, whose compute(41) prints `value=42`) built
/// in `dir` as `name` with its patch (new_compute.c: `value=1041`), started with 4 workers and
/// steady, and given its trap area (kept for the life of the process) by a nonstop apply and
/// revert, which its watcher finds meanwhile: it acts in a later switch. (The target, its pid,
/// the patch.)
pub fn watched_target_with_area(dir: &Path, name: &str, source: &str) -> (Target, String, String) {
    let exe = executable_from_source(
        dir,
        name,
        source,
        &["-pthread", &format!("-I{}", fixture("").display())],
    );
    let patch = compute_patch(dir, &exe);
    let target = Target::spawn(&exe, &["4"]);
    let pid = target.pid();
    target.expect_steady(5, |l| l.ends_with("value=42"));
    livepatch_ok(&["apply", &pid, &patch, "--mode", "nonstop"]);
    target.expect_steady(5, |l| l.ends_with("value=1041"));
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(5, |l| l.ends_with("value=42"));
    (target, pid, patch)
}

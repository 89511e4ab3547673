//! Review session 6, finding 4: `--timeout` accepts any finite number of seconds
//! (`Duration::try_from_secs_f64`), but nonstop mode adds it to `Instant::now()`
//! (`refuse_if_sigtrap_blocked`, nonstop.rs), which panics past the clock's range ("overflow
//! when adding duration to instant"). A nonstop revert panics (exit 101) after its record was
//! marked "reverting" (the next invocation finds it unfinished); a nonstop apply — whose
//! tracer is, since 1e685d0, a thread of the CLI while the main thread parks for ever — hangs
//! instead, with Ctrl-C/SIGTERM blocked in every thread: only SIGKILL ends it.

mod common;
use common::*;

const ORIGINAL: &str = "direct=42 tail=100021 pointer=42";
const NEW: &str = "direct=1041 tail=101020 pointer=1041";

/// Runs livepatch `args` (bounded: a hang fails); returns (exit code, stderr).
fn run_bounded(args: &[&str]) -> (Option<i32>, String) {
    let out = livepatch_bounded(args, &[]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn unfinished(pid: &str) -> Option<String> {
    status_json(pid)[0]["patches"]
        .as_array()?
        .iter()
        .find_map(|p| p["unfinished"].as_str().map(str::to_string))
}

#[test]
fn review6_4_a_huge_timeout_never_panics_nor_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let patch = patch.display().to_string();
    let target = Target::spawn(&exe, &["2"]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == ORIGINAL);

    for mode in ["stop", "nonstop"] {
        let (code, stderr) =
            run_bounded(&["apply", &pid, &patch, "--mode", mode, "--timeout", "1e19"]);
        assert!(
            !stderr.contains("panicked"),
            "apply --mode {mode}: {stderr}"
        );
        assert!(
            code == Some(0) || (code.is_some_and(|c| c > 1) && stderr.lines().count() == 1),
            "apply --mode {mode}: exit {code:?}: {stderr}"
        );
        if code == Some(0) {
            target.expect_steady(3, |l| l == NEW);
            let (code, stderr) =
                run_bounded(&["revert", &pid, "--mode", mode, "--timeout", "1e19"]);
            assert!(
                !stderr.contains("panicked"),
                "revert --mode {mode}: {stderr}"
            );
            assert!(
                code == Some(0) || (code.is_some_and(|c| c > 1) && stderr.lines().count() == 1),
                "revert --mode {mode}: exit {code:?}: {stderr}"
            );
        }
        assert_eq!(
            unfinished(&pid),
            None,
            "--mode {mode}: a record left marked"
        );
        // Clean up whatever is applied, with an ordinary timeout.
        if status_json(&pid)[0]["patches"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
        {
            livepatch_ok(&["revert", &pid, "--mode", mode]);
        }
        target.expect_steady(3, |l| l == ORIGINAL);
    }
}

//! Review 10, H1: a process whose main thread has exited (pthread_exit) is read through one of
//! its live threads (process/proc_dir.rs, from the s10-leader merge). When its threads come and
//! go — here each lives a few milliseconds and starts its successor — the thread picked exits
//! before or during the read: the process was taken for exited ("does not exist", "exited
//! while being patched", exit 5; "no permission to trace", exit 6) and its state for absent
//! ("has no livepatch applied" after an apply that succeeded, then "already applied"), with a
//! nonstop switch left half-done now and then. Every apply and revert here must succeed.
//!
//! An apply refused as busy ("try again": a thread met inside pthread_create, whose mask
//! blocks SIGTRAP for a moment) is an answer, not a wrong one; its revert is not asked.
//!
//! The churn test failed on paced bb3d993 (8–11 wrong answers in 30 pairs); after 0046e80
//! one case was left (1 in 200 pairs on an idle machine, 10 in 200 at load 5, the reviewer's
//! script): every thread a stop-mode revert had seized exited while running — before its stop
//! window, or after it, before the patch memory's munmap — and the process, living on in
//! threads started since, was taken for exited (`Tracee::thread_gone`). How often that
//! happens depends on the machine's load; the second test makes it happen every time, with
//! the tool stopped at those two points (`LIVEPATCH_DEBUG_STOP`) while the threads it traces
//! hand over to new ones.
//! With the main thread alive (the same program, `pause()` instead of `pthread_exit`) the same
//! pairs all succeed.

mod common;
use common::*;

const CHURN: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static pthread_attr_t detached;
static void *relay(void *arg) {
    for (int i = 0; i < 20; i++) { volatile int v = compute(41); (void)v; usleep(100); }
    pthread_t t;
    pthread_create(&t, &detached, relay, arg);
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    for (long i = 0; i < 3; i++) pthread_create(&t, &detached, relay, (void *)i);
    printf("ready\n");
    pthread_exit(0);
}
"#;

#[test]
fn review10_a_process_whose_main_thread_exited_and_whose_threads_come_and_go_is_patched() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "churn", CHURN, &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let mut wrong = Vec::new();
    for i in 0..30 {
        for (k, args) in [
            &[
                "apply",
                &pid,
                &patch,
                "--mode",
                "nonstop",
                "--timeout",
                "60",
            ][..],
            &["revert", &pid][..],
        ]
        .into_iter()
        .enumerate()
        {
            let out = livepatch(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if k == 0 && out.status.code() == Some(3) && stderr.contains("try again") {
                break; // busy: nothing applied, nothing to revert
            }
            if !out.status.success() {
                wrong.push(format!(
                    "{i} {}: {:?} {}",
                    args[0],
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        assert!(target.alive(), "the target died: {wrong:?}");
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {wrong:#?}",
        wrong.len()
    );
}

/// Workers of generation G run until a file `goN` with N > G exists in the directory given as
/// argv[1]; each then starts a worker of the newest generation and exits. Worker 0 of each
/// generation prints compute(41) now and then.
const HANDOVER: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static pthread_attr_t detached;
static long generation(void) {
    long g = 0;
    char name[32];
    for (;;) {
        snprintf(name, sizeof name, "go%ld", g + 1);
        if (access(name, F_OK)) return g;
        g++;
    }
}
static void *worker(void *arg) {
    long gen = (long)arg / 16, id = (long)arg % 16;
    for (long i = 0;; i++) {
        int v = compute(41);
        if (id == 0 && i % 20 == 0) printf("value=%d\n", v);
        long now = generation();
        if (now > gen) {
            pthread_t t;
            pthread_create(&t, &detached, worker, (void *)(now * 16 + id));
            return NULL;
        }
        usleep(1000);
    }
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || chdir(argv[1])) return 2;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    for (long i = 0; i < 3; i++) pthread_create(&t, &detached, worker, (void *)i);
    printf("ready\n");
    pthread_exit(0);
}
"#;

/// Runs a stop-mode revert of `pid` stopped at `point` (its threads seized and running), makes
/// every thread it traces hand over to a new one (generation `gen`) and exit, and lets the
/// revert go on; returns its output.
fn revert_while_the_traced_threads_hand_over(
    dir: &std::path::Path,
    pid: &str,
    point: &str,
    gen: u32,
) -> std::process::Output {
    let tool = stop_tool_at(&["revert", pid], point);
    let traced: Vec<String> = tasks(pid)
        .into_iter()
        .filter(|t| *t != pid && tracer_of(pid, t).is_some())
        .collect();
    assert_eq!(traced.len(), 3, "the tool traces the 3 workers");
    std::fs::write(dir.join(format!("go{gen}")), "").unwrap();
    // Exited, unreaped by their stopped tracer (a zombie) or gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !traced
        .iter()
        .all(|t| task_stat(pid, t, 3).is_none_or(|s| s == "Z" || s == "X"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the workers did not hand over"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(
        tasks(pid).iter().any(|t| !traced.contains(t) && *t != pid),
        "their successors run"
    );
    // SAFETY: kill() takes a pid and a signal number; no memory is involved.
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    tool.wait_with_output().unwrap()
}

#[test]
fn review10_a_revert_whose_traced_threads_all_exit_while_the_process_lives_on_completes() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "handover", HANDOVER, &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let dir_arg = dir.path().to_str().unwrap();
    let mut target = Target::spawn(&exe, &[dir_arg]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");

    // Every thread it seized is gone when the revert stops the process for its check: it
    // stops the threads the process has now.
    for (gen, point) in [(1, "stop-window"), (2, "stop-resumed")] {
        livepatch_ok(&["apply", &pid, &patch]);
        target.expect_steady(2, |l| l == "value=1041");
        let st = lp_userspace::state::read(pid.parse().unwrap()).unwrap();
        let code = st.patches[0].code_addr;
        let out = revert_while_the_traced_threads_hand_over(dir.path(), &pid, point, gen);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "revert stopped at {point}: {:?} {stderr}",
            out.status.code()
        );
        assert!(!stderr.contains("warning"), "at {point}: {stderr}");
        // Read through a live thread: the main thread, which exited, has no mappings to show.
        let worker = tasks(&pid).into_iter().find(|t| *t != pid).unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/task/{worker}/maps")).unwrap();
        assert!(
            !maps.starts_with(&format!("{code:x}-")) && !maps.contains(&format!("\n{code:x}-")),
            "at {point}: the patch memory at {code:#x} is still mapped"
        );
        assert!(target.alive());
        assert_eq!(status_json(&pid)[0]["patches"].as_array().unwrap().len(), 0);
        target.expect_steady(2, |l| l == "value=42");
    }
}

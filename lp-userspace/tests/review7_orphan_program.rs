//! Review session 7, finding 1: a program queued for the sync agent by a livepatch that is then
//! killed must not be carried out after the next livepatch has finished the killed switch.
//!
//! The agent carries out a window's writes (nonstop mode, sync_agent.rs `run`). When it does
//! not run the program at once — its process is stopped (SIGSTOP), or it is starved — and the
//! tool is killed before it cancels the program (within its answer wait), the program stays
//! queued. A later `livepatch revert` finishes the killed switch and takes the patch out (its
//! memory unmapped); once the process runs again, the orphaned agent must not write the old
//! program's bytes over that.
//!
//! The target is threads.c's workers plus a watcher thread (SCHED_FIFO 2, above the agent's
//! 1, so that the futex wake-up of each request reaches it first) which passes each wake-up on
//! to the agent, except that of the program after the one writing compute's first byte (the
//! callers' program of the second apply): then it stops its own process, that program requested and
//! not started.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STOPPER: &str = r#"
#include "agent_watched.h"

#ifdef MAIN_EXITS
/* Review 10: the main thread exits (pthread_exit) before the watcher stops the process. */
static volatile int exit_main;
static int main_exited(void) {
    char p[64], buf[512];
    snprintf(p, sizeof p, "/proc/self/task/%d/stat", getpid());
    FILE *f = fopen(p, "r");
    if (!f) return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *c = strrchr(buf, ')');
    return c && (c[2] == 'Z' || c[2] == 'X');
}
#endif

static void *watcher(void *arg) {
    (void)arg;
    volatile uint32_t *w = watch_agent_page();
    if (!w) return NULL;
    uint32_t seen = w[0];
    int armed = 0, reverted = 0; /* the setup's revert seen (see the_tests_apply) */
    for (;;) {
        /* REQ (offset 0): the word the agent waits on. */
        syscall(SYS_futex, (uint32_t *)&w[0], FUTEX_WAIT, seen, NULL, NULL, 0);
        uint32_t req = w[0];
        if (req == seen) continue;
        seen = req;
        if (w[2] == 3) { /* CMD (offset 8) = CMD_RUN */
            uint32_t n = w[212 / 4]; /* NOPS */
            if (armed) {
#ifdef MAIN_EXITS
                exit_main = 1;
                while (!main_exited()) usleep(200);
#endif
                printf("stopping with a program of %u operations requested\n", n);
                /* To the agent itself (TID at 16): it leaves its futex wait for the stop
                   at once, before its wait times out and it finds the request. */
                syscall(SYS_tgkill, getpid(), w[16 / 4], SIGSTOP);
                armed = 0;
                continue; /* not passed on: the agent finds the request after SIGCONT */
            }
            if (the_tests_apply(w, &reverted)) armed = 1;
        }
        syscall(SYS_futex, (uint32_t *)&w[0], FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int n = argc > 1 ? atoi(argv[1]) : 4;
    pthread_t t;
    pthread_create(&t, NULL, watcher, NULL);
    for (long i = 0; i < n; i++) pthread_create(&t, NULL, worker, (void *)i);
    printf("ready %d\n", getpid());
#ifdef MAIN_EXITS
    while (!exit_main) usleep(1000);
    pthread_exit(0);
#endif
    worker((void *)(long)n);
}
"#;

/// A word of the target's memory, read through a live thread (its main thread may have
/// exited: /proc/PID/mem then reads nothing).
fn read_u32(pid: &str, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    let read = tasks(pid).into_iter().any(|tid| {
        std::fs::File::open(format!("/proc/{pid}/task/{tid}/mem"))
            .is_ok_and(|mem| mem.read_exact_at(&mut b, addr).is_ok())
    });
    assert!(read, "cannot read {addr:#x} of {pid}");
    u32::from_le_bytes(b)
}

/// `source` (STOPPER, maybe with its main thread exiting) started with its area, then a
/// nonstop apply killed while the watcher holds the process stopped with the callers' program
/// requested and not started: (the target, its pid, the patch, the agent's page).
fn stopped_with_an_orphan_program(
    dir: &std::path::Path,
    source: &str,
) -> (Target, String, String, u64) {
    let (target, pid, patch, mut tool) = stopped_with_a_program(dir, source);
    tool.kill().unwrap();
    tool.wait().unwrap();
    let page = orphan_program_page(&target, &pid);
    (target, pid, patch, page)
}

/// `source` started with its area, then a nonstop apply, returned as soon as the watcher holds
/// the process stopped with the callers' program requested and not started, while the apply
/// waits for the agent's answer (100 ms: the caller kills or stops it at once, before it could
/// cancel the program): (the target, its pid, the patch, the apply).
fn stopped_with_a_program(dir: &std::path::Path, source: &str) -> (Target, String, String, Child) {
    let (target, pid, patch) = watched_target_with_area(dir, "stopper", source);
    target.wait_line(|l| l.starts_with("agent page "));

    let mut tool = Command::new(livepatch_bin())
        .args(["apply", &pid, &patch, "--mode", "nonstop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !job_stopped(&pid) {
        assert!(
            tool.try_wait().unwrap().is_none(),
            "the apply ended before the target stopped: {:?}",
            target.lines().iter().rev().take(5).collect::<Vec<_>>()
        );
        assert!(Instant::now() < deadline, "the target never stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
    (target, pid, patch, tool)
}

/// The agent's page, once the apply that gave it its program was killed; asserts the setup.
fn orphan_program_page(target: &Target, pid: &str) -> u64 {
    let page = target.wait_line(|l| l.starts_with("agent page "));
    let page = u64::from_str_radix(page.trim_start_matches("agent page 0x"), 16).unwrap();
    target.wait_line(|l| l.starts_with("stopping with a program"));
    // The setup: a program requested (REQ != DONE), queued (NOPS), not started nor
    // cancelled (NEXT = 0), and the agent alive (TID).
    let (req, done, nops, next) = (
        read_u32(pid, page),
        read_u32(pid, page + 4),
        read_u32(pid, page + 212),
        read_u32(pid, page + 216),
    );
    assert!(
        req != done && nops > 0 && next == 0 && read_u32(pid, page + 16) != 0,
        "setup: REQ {req} DONE {done} NOPS {nops} NEXT {next:#x}"
    );
    page
}

/// SIGCONT to the target, which must live on, running its original code.
fn continue_and_expect_the_original(target: &mut Target) {
    // SAFETY: kill only sends SIGCONT to the target.
    unsafe { libc::kill(target.child.id() as i32, libc::SIGCONT) };
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if let Some(status) = target.child.try_wait().unwrap() {
            panic!(
                "the reverted process died once continued ({status}): the killed tool's agent carried out its program after the revert"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    target.expect_steady(5, |l| l.ends_with("value=42"));
    assert!(target.alive());
}

#[test]
fn review7_a_killed_tools_program_is_not_carried_out_after_the_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let (mut target, pid, _, _) = stopped_with_an_orphan_program(dir.path(), STOPPER);
    // The next livepatch finishes the killed apply and reverts the patch (on the stopped
    // process): it succeeds, and the process has no patch.
    livepatch_ok(&["revert", &pid]);
    let status = livepatch_ok(&["status", &pid]);
    assert!(status.contains("no patches applied"), "{status}");
    // The process runs again: it must run its original code, as the revert said.
    continue_and_expect_the_original(&mut target);
}

/// Review 10: once the main thread has exited, the agent's page cannot be mapped (no
/// map_files), so its program can be neither cancelled nor resolved: the next livepatch is
/// refused while the agent lives, writes nothing, and succeeds once the process ran on (the
/// agent carried out its program, before the recovery, and exited: its tool is gone).
#[test]
fn review10_an_orphan_program_out_of_reach_refuses_the_recovery_until_the_agent_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let source = format!("#define MAIN_EXITS 1\n{STOPPER}");
    let (mut target, pid, _, page) = stopped_with_an_orphan_program(dir.path(), &source);
    let out = Command::new(livepatch_bin())
        .args(["revert", &pid])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "revert: {stderr}");
    assert!(
        stderr.contains("continue the process and try again") && stderr.lines().count() == 1,
        "{stderr}"
    );
    // SAFETY: kill only sends SIGCONT to the target.
    unsafe { libc::kill(target.child.id() as i32, libc::SIGCONT) };
    let deadline = Instant::now() + PATIENCE;
    while read_u32(&pid, page + 16) != 0 {
        assert!(Instant::now() < deadline, "the orphaned agent never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    livepatch_ok(&["revert", &pid]);
    let status = livepatch_ok(&["status", &pid]);
    assert!(status.contains("no patches applied"), "{status}");
    continue_and_expect_the_original(&mut target);
}

/// Review 11, L3: the next livepatch looks for an orphaned agent before it attaches, and leaves
/// an agent whose tool lives alone (that tool holds the process, its program is its own). A
/// tool killed between that look and the attach leaves an orphan with its program requested:
/// the next livepatch looks again once it holds the process, and cancels it.
#[test]
fn review11_a_tool_killed_between_the_orphan_look_and_the_attach_leaves_no_program_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (mut target, pid, _, mut tool) = stopped_with_a_program(dir.path(), STOPPER);
    // Held, not killed, while it waits for the agent's answer: it lives, tracing its thread.
    // SAFETY: kill only sends SIGSTOP to the apply.
    unsafe { libc::kill(tool.id() as i32, libc::SIGSTOP) };
    let revert = stop_tool_at(&["revert", &pid], "orphan-looked");
    tool.kill().unwrap();
    tool.wait().unwrap();
    orphan_program_page(&target, &pid);
    // SAFETY: kill only sends SIGCONT to the revert.
    unsafe { libc::kill(revert.id() as i32, libc::SIGCONT) };
    let out = revert.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "revert: {stderr}");
    let status = livepatch_ok(&["status", &pid]);
    assert!(status.contains("no patches applied"), "{status}");
    continue_and_expect_the_original(&mut target);
}

//! Targets under a seccomp filter (systemd's SystemCallFilter=, container runtimes, browsers):
//! livepatch reads the filters of the threads it borrows and runs its own system calls through
//! them before it writes anything. A call the filter would not let through is refused with one
//! line and the target untouched; a call only the sync agent makes keeps the agent from
//! starting (nonstop mode then syncs through ptrace); a filter that stops nothing of ours
//! changes nothing.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The target: simple.c's loop (compute(41) printed directly and through a pointer) with an
/// idle second thread, and a filter installed on both (TSYNC) after start-up. argv[1] picks
/// the filter: `agent` kills the process on close_range and pwrite64 (only the sync agent
/// makes them), `mmap` kills it on mmap, `errno` fails uname with EPERM, `mdwe` fails an
/// mprotect to an executable protection with EPERM (an argument test), `strict` puts the (only)
/// thread in strict mode, `none` installs none.
const TARGET: &str = r#"
#include "compute_loop.h"
#include "seccomp_filter.h"
#include <errno.h>
#include <linux/audit.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/utsname.h>

int (*volatile compute_ptr)(int) = compute;

static void *idle(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

static void filter(unsigned nr1, unsigned nr2, unsigned action) {
    struct sock_filter insns[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr1, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr2, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    install_filter(insns, sizeof insns / sizeof insns[0], SECCOMP_FILTER_FLAG_TSYNC);
}

/* systemd's MemoryDenyWriteExecute= in small: mprotect to an executable protection fails. */
static void deny_exec_mprotect(void) {
    struct sock_filter insns[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mprotect, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, PROT_EXEC, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    install_filter(insns, sizeof insns / sizeof insns[0], SECCOMP_FILTER_FLAG_TSYNC);
}

/* Strict mode (read, write, exit, sigreturn): the main thread says so and blocks in a read of
 * a pipe nobody writes. */
static void strict(void) {
    int fds[2];
    char c;
    if (pipe(fds) != 0) exit(2);
    printf("ready %d strict\n", getpid());
    fflush(stdout);
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) != 0) exit(2);
    for (;;) read(fds[0], &c, 1);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *which = argv[1];
    if (!strcmp(which, "strict"))
        strict(); /* single-threaded: the one thread any mode borrows */
    if (!strcmp(which, "errno-sigsys") || !strcmp(which, "mmap-sigsys")) {
        /* SIGSYS blocked in every thread (the idle one inherits the mask) */
        sigset_t sys;
        sigemptyset(&sys);
        sigaddset(&sys, SIGSYS);
        pthread_sigmask(SIG_BLOCK, &sys, NULL);
    }
    pthread_t t;
    pthread_create(&t, NULL, idle, NULL);
    if (!strcmp(which, "agent"))
        filter(SYS_close_range, SYS_pwrite64, SECCOMP_RET_KILL_PROCESS);
    else if (!strcmp(which, "mmap") || !strcmp(which, "mmap-sigsys"))
        filter(SYS_mmap, SYS_mmap, SECCOMP_RET_KILL_PROCESS);
    else if (!strcmp(which, "errno") || !strcmp(which, "errno-sigsys"))
        filter(SYS_uname, SYS_uname, SECCOMP_RET_ERRNO | EPERM);
    if (!strcmp(which, "errno-sigsys"))
        kill(getpid(), SIGSYS); /* process-directed, blocked everywhere: it stays pending */
    else if (!strcmp(which, "mmap-sigsys")) {
        /* thread-directed (tgkill), blocked: one waits in each thread's own pending set */
        pthread_kill(pthread_self(), SIGSYS);
        pthread_kill(t, SIGSYS);
    }
    else if (!strcmp(which, "mdwe"))
        deny_exec_mprotect();
    struct utsname u;
    int uname_errno = uname(&u) == 0 ? 0 : errno;
    printf("ready %d uname_errno=%d\n", getpid(), uname_errno);
    struct timespec ts = {0, 20 * 1000000L};
    for (;;) {
        printf("direct=%d pointer=%d\n", compute(41), compute_ptr(41));
        nanosleep(&ts, NULL);
    }
}
"#;

const OLD: &str = "direct=42 pointer=42";
const NEW: &str = "direct=1041 pointer=1041";

fn build(dir: &Path) -> (PathBuf, String) {
    compute_target_and_patch(dir, "filtered", TARGET, &["-pthread"])
}

/// The target under filter `which`, its pid: the filter in force, the old values printed.
fn filtered_target(exe: &Path, which: &str) -> (Target, String) {
    let target = Target::spawn(exe, &[which]);
    let pid = target.pid();
    assert_eq!(seccomp_of(&pid, &pid), "2");
    target.expect_steady(2, |l| l == OLD);
    (target, pid)
}

/// The sync agent's line of a nonstop trace ("sync agent Some(TID)" or "sync agent None").
fn agent_line(trace: &str) -> &str {
    trace
        .lines()
        .find(|l| l.contains("sync agent "))
        .unwrap_or_else(|| panic!("no sync agent line in the trace: {trace}"))
}

/// A filter that kills the process on close_range and pwrite64, which only the sync agent
/// makes: a nonstop apply and revert succeed without the agent (the syncs go through ptrace),
/// and the target lives on, patched and then back to the old function. (Without the check,
/// the agent's first system call kills the target.)
#[test]
fn e2e_a_filter_against_the_agents_calls_leaves_nonstop_mode_without_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());

    // The premise: without a filter, the same target gets an agent.
    let plain = Target::spawn(&exe, &["none"]);
    let pid = plain.pid();
    plain.expect_steady(2, |l| l == OLD);
    let trace = traced(&nonstop_apply(&pid, &patch));
    assert!(agent_line(&trace).contains("Some("), "{trace}");
    plain.expect_steady(3, |l| l == NEW);
    drop(plain);

    let (mut target, pid) = filtered_target(&exe, "agent");
    let trace = traced(&nonstop_apply(&pid, &patch));
    assert!(agent_line(&trace).contains("None"), "{trace}");
    target.expect_steady(5, |l| l == NEW);
    assert!(target.alive());
    let trace = traced(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);
    if let Some(line) = trace.lines().find(|l| l.contains("sync agent ")) {
        assert!(line.contains("None"), "{trace}");
    }
    target.expect_steady(5, |l| l == OLD);
    assert!(target.alive());
}

/// A filter that kills the process on mmap, which every apply needs: refused in both modes
/// with one line naming seccomp and mmap, a non-zero exit, and the target alive, printing the
/// old values, its mappings exactly as before. (Without the check the first remote mmap kills
/// the target.)
#[test]
fn e2e_a_filter_against_mmap_is_refused_and_the_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let (mut target, pid) = filtered_target(&exe, "mmap");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for mode in ["stop", "nonstop"] {
        let (code, line) = livepatch_err(&["apply", &pid, &patch, "--mode", mode]);
        assert_eq!(code, 10, "{mode}: {line}");
        assert!(
            line.contains("seccomp filter would kill the process on mmap")
                && line.contains("nothing was changed"),
            "{mode}: {line}"
        );
        target.expect_steady(5, |l| l == OLD);
        assert!(target.alive(), "{mode}: the target died");
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(),
            maps,
            "{mode}: the target's mappings changed"
        );
    }
    // Nothing applied: a revert finds nothing (and is refused first, for the same reason).
    let (code, line) = livepatch_err(&["revert", &pid]);
    assert_ne!(code, 0, "{line}");
    target.expect_steady(3, |l| l == OLD);
    assert!(target.alive());
}

/// A remote call the check did not vet (here: the check skipped through its test knob) that
/// the filter kills on: the kernel skips the call, leaves its number where the result goes
/// and kills the process. The tool must say the process exited — not take the number for
/// mmap's result and fail writing at address 9 (what it did before).
#[test]
fn e2e_a_call_the_filter_kills_is_reported_as_the_process_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let (target, pid) = filtered_target(&exe, "mmap");
    unvetted_apply_is_killed(target, &pid, &patch);
}

/// An apply with the seccomp check skipped (its test knob), whose first mmap the filter of
/// `target` kills: one line saying the process exited (not a write at 0x9, mmap's number
/// taken for its result), a non-zero exit, and the target killed by the filter's SIGSYS.
fn unvetted_apply_is_killed(mut target: Target, pid: &str, patch: &str) {
    let out = livepatch_env(
        &["apply", pid, patch],
        &[("LIVEPATCH_DEBUG_SKIP_SECCOMP_CHECK", "1")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("process {pid} exited while being patched")),
        "{stderr}"
    );
    assert!(!stderr.contains("0x9"), "{stderr}");
    assert!(
        target.dies_within(Duration::from_secs(10)),
        "the filter's SIGSYS should have killed the target"
    );
}

/// The same kill on a thread that already has a SIGSYS of its own pending (sent by tgkill,
/// blocked; here every thread has one): still reported as the process exiting, the process
/// killed. Before, a SIGSYS pending in the calling thread before the call turned the check
/// off, and the tool took mmap's number for its result, failing at address 0x9 (review 9, L1).
#[test]
fn e2e_a_call_the_filter_kills_is_reported_with_a_sigsys_already_pending_in_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let (target, pid) = filtered_target(&exe, "mmap-sigsys");
    let sigsys = 1u64 << (libc::SIGSYS - 1);
    for tid in tasks(&pid) {
        let mask = |field| u64::from_str_radix(&task_status(&pid, &tid, field).unwrap(), 16);
        let (pending, blocked) = (mask("SigPnd").unwrap(), mask("SigBlk").unwrap());
        assert_ne!(pending & blocked & sigsys, 0, "the premise, thread {tid}");
    }
    unvetted_apply_is_killed(target, &pid, &patch);
}

/// A filter that only fails an unrelated call (uname, with EPERM): it stops nothing of ours,
/// and apply and revert work in both modes, the agent included.
#[test]
fn e2e_a_filter_failing_an_unrelated_call_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let mut target = Target::spawn(&exe, &["errno"]);
    let pid = target.pid();
    assert_eq!(seccomp_of(&pid, &pid), "2");
    // The filter is in force: the target's own uname failed with EPERM.
    assert!(target
        .wait_line(|l| l.starts_with("ready"))
        .ends_with("uname_errno=1"));
    target.expect_steady(2, |l| l == OLD);
    livepatch_ok(&["apply", &pid, &patch]);
    target.expect_steady(3, |l| l == NEW);
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == OLD);
    let trace = traced(&nonstop_apply(&pid, &patch));
    assert!(agent_line(&trace).contains("Some("), "{trace}");
    target.expect_steady(3, |l| l == NEW);
    livepatch_ok(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);
    target.expect_steady(3, |l| l == OLD);
    assert!(target.alive());
}

/// The same filter, and a process-directed SIGSYS that waits in the process-wide pending set
/// (blocked in every thread; sent by kill, not by a filter): apply and revert work in both
/// modes. Before, the check after each remote call looked at the process-wide set too and took
/// that SIGSYS for a filter's kill: every apply of such a process failed as "process exited"
/// (review 8, L2).
#[test]
fn e2e_a_sigsys_pending_for_the_process_is_not_taken_for_a_filters_kill() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let mut target = Target::spawn(&exe, &["errno-sigsys"]);
    let pid = target.pid();
    assert_eq!(seccomp_of(&pid, &pid), "2");
    target.expect_steady(2, |l| l == OLD);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let shared: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(shared & 1 << (libc::SIGSYS - 1), 0, "the premise: {status}");
    livepatch_ok(&["apply", &pid, &patch]);
    target.expect_steady(3, |l| l == NEW);
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == OLD);
    livepatch_ok(&nonstop_apply(&pid, &patch));
    target.expect_steady(3, |l| l == NEW);
    livepatch_ok(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);
    target.expect_steady(3, |l| l == OLD);
    assert!(target.alive());
}

/// A filter that tests an argument: mprotect with PROT_EXEC fails with EPERM (as under
/// systemd's MemoryDenyWriteExecute=), and the patch's code needs it: refused in both modes,
/// naming mprotect and the errno, the target untouched.
#[test]
fn e2e_a_filter_failing_an_executable_mprotect_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let (mut target, pid) = filtered_target(&exe, "mdwe");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for mode in ["stop", "nonstop"] {
        let (code, line) = livepatch_err(&["apply", &pid, &patch, "--mode", mode]);
        assert_eq!(code, 10, "{mode}: {line}");
        assert!(
            line.contains("seccomp filter would fail mprotect with errno 1"),
            "{mode}: {line}"
        );
        target.expect_steady(3, |l| l == OLD);
        assert!(target.alive());
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(),
            maps,
            "{mode}: the target's mappings changed"
        );
    }
}

/// Strict mode allows read, write, exit and sigreturn only: refused, the target alive and
/// still in its read.
#[test]
fn e2e_strict_mode_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    let mut target = Target::spawn(&exe, &["strict"]);
    let pid = target.pid();
    // The main thread enters strict mode right after its line.
    let deadline = std::time::Instant::now() + PATIENCE;
    let strict = || {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status"))
            .unwrap()
            .contains("Seccomp:\t1")
    };
    while !strict() {
        assert!(std::time::Instant::now() < deadline, "never in strict mode");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for mode in ["stop", "nonstop"] {
        let (code, line) = livepatch_err(&["apply", &pid, &patch, "--mode", mode]);
        assert_eq!(code, 10, "{mode}: {line}");
        assert!(line.contains("seccomp strict mode"), "{mode}: {line}");
        assert!(target.alive(), "{mode}: the target died");
        assert!(strict());
    }
}

/// A nonstop revert unmaps the patch's memory after its switch, on a thread of its choosing.
/// Before session 12 it traced every thread first (to stop each), and no thread being known to
/// run unfiltered, that was the main thread, whose own filter kills munmap (the pre-flight
/// check took it for the borrowed thread's stack: same number of filters): the munmap was
/// vetted as it was about to be made and not made, the revert succeeded with a warning that
/// the memory stays mapped (before session 8 the target was killed and livepatch exited 0).
/// Since session 12 the threads are seen out of the memory from /proc, none is traced but the
/// borrowed one, still stopped: the munmap runs there, on the thread the pre-flight check
/// vetted (the idle one, whose filter fails only uname), and the memory is freed. (The warning
/// stays for a revert that had to stop other threads: review8_seccomp S3.)
#[test]
fn e2e_a_nonstop_reverts_munmap_runs_on_the_vetted_borrowed_thread() {
    let dir = tempfile::tempdir().unwrap();
    // Two threads with filters of their own (no TSYNC): the main thread's kills the process
    // on munmap, the idle thread's fails uname with EPERM.
    let exe = executable(
        dir.path(),
        &["munmap_filtered.c"],
        "ownfilters",
        &["-pthread"],
    );
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn(&exe, &["uname"]);
    let pid = target.pid();
    assert_eq!(seccomp_of(&pid, &pid), "2");
    target.expect_steady(2, |l| l == "main=42");
    let run = |args: &[&str]| livepatch_env(args, &[("LIVEPATCH_BORROW_COMM", "idle")]);
    let out = run(&["apply", &pid, &patch, "--mode", "nonstop"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "apply: {err}");
    target.expect_steady(3, |l| l == "main=1041");
    let out = run(&["revert", &pid, "--mode", "nonstop", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "revert: {err}");
    assert!(!err.contains("warning"), "{err}");
    let reverted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reverted["code_freed"], true, "{reverted}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(target.alive(), "the target was killed: {err}");
    target.expect_steady(3, |l| l == "main=42");
}

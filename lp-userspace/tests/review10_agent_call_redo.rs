//! Review 10: a system call of ours that the sync agent made but did not answer for (its process
//! stopped right after the call, before the agent counted it) is made again through ptrace
//! (`SyncAgent::call` → `None`, see `resolve_claim`: "redoing one whose count was not yet
//! stored"). A write or a sync made twice is the same; our SIGTRAP action's swap is not: its
//! second `rt_sigaction` returns our own action as the "previous" one, and `install` took that
//! for the program changing its action meanwhile — the apply failed with "busy: ... its SIGTRAP
//! action (changed while we installed ours)" (exit 3) though nothing but our agent had touched
//! it.
//!
//! The moment is made exact by a helper process that traces the agent from system call to
//! system call (no breakpoint, no single step: their forced SIGTRAP would reset the action of a
//! signal the agent blocks) and, at the exit of its `rt_sigaction`, stops the target
//! (SIGSTOP) and lets the agent go: it stays right after the call, its count not stored.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The target: compute() called by two workers, a SIGTRAP handler of its own, its action shown
/// on each line (prog: its handler; ours: anything else but SIG_DFL).
const TARGET: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static void on_trap(int s) { (void)s; }
static void *worker(void *arg) {
    (void)arg;
    for (;;) { volatile int v = compute(41); (void)v; usleep(200); }
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTRAP, on_trap);
    pthread_t t;
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    for (;;) {
        struct sigaction sa;
        sigaction(SIGTRAP, NULL, &sa);
        printf("value=%d action=%s\n", compute(41),
               sa.sa_handler == on_trap ? "prog" : sa.sa_handler == SIG_DFL ? "dfl" : "ours");
        usleep(20000);
    }
}
"#;

/// The helper: HELPER PID TID_WORD_ADDR (hex). Seizes the agent whose tid the word holds and
/// follows its system calls to the exit of its next rt_sigaction; then SIGSTOPs the process and
/// detaches. Prints "armed", then "made" (or why not).
const HELPER: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int pid = atoi(argv[1]);
    uint64_t word = strtoull(argv[2], 0, 16);
    char p[64];
    snprintf(p, sizeof p, "/proc/%d/mem", pid);
    int fd = open(p, O_RDONLY);
    uint32_t tid = 0;
    if (pread(fd, &tid, 4, word) != 4 || !tid) { printf("no agent\n"); return 1; }
    if (ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD)) { printf("no seize\n"); return 1; }
    ptrace(PTRACE_INTERRUPT, tid, 0, 0);
    int st;
    waitpid(tid, &st, __WALL);
    ptrace(PTRACE_SYSCALL, tid, 0, 0);
    printf("armed\n");
    fflush(stdout);
    struct user_regs_struct r;
    for (;;) {
        if (waitpid(tid, &st, __WALL) < 0 || !WIFSTOPPED(st)) { printf("agent gone\n"); return 1; }
        if (WSTOPSIG(st) == (SIGTRAP | 0x80)) {
            ptrace(PTRACE_GETREGS, tid, 0, &r);
            if (r.orig_rax == SYS_rt_sigaction && r.rax != (unsigned long long)-38) break;
            ptrace(PTRACE_SYSCALL, tid, 0, 0);
        } else if ((st >> 16) == PTRACE_EVENT_STOP) {
            ptrace(PTRACE_SYSCALL, tid, 0, 0);
        } else {
            ptrace(PTRACE_SYSCALL, tid, 0, WSTOPSIG(st));
        }
    }
    kill(pid, SIGSTOP);
    usleep(1000);
    ptrace(PTRACE_DETACH, tid, 0, 0);
    printf("made %lld\n", (long long)r.rax);
    return 0;
}
"#;

/// The address of the agent's tid word: the last page of the trap area's data mapping
/// (agent_watched.h's `agent_page`), word 16.
fn agent_tid_word(pid: &str) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| l.contains("livepatch-trap.4") && l.split_whitespace().nth(1) == Some("rw-s"))
        .expect("the trap area's data mapping");
    let hi = line.split(['-', ' ']).nth(1).unwrap();
    u64::from_str_radix(hi, 16).unwrap() - 4096 + 16
}

#[test]
fn review10_an_agent_call_made_but_not_answered_is_not_taken_for_the_program_changing_sigtrap() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "target", TARGET, &["-pthread"]);
    let helper = executable_from_source(dir.path(), "helper", HELPER, &[]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42 action=prog");

    // The tool stopped with our action's rt_sigaction loaded in the agent's page (the first
    // agent-call.13 is the install's), the agent waiting for it.
    let tool = stop_tool_at(&nonstop_apply(&pid, &patch), "agent-call.13");
    let mut h = Command::new(&helper)
        .args([&pid, &format!("{:x}", agent_tid_word(&pid))])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(h.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "armed");
    // SAFETY: kill with a valid signal number; the pid is the tool's, a child of this test.
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    line.clear();
    said.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "made 0",
        "the agent did not make our rt_sigaction"
    );
    h.wait().unwrap();
    let out = tool.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // SAFETY: as above (the target is a child of this test).
    unsafe { libc::kill(target.child.id() as i32, libc::SIGCONT) };

    assert!(
        !stderr.contains("changed while we installed ours"),
        "our own call made twice taken for the program's change: {stderr}"
    );
    assert!(out.status.success(), "apply failed: {stderr}");
    target.expect_steady(3, |l| l == "value=1041 action=prog");
    assert!(target.alive());
}

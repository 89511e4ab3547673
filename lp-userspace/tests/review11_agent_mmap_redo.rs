//! Review 11: the sync agent makes the apply's patch memory mapping (`Early::map_patch`, one
//! program: mmap then the mprotects). An mmap the agent made but did not count (its process
//! stopped right after the call) is made again through ptrace (`SyncAgent::calls` answers
//! None, as for a call never made: see review 10's M1 for the SIGTRAP action). With
//! MAP_FIXED_NOREPLACE the second mmap fails (EEXIST: the agent's mapping is there), the apply
//! picks another gap and maps there — and the agent's mapping stays in the target for good:
//! a populated anonymous mapping of the patch memory's size, left by every such apply.
//!
//! The moment is made exact as in review10_agent_call_redo: a helper traces the agent from
//! system call to system call and, at the exit of its mmap, stops the target (SIGSTOP).

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// compute() called by two workers (no handlers of its own).
const TARGET: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static void *worker(void *arg) {
    (void)arg;
    for (;;) { volatile int v = compute(41); (void)v; usleep(200); }
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    for (;;) { printf("value=%d\n", compute(41)); usleep(20000); }
}
"#;

/// The helper: HELPER PID TID_WORD_ADDR (hex) NR. Seizes the agent whose tid the word holds and
/// follows its system calls to the exit of its next call NR; then SIGSTOPs the process and
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
    long nr = atol(argv[3]);
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
            if (r.orig_rax == (unsigned long long)nr && r.rax != (unsigned long long)-38) break;
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

/// The target's anonymous private mappings (start-end, protection), the stack and heap aside.
fn anonymous(pid: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().count() == 5)
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn review11_an_agent_mmap_made_but_not_answered_leaves_no_mapping_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "target", TARGET, &["-pthread"]);
    let helper = executable_from_source(dir.path(), "helper", HELPER, &[]);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    // A first apply and revert: the area and the state mapping stay from now on.
    livepatch_ok(&nonstop_apply(&pid, &patch));
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(2, |l| l == "value=42");
    let before = anonymous(&pid);

    // The tool stopped with the patch memory's program loaded (agent-call.9), the agent
    // waiting; the helper stops the process at the exit of the agent's mmap.
    let tool = stop_tool_at(&nonstop_apply(&pid, &patch), "agent-call.9");
    let mut h = Command::new(&helper)
        .args([&pid, &format!("{:x}", agent_tid_word(&pid)), "9"])
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
    assert!(
        line.starts_with("made "),
        "the agent did not make our mmap: {line}"
    );
    h.wait().unwrap();
    let out = tool.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // SAFETY: as above (the target is a child of this test).
    unsafe { libc::kill(target.child.id() as i32, libc::SIGCONT) };
    assert!(out.status.success(), "apply failed: {stderr}");
    target.expect_steady(2, |l| l == "value=1041");
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(2, |l| l == "value=42");

    let after = anonymous(&pid);
    let left: Vec<&String> = after.iter().filter(|m| !before.contains(m)).collect();
    assert!(
        left.is_empty(),
        "mappings left behind: {left:?} (apply: {stderr})"
    );
    assert!(target.alive());
}

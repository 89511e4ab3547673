//! A helper that stops a target right after a system call of its sync agent (review 10, 11):
//! the agent has made the call and not yet counted it, as when its process is stopped (SIGSTOP)
//! during the call. It traces the agent from system call to system call: no breakpoint, no
//! single step (their forced SIGTRAP would reset the action of a signal the agent blocks).

#![allow(dead_code)]

/// A helper program (build it with `executable_from_source`): STOPPER PID TID_WORD_ADDR (hex)
/// NR. Seizes the agent whose tid the word holds and follows its system calls to the exit of
/// its next call NR; then SIGSTOPs the process and detaches. Prints "armed", then "made RESULT"
/// (or why not).
pub const AGENT_STOPPER: &str = r#"
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
pub fn agent_tid_word(pid: &str) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| l.contains("livepatch-trap.4") && l.split_whitespace().nth(1) == Some("rw-s"))
        .expect("the trap area's data mapping");
    let hi = line.split(['-', ' ']).nth(1).unwrap();
    u64::from_str_radix(hi, 16).unwrap() - 4096 + 16
}

/// Runs the [`AGENT_STOPPER`] built at `helper` on the agent of `pid` for its next call `nr`,
/// then lets the `tool` (stopped at that call's `agent-call` point) go on; returns the
/// helper's last line ("made RESULT", or why not) once the helper has ended.
pub fn stop_the_agent_after_call(
    helper: &std::path::Path,
    pid: &str,
    tool: &std::process::Child,
    nr: i64,
) -> String {
    use std::io::{BufRead, BufReader};
    let mut h = std::process::Command::new(helper)
        .args([pid, &format!("{:x}", agent_tid_word(pid)), &nr.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(h.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "armed");
    // SAFETY: kill with a valid signal number; the pid is the tool's, a child of the test.
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    line.clear();
    said.read_line(&mut line).unwrap();
    h.wait().unwrap();
    line.trim().to_string()
}

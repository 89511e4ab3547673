//! Uprobes (perf probe, bpftrace, USDT) put `int3`s into a process's code and take them out
//! again, at any time, through the kernel. A nonstop switch writes each run of nearby sites
//! with one `/proc/PID/mem` write, the bytes between the sites included: they must be read
//! right before that write, not from a copy taken before the window (review session 5, #1:
//! a uprobe removed during the window had its `int3` put back, and the next thread to reach
//! it died of SIGTRAP — no uprobe claimed it, and it was no trap of ours).
//!
//! The tool is stopped at its first sync (every int3 of the callers' window written), the
//! uprobe removed, the tool let go. Needs root and tracefs (skipped otherwise).

mod common;
use common::uprobe::{byte_at, direct_calls, disassembly, tracefs_missing, try_byte_at, Uprobe};
use common::*;
use std::time::{Duration, Instant};

const TARGET: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int __attribute__((noipa)) work(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 7;
    return r;
}
volatile int sink, sink0;
/* Two direct calls of work() a few bytes apart (its first instruction is long enough that
 * neither call is among the bytes a redirect of caller() would displace). */
int __attribute__((noipa)) caller(int x) {
    sink0 = x;
    int a = work(x);
    sink = a;
    int b = work(a);
    return b + 1;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec ts = {0, 2000000L};
    printf("ready %d\n", getpid());
    for (;;) {
        printf("value=%d\n", caller(41));
        nanosleep(&ts, NULL);
    }
}
"#;

const NEW: &str = "int work(int x) { return x + 1000; }\n";

/// The load address of `exe` in `pid` (PIE: file offset 0 mapped there; text vaddr = offset).
fn base(pid: &str, exe: &std::path::Path) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| l.ends_with(exe.to_str().unwrap()))
        .unwrap();
    u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap()
}

#[test]
fn e2e_a_uprobe_removed_during_a_nonstop_window_stays_removed() {
    if tracefs_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "u", TARGET, &[]);
    let new_src = dir.path().join("n.c");
    std::fs::write(&new_src, NEW).unwrap();
    let obj = dir.path().join("n.o");
    cc(
        "gcc",
        &[
            "-O2",
            "-c",
            "-fPIC",
            new_src.to_str().unwrap(),
            "-o",
            obj.to_str().unwrap(),
        ],
    );
    let calls = direct_calls(&disassembly(&exe), "caller", "work");
    assert_eq!(calls.len(), 2, "caller() calls work() twice: {calls:?}");
    // The instruction right after the first call: between the two call sites.
    let probe = calls[0] + 5;
    assert!(probe < calls[1]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = patch.display().to_string();

    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "value=44");
    let at = base(&pid, &exe) + probe;
    let original = byte_at(&pid, at);
    let Some(uprobe) = Uprobe::add("lptest", &format!("u{pid}"), &exe, probe) else {
        eprintln!("cannot add a uprobe: skipped");
        return;
    };
    assert_eq!(
        try_byte_at(&pid, at),
        Some(0xcc),
        "the uprobe's int3 is in place"
    );
    target.expect_steady(3, |l| l == "value=44");

    // The callers' window: every int3 written, the tool stopped before its first sync.
    let mut tool = stop_tool_at(
        &["apply", &pid, &patch, "--mode", "nonstop"],
        "nonstop-sync:1",
    );
    // The uprobe goes (perf probe -d, the end of a bpftrace session): the kernel puts the
    // original byte back.
    uprobe.remove();
    assert_eq!(
        try_byte_at(&pid, at),
        Some(original),
        "the kernel restored it"
    );
    // SAFETY: SIGCONT to the tool we started.
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    let status = tool.wait().unwrap();
    assert!(status.success(), "apply failed");

    // Nothing of ours belongs at the probed instruction.
    let now = try_byte_at(&pid, at);
    let deadline = Instant::now() + Duration::from_secs(2);
    while target.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        target.alive(),
        "the target died ({:?}) after the apply: the byte at the removed uprobe is {now:02x?}, was {original:#04x}",
        target.child.try_wait()
    );
    assert_eq!(now, Some(original));
    target.expect_steady(3, |l| l == "value=2042");
}

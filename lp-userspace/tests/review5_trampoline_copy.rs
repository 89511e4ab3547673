//! Review session 5: the trampolines lp-core now copies (fastcli2's copy path) run real gcc
//! entries correctly. A nonstop apply stopped right before its flag store has every site
//! leading to its function's dispatch with the flag clear, so every call runs the old code
//! through the function's trampoline: the output must stay the original one. The entries:
//! - f1: `cmpl $7, g_flag(%rip)` — a RIP-relative operand with an immediate after its
//!   displacement (the displacement counts from the end of the instruction);
//! - f2: `sub $8,%rsp; call helper` — a call as the last displaced instruction (push + jmp,
//!   helper returns into the original f2);
//! - f3: `test; js rel8; mov g_val(%rip),%eax` — a short branch among the displaced bytes,
//!   then a RIP-relative load.

mod common;
use common::*;

const TARGET: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int g_flag = 7;
int g_val = 5;
int __attribute__((noipa)) helper(int x) { return x * 2; }
int __attribute__((noipa)) f1(int x) { if (g_flag == 7) return x * 3; return x - 1; }
int __attribute__((noipa)) f2(int x) { return helper(x) + 1; }
int __attribute__((noipa)) f3(int x) { if (x < 0) return -x; return x * 5 + g_val; }
/* The calls run on a worker: the main thread sleeps, and nonstop mode borrows it (stopped
 * for the whole switch). */
static void *loop(void *arg) {
    (void)arg;
    struct timespec ts = {0, 2000000L};
    for (;;) {
        printf("f1=%d f2=%d f3=%d f3n=%d\n", f1(41), f2(41), f3(41), f3(-4));
        nanosleep(&ts, NULL);
    }
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    pthread_create(&t, NULL, loop, NULL);
    printf("ready\n");
    for (;;) pause();
}
"#;

const NEW: &str = r#"
int f1(int x) { return x + 1000; }
int f2(int x) { return x + 2000; }
int f3(int x) { return x + 3000; }
"#;

const ORIGINAL: &str = "f1=123 f2=83 f3=210 f3n=4";
const PATCHED: &str = "f1=1041 f2=2041 f3=3041 f3n=2996";

/// The first instruction of `func` in `exe` (objdump), to check that gcc produced the entry
/// the test is about.
fn first_insn(exe: &std::path::Path, func: &str) -> String {
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(exe)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let body = text.split(&format!("<{func}>:\n")).nth(1).unwrap();
    body.lines().next().unwrap().to_string()
}

#[test]
fn review5_copied_trampolines_run_the_old_code_before_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("t.c");
    std::fs::write(&src, TARGET).unwrap();
    let new_src = dir.path().join("n.c");
    std::fs::write(&new_src, NEW).unwrap();
    let exe = dir.path().join("t");
    let obj = dir.path().join("n.o");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    cc(
        "gcc",
        &["-O2", "-g", "-Wl,--build-id", &s(&src), "-o", &s(&exe)],
    );
    cc("gcc", &["-O2", "-c", "-fPIC", &s(&new_src), "-o", &s(&obj)]);
    assert!(
        first_insn(&exe, "f1").contains("cmpl   $0x7"),
        "{}",
        first_insn(&exe, "f1")
    );
    assert!(
        first_insn(&exe, "f2").contains("sub"),
        "{}",
        first_insn(&exe, "f2")
    );
    assert!(
        first_insn(&exe, "f3").contains("test"),
        "{}",
        first_insn(&exe, "f3")
    );
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = patch.display().to_string();
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == ORIGINAL);
    for mode in ["nonstop", "stop"] {
        if mode == "nonstop" {
            let mut tool = stop_tool_at(
                &["apply", &pid, &patch, "--mode", "nonstop"],
                "dispatch-flag",
            );
            // Every call goes dispatch -> trampoline -> rest of the old function. (A
            // failure kills the tool first: a stopped tracer would keep the target unreaped.)
            let steady = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                target.expect_steady(10, |l| l == ORIGINAL)
            }));
            if let Err(e) = steady {
                let _ = tool.kill();
                let _ = tool.wait();
                std::panic::resume_unwind(e);
            }
            assert!(target.alive());
            // SAFETY: SIGCONT to the tool this test started.
            unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
            assert!(tool.wait().unwrap().success());
        } else {
            livepatch_ok(&["apply", &pid, &patch, "--mode", mode]);
        }
        target.expect_steady(3, |l| l == PATCHED);
        // While reverting, threads trapping on an entry run the old code through the same
        // trampolines; afterwards the original bytes.
        livepatch_ok(&["revert", &pid, "--mode", mode]);
        target.expect_steady(3, |l| l == ORIGINAL);
    }
}

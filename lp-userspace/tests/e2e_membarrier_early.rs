//! The sync agent registers the process for membarrier's SYNC_CORE as it starts (session 14):
//! a process's first registration makes the kernel wait for an RCU grace period (3–24 ms on
//! this project's VM), which then overlaps the apply's preparation instead of its switch.
//!
//! Seen from the target: a thread of it that asks for a SYNC_CORE barrier — refused (EPERM)
//! until the process is registered — is served while the tool is stopped in its preparation,
//! with the agent's program that maps the patch memory loaded (`agent-call.9`): before any
//! `int3`, and before the switch's own registration (its install's program). Until session 14
//! the registration came with the install, and the thread was refused for as long as the tool
//! stayed stopped there.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// A thread asks for a SYNC_CORE barrier every millisecond until one is served, then prints
/// `registered`; the main thread prints `main=compute(41)` every 20 ms.
const TARGET: &str = r#"
#include "compute_loop.h"
#include <linux/membarrier.h>
#include <pthread.h>
#include <sys/syscall.h>

static void *asker(void *arg) {
    (void)arg;
    while (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) != 0)
        usleep(1000);
    printf("registered\n");
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    pthread_create(&t, NULL, asker, NULL);
    printf("ready %d\n", getpid());
    print_compute_forever("main");
}
"#;

#[test]
fn e2e_the_process_is_registered_for_sync_core_while_the_apply_prepares() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "asker", TARGET, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "main=42");
    // Premise: a fresh process is not registered.
    assert!(
        !target.lines().iter().any(|l| l == "registered"),
        "registered before any apply"
    );

    let tool = stop_tool_at(&nonstop_apply(&pid, &patch), "agent-call.9");
    // Looked for while the tool is stopped (its agent runs on), asserted once it has gone on:
    // a stopped tracer would keep the target from being reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut registered = false;
    while !registered && Instant::now() < deadline {
        registered = target.lines().iter().any(|l| l == "registered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stuck_at_call = target.lines().iter().all(|l| l != "main=1041");
    // SAFETY: a plain kill(2) of the child we started.
    assert_eq!(unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) }, 0);
    let out = tool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stuck_at_call, "the patch was in before the tool went on");
    assert!(
        registered,
        "the process was not registered for SYNC_CORE while the apply prepared (10 s)"
    );
    target.wait_line(|l| l == "main=1041");
}

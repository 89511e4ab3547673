//! Review session 14: a nonstop apply checks the seccomp filters of the threads its SIGTRAP
//! handler may run in during its switch's first look, taken while the patch memory is mapped
//! (ef1e6b2; it was made right after the attach). By then the apply has made its trap area,
//! started its sync agent (when it can), created the state's mapping on a first apply and
//! mapped the patch memory: a refusal there must take all of it out again.
//!
//! Without the agent (the borrowed thread's filters stop one of its calls) the first look is
//! taken by `Early::map_patch` before its ptrace mmap: a path of its own, which review 8's test
//! (an unfiltered borrowed thread, so an agent) does not take.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The main thread ("lp-borrow", the one the tests make nonstop mode borrow) prints
/// compute(41) every 20 ms; a worker (named "worker") puts itself, alone, under a filter that
/// kills the process on gettid (our handler's first call), then calls compute without a pause
/// (a temporary int3 of ours would be met at once) and prints it every 20 ms. argv[1]
/// `agentless`: the main thread then puts itself, alone too, under two filters that kill the
/// process on close_range and on pwrite64, which only the sync agent makes (two, so that its
/// number of filters differs from the worker's and the check reads the worker's own).
const TARGET: &str = r#"
#define _GNU_SOURCE
#include "compute_loop.h"
#include "seccomp_filter.h"
#include <pthread.h>
#include <string.h>

static volatile int worker_ready;

static void *worker(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "worker");
    filter_one_call(SYS_gettid, SECCOMP_RET_KILL_PROCESS, 0);
    worker_ready = 1;
    burst_compute_forever("worker", 0);
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_setname_np(pthread_self(), "lp-borrow");
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    while (!worker_ready) usleep(1000);
    if (argc > 1 && !strcmp(argv[1], "agentless")) {
        filter_one_call(SYS_close_range, SECCOMP_RET_KILL_PROCESS, 0);
        filter_one_call(SYS_pwrite64, SECCOMP_RET_KILL_PROCESS, 0);
    }
    printf("ready %d\n", getpid());
    print_compute_forever("main");
}
"#;

const BORROW: (&str, &str) = ("LIVEPATCH_BORROW_COMM", "lp-borrow");

fn build(dir: &Path) -> (PathBuf, String) {
    compute_target_and_patch(dir, "sandboxedworker", TARGET, &["-pthread"])
}

/// The mappings in `after` that are not in `before`.
fn added<'a>(before: &str, after: &'a str) -> Vec<&'a str> {
    after.lines().filter(|l| !before.contains(*l)).collect()
}

/// A nonstop apply refused for the worker's filter, with the sync agent (`with`) and without
/// it (`agentless`): one error line naming seccomp and the worker, and nothing of the apply
/// left in the target — no trap area, no state mapping, no patch memory (the one anonymous
/// mapping added is the remote-call stub, which stays by design: `process/stub.rs`), no agent
/// thread — which runs on unpatched, then is patched in stop mode (no handler there).
#[test]
fn review14_a_nonstop_apply_refused_in_its_first_look_leaves_nothing_with_or_without_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = build(dir.path());
    for variant in ["with", "agentless"] {
        let mut target = Target::spawn(&exe, &[variant]);
        let pid = target.pid();
        target.expect_steady(3, |l| l == "main=42" || l == "worker=42");
        let threads = tasks(&pid);
        let worker = threads
            .iter()
            .find(|t| task_status(&pid, t, "Name").as_deref() == Some("worker"))
            .expect("the worker thread")
            .clone();
        // Premises: the worker is filtered; the main thread too, alone, in `agentless`.
        assert_eq!(seccomp_of(&pid, &worker), "2");
        let main_filtered = if variant == "agentless" { "2" } else { "0" };
        assert_eq!(seccomp_of(&pid, &pid), main_filtered, "{variant}");
        let before = maps_of(&pid);

        let out = livepatch_env(
            &nonstop_apply(&pid, &patch),
            &[BORROW, ("LIVEPATCH_TRACE", "1")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !target.dies_within(Duration::from_millis(300)),
            "{variant}: the target died: {stderr}"
        );
        assert!(!out.status.success(), "{variant}: applied: {stderr}");
        let agent = stderr
            .lines()
            .find(|l| l.contains("nonstop sync agent "))
            .unwrap_or_else(|| panic!("{variant}: no agent line: {stderr}"));
        assert_eq!(agent.contains("None"), variant == "agentless", "{agent}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("livepatch: trace: "))
            .collect();
        assert_eq!(errors.len(), 1, "{variant}: {stderr}");
        assert!(
            errors[0].starts_with("livepatch: error: ")
                && errors[0].contains("seccomp")
                && errors[0].contains(&format!("thread {worker}")),
            "{variant}: {}",
            errors[0]
        );

        let after = maps_of(&pid);
        let new = added(&before, &after);
        assert!(
            new.iter().all(|l| !l.contains("livepatch")),
            "{variant}: the refused apply left a mapping of ours: {new:?}"
        );
        assert!(
            new.len() <= 1 && new.iter().all(|l| l.contains(" r-xp 00000000 00:00 0")),
            "{variant}: the refused apply left more than the remote-call stub: {new:?}"
        );
        // The agent's exit is waited for before the tool ends; its task entry may go a moment
        // later (the kernel clears its tid before it unlists it).
        let deadline = Instant::now() + PATIENCE;
        while tasks(&pid).len() != threads.len() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(tasks(&pid), threads, "{variant}: a thread was left behind");
        let st = lp_userspace::status::status(Some(target.child.id() as i32)).unwrap();
        assert!(st.iter().all(|p| p.patches.is_empty()), "{st:?}");
        target.expect_steady(3, |l| l == "main=42" || l == "worker=42");

        livepatch_ok(&["apply", &pid, &patch, "--timeout", "60"]);
        target.expect_steady(3, |l| l == "main=1041" || l == "worker=1041");
    }
}

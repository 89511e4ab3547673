//! Review session 8, M1 (what the bench's new stall figure cannot see): a nonstop revert
//! stopped every thread of the target once, after its switch (`wait_threads_outside` with an
//! unwinder: threads blocked in a system call far from the patch were stopped too, to unwind
//! their stacks). The bench's "longest single call overlapping the revert" times only calls of
//! the patched functions, and its threads spend ~98% of their loop in nanosleep: a stop lands
//! there, unseen (stop mode shows it plainly: that figure's median is 2.0 us, the same as with
//! no patching, while the tool's own stop window is ~100 us).
//!
//! The stop is seen here without any clock: a thread blocked in `epoll_wait` returns EINTR when
//! it is stopped by ptrace (epoll_wait is never restarted, see signal(7), "Interruption of
//! system calls and library functions by stop signals"). The target installs no signal
//! handler: nothing else can interrupt it. Since session 12 the revert sees from /proc that a
//! thread blocked far from the patch memory is out of it, with no stop
//! (`nonstop/outside.rs`), and neither the apply nor the revert borrows a thread blocked in
//! such a call while another can be borrowed (`borrow.rs`): no thread of this target is
//! stopped but the one borrowed, the main thread.

mod common;

use common::*;

/// Three threads blocked in epoll_wait on an empty epoll set (no timeout), each printing
/// "eintr" when the call returns EINTR; the main thread prints compute(41) every 20 ms.
const TARGET: &str = r#"
#include "compute_loop.h"
#include <errno.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <unistd.h>

static void *waiter(void *arg) {
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev;
    for (;;) {
        int n = epoll_wait(ep, &ev, 1, -1);
        if (n < 0 && errno == EINTR) printf("eintr\n");
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    for (int i = 0; i < 3; i++) pthread_create(&t, NULL, waiter, NULL);
    printf("ready %d\n", getpid());
    print_compute_forever("v");
}
"#;

#[test]
fn review8_nonstop_revert_leaves_threads_blocked_elsewhere_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "epollers", TARGET, &["-pthread"]);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "v=42");
    livepatch_ok(&nonstop_apply(&pid, &patch));
    target.expect_steady(3, |l| l == "v=1041");
    let after_apply = target.lines().iter().filter(|l| *l == "eintr").count();
    livepatch_ok(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);
    target.expect_steady(3, |l| l == "v=42");
    let after_revert = target.lines().iter().filter(|l| *l == "eintr").count() - after_apply;
    // Each traces one thread, never an epoll waiter while the main thread (blocked in its
    // sleep, or running) can be borrowed: at most that one is disturbed.
    assert_eq!(after_apply, 0, "the nonstop apply interrupted epoll_wait");
    assert_eq!(
        after_revert, 0,
        "the nonstop revert stopped {after_revert} of the 3 threads blocked in epoll_wait \
         (each returned EINTR)"
    );
}

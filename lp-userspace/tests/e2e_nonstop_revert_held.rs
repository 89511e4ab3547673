//! A nonstop revert frees the patch memory only once no thread can return into it (session 12:
//! threads are seen outside from /proc, without a stop, `nonstop/outside.rs`). A thread
//! blocked in a call made from the patch's code holds the memory: the revert keeps it mapped
//! (its `--timeout` runs out), and the thread, let go afterwards, returns into the patch's
//! code and on — it would die of SIGSEGV, and the process with it, had the memory been
//! unmapped under it. The same for a thread whose call made from the patch's code was
//! interrupted by a signal whose handler blocks on an alternate stack (`sigaltstack`): the
//! way back into the patch's code is on the thread's own stack, below the signal frame that
//! the handler's stack holds (review 11, H1: the search follows it there). Either way the
//! thread waits in `epoll_wait`, which each ptrace stop ends with EINTR: the revert stops it
//! once to confirm it is inside, not again while it stays blocked there (before session 12:
//! every 200 µs until `--timeout`, hundreds of EINTRs).

mod common;

use common::*;
use std::io::Write;

/// A worker calls work(41) and prints it every 20 ms; the patch's work() calls hold() first,
/// which waits in epoll_wait for the FIFO argv[1] — directly, or (argv[2] given) inside a SIGUSR1
/// handler it raises, run on the worker's alternate stack — until the test writes a byte.
const TARGET: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

static int fifo;
static int in_handler;

/* Waits in epoll_wait (which a ptrace stop ends with EINTR: "eintr") for the FIFO's byte. */
static void wait_byte(void) {
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fifo, &ev)) _exit(4);
    for (;;) {
        int n = epoll_wait(ep, &ev, 1, -1);
        if (n < 0 && errno == EINTR) {
            static const char msg[] = "eintr\n";
            if (write(1, msg, sizeof msg - 1) < 0) _exit(2);
        }
        char c;
        if (n == 1 && read(fifo, &c, 1) == 1) break;
    }
    close(ep);
}

static void on_usr1(int sig) {
    (void)sig;
    static const char msg[] = "parked in handler\n";
    if (write(1, msg, sizeof msg - 1) < 0) _exit(2);
    wait_byte();
}

void __attribute__((noipa)) hold(void) {
    if (in_handler) {
        raise(SIGUSR1);
    } else {
        printf("parked\n");
        wait_byte();
    }
}

static volatile int big = 1000000;

/* Long enough for the jump. */
int __attribute__((noipa)) work(int x) {
    int r = x + 1;
    if (x > big) r = x * 3;
    return r;
}

static void *worker(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "worker");
    stack_t ss = {.ss_size = 1 << 16};
    ss.ss_sp = mmap(NULL, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ss.ss_sp == MAP_FAILED || sigaltstack(&ss, NULL)) _exit(3);
    for (;;) {
        printf("w=%d\n", work(41));
        usleep(20000);
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    fifo = open(argv[1], O_RDWR);
    if (fifo < 0) return 1;
    in_handler = argc > 2;
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    for (;;) pause();
}
"#;

/// The patch: work() calls the program's hold() first.
const PATCH: &str = r#"
void hold(void);
int work(int x) { hold(); return x + 1000; }
"#;

/// `borrow`: the thread the revert borrows (`LIVEPATCH_BORROW_COMM`): the worker (its stack is
/// searched in its registers' stop) or the main thread, "held" (the worker is looked at
/// through /proc, never stopped before the search finds its way back).
fn held_by_a_blocked_call(in_handler: bool, borrow: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "held", TARGET, &["-pthread"]);
    let src = dir.path().join("new_held.c");
    std::fs::write(&src, PATCH).unwrap();
    let obj = object(dir.path(), src.to_str().unwrap(), "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let fifo = dir.path().join("fifo");
    cc("mkfifo", &[fifo.to_str().unwrap()]);
    let mut args = vec![fifo.to_str().unwrap()];
    if in_handler {
        args.push("handler");
    }
    let mut target = Target::spawn(&exe, &args);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "w=42");
    livepatch_ok(&nonstop_apply(&pid, patch.to_str().unwrap()));
    let parked = if in_handler {
        "parked in handler"
    } else {
        "parked"
    };
    target.wait_line(|l| l == parked);
    let parked_at = target.count();
    let revert = [
        "revert",
        &pid,
        "--mode",
        "nonstop",
        "--timeout",
        "1",
        "--json",
    ];
    let out = livepatch_env(&revert, &[("LIVEPATCH_BORROW_COMM", borrow)]);
    assert!(out.status.success(), "{out:?}");
    let out = String::from_utf8_lossy(&out.stdout);
    let reverted: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        reverted["code_freed"], false,
        "the patch memory was freed while a thread was in a call made from it: {out}"
    );
    // Stopped once (by the revert's check, or as the thread borrowed), not every 200 µs of
    // the timeout: one EINTR of its epoll_wait at most.
    let eintrs = target.lines()[parked_at..]
        .iter()
        .filter(|l| *l == "eintr")
        .count();
    assert!(
        eintrs <= 1,
        "the worker, blocked in a call made from the patch's code, was stopped {eintrs} times"
    );
    // Let go: back into the patch's code (1041), then the old code again.
    let mark = target.count();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    target.wait_line_after(mark, |l| l == "w=1041");
    target.expect_steady(3, |l| l == "w=42");
    assert!(target.alive(), "the target died");
}

#[test]
fn e2e_nonstop_revert_keeps_memory_a_blocked_call_returns_into() {
    held_by_a_blocked_call(false, "held");
    held_by_a_blocked_call(false, "worker");
}

#[test]
fn e2e_nonstop_revert_keeps_memory_a_handler_on_an_alternate_stack_returns_into() {
    held_by_a_blocked_call(true, "held");
    held_by_a_blocked_call(true, "worker");
}

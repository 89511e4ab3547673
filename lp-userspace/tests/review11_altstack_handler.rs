//! Review 11: a thread whose stack pointer is in a signal alternate stack (sigaltstack) has
//! frames on its own stack too: those of the context the signal interrupted. Settle searched
//! only the mapping its stack pointer is in (stacks.rs `stack_refers_to`: from sp to the end of
//! that mapping), so a signal frame below them on the thread's own stack, whose saved rip is
//! between the instructions a nonstop switch rewrites, was not seen: the thread counted as
//! moved on, the bytes were rewritten under it, and it resumed in the middle of the new jump.
//!
//! The target is parked.c's (review N3) with one more handler: its SIGSEGV handler (run on the
//! thread's own stack, interrupted context at compute + 3, between the site's two
//! instructions) raises SIGUSR1, whose handler runs on an alternate stack (SA_ONSTACK) and
//! blocks in read() until the test's byte. The apply must be busy, as for parked.c's handler,
//! whether that thread is the one borrowed (settle's look at its stack) or not (the wait's).

mod common;
use common::*;
use std::time::Duration;

const TARGET: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int compute(int x, const int *p);
__asm__(".text\n"
        ".globl compute\n"
        ".type compute, @function\n"
        "compute:\n"
        "\t.cfi_startproc\n"
        "\tlea (%rdi,%rdi,2), %eax\n"
        "\tadd (%rsi), %eax\n"
        "\tret\n"
        "\t.cfi_endproc\n"
        ".size compute, .-compute\n");

static int *page;
static int fifo;
static volatile int segvs;

static void wait_byte(void) {
    char c;
    while (read(fifo, &c, 1) != 1) {
    }
}

/* On the alternate stack: blocks until the test's byte. */
static void on_usr1(int sig) {
    (void)sig;
    static const char msg[] = "parked\n";
    if (write(1, msg, sizeof msg - 1) < 0) _exit(2);
    wait_byte();
}

/* On the thread's own stack (no SA_ONSTACK): its frame holds rip = compute + 3. */
static void on_segv(int sig, siginfo_t *si, void *ctx) {
    (void)sig; (void)si; (void)ctx;
    if (segvs++) {
        static const char bad[] = "bad segv\n";
        if (write(1, bad, sizeof bad - 1) < 0) {}
        _exit(3);
    }
    raise(SIGUSR1);
    mprotect(page, 4096, PROT_READ | PROT_WRITE);
    page[0] = 5;
}

static void *parker(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "parker");
    stack_t ss;
    ss.ss_size = 65536;
    ss.ss_flags = 0;
    ss.ss_sp = mmap(NULL, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ss.ss_sp == MAP_FAILED || sigaltstack(&ss, NULL)) exit(1);
    for (;;) {
        printf("compute %d\n", compute(1, page));
        wait_byte();
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    fifo = open(argv[1], O_RDWR);
    page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fifo < 0 || page == MAP_FAILED) return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, NULL);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    printf("ready %d\n", getpid());
    pthread_t t;
    pthread_create(&t, NULL, parker, NULL);
    for (;;) pause();
}
"#;

#[test]
fn review11_a_handler_on_an_alternate_stack_does_not_hide_an_interrupted_frame_waited_for() {
    parked_on_an_alternate_stack("altparked");
}

#[test]
fn review11_a_handler_on_an_alternate_stack_does_not_hide_an_interrupted_frame_borrowed() {
    parked_on_an_alternate_stack("parker");
}

/// `borrow`: the thread the apply borrows (`LIVEPATCH_BORROW_COMM`): the main thread
/// ("altparked", in pause()) or the parked one ("parker").
fn parked_on_an_alternate_stack(borrow: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "altparked", TARGET, &["-pthread"]);
    let obj = object(dir.path(), "new_parked.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = patch.display().to_string();
    let fifo = dir.path().join("release");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c_fifo is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let mut target = Target::spawn(&exe, &[fifo.to_str().unwrap()]);
    let pid = target.pid();
    target.wait_line(|l| l == "parked");
    std::thread::sleep(Duration::from_millis(100)); // in the SIGUSR1 handler's read()

    let out = livepatch_env(
        &["apply", &pid, &patch, "--mode", "nonstop", "--timeout", "1"],
        &[("LIVEPATCH_BORROW_COMM", borrow), ("LIVEPATCH_TRACE", "1")],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let applied = out.status.success();

    // Released: the SIGUSR1 handler returns, then the SIGSEGV handler, and the add at
    // compute + 3 runs from whatever bytes are there (the original add: 8).
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    std::io::Write::write_all(&mut w, b"x").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        let seen = target
            .lines()
            .into_iter()
            .find(|l| l.starts_with("compute ") || l == "bad segv");
        if let Some(l) = seen {
            break l;
        }
        if !target.alive() {
            break "died".into();
        }
        if std::time::Instant::now() > deadline {
            break "nothing".into();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        !applied,
        "the apply rewrote the bytes under a thread whose interrupted context is inside them \
         (then: {outcome:?}): {err}"
    );
    // The thread asked for was the one borrowed (the trace names it).
    let main_borrowed = format!("installed (borrowed thread [{pid}])");
    assert_eq!(
        err.contains(&main_borrowed),
        borrow == "altparked",
        "not the thread asked for: {err}"
    );
    assert!(err.contains("livepatch: error: busy"), "{err}");
    assert_eq!(outcome, "compute 8");
    assert!(target.alive());
}

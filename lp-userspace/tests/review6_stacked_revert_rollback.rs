//! Review session 6, finding 1: a nonstop revert of a patch stacked on another restores the
//! function entries before the callers' second step (`flag.then`: from the top patch's
//! dispatch on to the patch below's code). When one of those last windows fails (here: a
//! uprobe put on the caller meanwhile, "changed by someone else"), the whole switch is rolled
//! back — the restored entries included: a jump is written again over original entry bytes
//! between whose instructions a thread may be by then. Entries restored last (the documented
//! order) never need that.
//!
//! The target: `work` (stacked: a patch below and one on top, a direct caller in main) and
//! `compute` (replaced by the top patch only), whose first two instructions make its site. The
//! revert is stopped right after compute's original bytes are back (the last sync of the
//! entries' window); a thread then calls compute, faults on its second instruction (a
//! PROT_NONE page) and parks in its SIGSEGV handler with the saved rip at compute + 3. A
//! uprobe goes on main's `call work`, the revert goes on, fails in the callers' last window
//! and rolls back. Released, the thread resumes at compute + 3: that must still be the `add`
//! it was interrupted in (result 8), not the middle of a jump (a second fault elsewhere kills
//! the target). Needs root and tracefs (skipped otherwise).

mod common;
use common::uprobe::{direct_calls, disassembly, tracefs_missing, Stopped, Uprobe};
use common::*;
use std::time::{Duration, Instant};

const TARGET: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
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

int __attribute__((noipa)) work(int x) { int r = x + 1; if (x > 1000000) r = x * 3; return r; }


/* Two parkers, each reading its own FIFO (argv[1]0, argv[1]1): the tool borrows one thread
 * for the switch (stopped by ptrace), and the test uses a parker it did not borrow. */
static int *page;
static __thread int fifo;

static void wait_byte(void) {
    char c;
    while (read(fifo, &c, 1) != 1) {
    }
}

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    (void)sig; (void)ctx;
    if (si->si_addr != (void *)page) {
        /* Not the planned fault: die of it. */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    static const char msg[] = "parked\n";
    if (write(1, msg, sizeof msg - 1) < 0) _exit(2);
    wait_byte();
    mprotect(page, 4096, PROT_READ | PROT_WRITE);
    page[0] = 5;
}

static const char *base;

static void *parker(void *arg) {
    char path[4096];
    snprintf(path, sizeof path, "%s%ld", base, (long)arg);
    fifo = open(path, O_RDWR);
    if (fifo < 0) _exit(3);
    printf("parker %ld %d\n", (long)arg, (int)gettid());
    for (;;) {
        wait_byte();
        printf("compute %d\n", compute(1, page));
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    base = argv[1];
    page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, parker, (void *)0L);
    pthread_create(&t, NULL, parker, (void *)1L);
    usleep(100000);
    printf("ready %d\n", getpid());
    struct timespec ts = {0, 5000000L};
    for (;;) {
        printf("work=%d\n", work(41));
        nanosleep(&ts, NULL);
    }
}
"#;

const BELOW: &str = "int work(int x) { return x + 1001; }\n";
const TOP: &str = "int work(int x) { return x + 2001; }\n\
                   int compute(int x, const int *p) { return x * 3 + *p + 1000; }\n";

fn object_of(dir: &std::path::Path, name: &str, source: &str) -> std::path::PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(format!("{name}.o"));
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    cc("gcc", &["-O2", "-c", "-fPIC", s, "-o", o]);
    out
}

/// (file vaddr of `compute`, file vaddr of main's (last) `call work`), from objdump.
fn addresses(exe: &std::path::Path) -> (u64, u64) {
    let text = disassembly(exe);
    let compute = text
        .lines()
        .find(|l| l.ends_with(" <compute>:"))
        .map(|l| u64::from_str_radix(l.split_whitespace().next().unwrap(), 16).unwrap())
        .expect("compute in objdump");
    let call = direct_calls(&text, "main", "work").pop();
    (compute, call.expect("main calls work directly"))
}

fn read(pid: &str, addr: u64, len: usize) -> Vec<u8> {
    lp_userspace::process::Memory::open(pid.parse().unwrap())
        .unwrap()
        .read_vec(addr, len)
        .unwrap()
}

/// Waits for a line after `mark` starting with one of `prefixes`, or the target's death.
fn next_event(target: &mut Target, mark: usize, prefixes: &[&str]) -> Option<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(l) = target
            .lines()
            .iter()
            .skip(mark)
            .find(|l| prefixes.iter().any(|p| l.starts_with(p)))
        {
            return Some(l.clone());
        }
        if !target.alive() {
            return None;
        }
        assert!(Instant::now() < deadline, "no event: {:?}", target.lines());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn review6_1_a_failed_stacked_revert_never_rolls_a_jump_back_over_restored_entry_bytes() {
    if tracefs_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "stackpark", TARGET, &["-pthread"]);
    let below = object_of(dir.path(), "below", BELOW);
    let top = object_of(dir.path(), "top", TOP);
    let (below, _) = pack(dir.path(), &exe, &below, &[], "below.lp");
    let (top, _) = pack(dir.path(), &exe, &top, &[], "top.lp");
    let (below, top) = (below.display().to_string(), top.display().to_string());
    let base = dir.path().join("fifo");
    for i in 0..2 {
        cc("mkfifo", &[&format!("{}{i}", base.display())]);
    }
    let mut target = Target::spawn(&exe, &[base.to_str().unwrap()]);
    let pid = target.pid();
    let parkers: Vec<(String, String)> = (0..2)
        .map(|i| {
            let l = target.wait_line(|l| l.starts_with(&format!("parker {i} ")));
            let tid = l.rsplit(' ').next().unwrap().to_string();
            (format!("{}{i}", base.display()), tid)
        })
        .collect();
    let (compute_vaddr, call_vaddr) = addresses(&exe);
    let bias = bias(pid.parse().unwrap(), &exe);
    let compute = bias + compute_vaddr;
    let original = read(&pid, compute, 5);
    assert_eq!(original[0], 0x8d, "compute starts with its lea");

    livepatch_ok(&["apply", &pid, &below, "--mode", "nonstop"]);
    livepatch_ok(&["apply", &pid, &top, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "work=2042" || l.starts_with("compute"));

    // Which sync is the last of the revert's entries' window (LIVEPATCH_TRACE): a revert, and
    // the top patch applied again.
    let n = revert_syncs_before(&pid, "entries' window done");
    livepatch_ok(&["apply", &pid, &top, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "work=2042" || l.starts_with("compute"));

    // Stopped at the last sync of the entries' window: compute is whole again. (The tool is
    // killed if the test fails while it is stopped: it traces a thread of the target.)
    let mut tool = Stopped::at(
        &["revert", &pid, "--mode", "nonstop"],
        &format!("nonstop-sync:{n}"),
    );
    assert_eq!(
        read(&pid, compute, 5),
        original,
        "compute's original bytes are back at sync {n} of the revert"
    );
    // A thread enters compute's original code and is interrupted between its first two
    // instructions (parked in its SIGSEGV handler, rip saved at compute + 3).
    // (Not the thread the tool borrowed: that one is stopped until the end of the switch.)
    let fifo = &parkers
        .iter()
        .find(|(_, tid)| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"));
            status.unwrap().contains("TracerPid:\t0\n")
        })
        .expect("a parker not borrowed")
        .0;
    let mark = target.count();
    std::fs::write(fifo, b"x").unwrap();
    target.wait_line_after(mark, |l| l == "parked");
    // Someone probes main's call of work meanwhile: the callers' last window finds it changed.
    let probe = Uprobe::add("lpreview6", &format!("r6_{pid}"), &exe, call_vaddr);
    let Some(_probe) = probe else {
        eprintln!("cannot add a uprobe: skipped");
        return;
    };
    let out = tool.go_on();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("revert: {} {stderr}", out.status);

    // The parked thread goes on from compute + 3.
    let mark = target.count();
    std::fs::write(fifo, b"x").unwrap();
    let event = next_event(&mut target, mark, &["compute", "parked"]);
    assert!(
        event.as_deref().is_some_and(|l| l == "compute 8"),
        "the thread interrupted at compute + 3 did not resume in compute's add: {event:?} \
         (compute holds {:x?} now, target status {:?}; the revert said: {stderr})",
        if target.alive() {
            read(&pid, compute, 5)
        } else {
            vec![]
        },
        target.child.try_wait()
    );
    assert!(target.alive());
}

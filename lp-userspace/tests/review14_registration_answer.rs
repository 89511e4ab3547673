//! Review 2 of session 14: the sync agent registers the process for membarrier's SYNC_CORE as
//! it starts (78e1f5a), and the tool's request waits behind that registration, up to 1 s, while
//! the agent's page says it registers. A registration that outlasts the request's own wait
//! (`ANSWER_WAIT`, 100 ms; 150 ms were seen on a loaded machine) must still leave the agent
//! that wait to answer once it is over: the tool gave up at its first look after the word was
//! cleared — the agent then in the middle of the request — cancelled the program and left the
//! switch to ptrace.
//!
//! The agent is held through ptrace by this test, as a starved or preempted thread would be:
//! first in its registration (or at its entry), until the tool's request has waited more than
//! 100 ms; then, the registration over and the word cleared, at its first call of the request
//! for a moment (20 ms). The tool must not cancel the program meanwhile.
//!
//! The holds are margins, not measures: an attempt whose premises a loaded machine spoiled (the
//! registration over before the test held the agent; the test itself kept from a CPU so long
//! that the tool's waits ran out by design) proves nothing either way, and is made again with
//! a fresh process, up to five times.

mod common;
use common::*;
use lp_userspace::process::ptrace::{self, WaitStatus};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// A fresh process (never registered for membarrier): prints `main=compute(41)` every 20 ms.
const TARGET: &str = r#"
#include "compute_loop.h"
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    print_compute_forever("main");
}
"#;

// The agent's page words (lp-userspace/src/apply/switch/nonstop/sync_agent.rs; checked
// against it by the test).
const REQ: u64 = 0;
const DONE: u64 = 4;
const TID: u64 = 16;
const REGISTERING: u64 = 20;
const NEXT: u64 = 216;
const CANCELLED: u32 = 1 << 31;

/// The agent's page: the last page of the trap area's data mapping (see agent_watched.h).
fn agent_page(pid: &str) -> Option<u64> {
    maps_of(pid)
        .lines()
        .filter(|l| l.contains("livepatch-trap.4"))
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let hi = u64::from_str_radix(range.split_once('-')?.1, 16).ok()?;
            (perms.as_bytes()[1] == b'w').then_some(hi - 4096)
        })
}

fn try_word(mem: &std::fs::File, page: u64, off: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read_exact_at(&mut b, page + off).ok()?;
    Some(u32::from_le_bytes(b))
}

fn word(mem: &std::fs::File, page: u64, off: u64) -> u32 {
    try_word(mem, page, off).expect("the agent's page read")
}

/// Waits for the next stop of `tid` (traced by us).
fn stopped(tid: i32) -> Result<WaitStatus, String> {
    match ptrace::wait(tid, false) {
        Ok(Some((_, st))) if st != WaitStatus::Gone => Ok(st),
        other => Err(format!("the agent did not stop: {other:?}")),
    }
}

/// How an attempt went (see the module documentation).
enum Attempt {
    /// The tool waited for the agent: its program was not cancelled.
    Waited,
    /// The tool cancelled the agent's program this long after the test let the agent end its
    /// registration.
    Cancelled(Duration),
    /// The premises did not hold: why.
    Inconclusive(String),
}

/// Holds the agent `agent` (seized and interrupted by the caller) as the module documentation
/// says. Every return leaves it stopped: the caller detaches it before it asserts anything (a
/// test that panics with a thread of the target traced could not reap the target).
fn hold(agent: i32, mem: &std::fs::File, page: u64) -> Result<Attempt, String> {
    // In its registration (a process's first makes the kernel wait for an RCU grace period,
    // 3-24 ms here), it stops at its end, the word still set; before it, it is taken to the
    // registration's entry.
    let mut st = stopped(agent)?;
    let mut stops = 0;
    while word(mem, page, REGISTERING) == 0 {
        let regs = ptrace::get_regs(agent).map_err(|e| e.to_string())?;
        if st == WaitStatus::Syscall && regs.orig_rax as i64 == libc::SYS_futex {
            return Ok(Attempt::Inconclusive(
                "the agent's registration was over before the test held it".into(),
            ));
        }
        stops += 1;
        if stops > 32 {
            return Err("the agent never came to its registration".into());
        }
        ptrace::syscall(agent).map_err(|e| e.to_string())?;
        st = stopped(agent)?;
    }
    // The tool's request, made behind the registration: waited for more than its 100 ms, less
    // than the registration's 1 s.
    let deadline = Instant::now() + PATIENCE;
    while word(mem, page, REQ) == 0 {
        if Instant::now() > deadline {
            return Err("the tool made no request".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    if word(mem, page, NEXT) & CANCELLED != 0 {
        return Ok(Attempt::Inconclusive(
            "the tool gave up during the registration (the test was kept from a CPU for 1 s?)"
                .into(),
        ));
    }
    // The registration ends (or is made now), the word is cleared, and the agent is held again
    // at the first system call of the request's program. `resumed`: when it was last let go
    // before that; the word was cleared after it.
    let mut resumed;
    loop {
        resumed = Instant::now();
        ptrace::syscall(agent).map_err(|e| e.to_string())?;
        st = stopped(agent)?;
        if st == WaitStatus::Syscall && word(mem, page, REGISTERING) == 0 {
            break;
        }
    }
    if word(mem, page, DONE) == word(mem, page, REQ) {
        return Err("the agent had answered before it was held again".into());
    }
    let held_until = Instant::now() + Duration::from_millis(20);
    while Instant::now() < held_until {
        if word(mem, page, NEXT) & CANCELLED != 0 {
            return Ok(Attempt::Cancelled(resumed.elapsed()));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(Attempt::Waited)
}

/// One attempt on a fresh process (see the module documentation).
fn attempt(exe: &std::path::Path, patch: &str) -> Attempt {
    let target = Target::spawn(exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "main=42");

    // The tool in the agent's clone (its entry stop): the area is there, the agent not yet.
    let tool = stop_tool_at(&nonstop_apply(&pid, patch), "agent-start.4");
    // Read while the tool is stopped, asserted once it has gone on: a stopped tracer would
    // keep the target from being reaped.
    let page = agent_page(&pid);
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let tid_before = page.and_then(|page| try_word(&mem, page, TID));
    // SAFETY: a plain kill(2) of the child we started.
    assert_eq!(unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) }, 0);
    let page = page.expect("the trap area's data mapping");
    assert_eq!(tid_before, Some(0), "an agent before the clone");
    let deadline = Instant::now() + PATIENCE;
    let agent = loop {
        let tid = word(&mem, page, TID);
        if tid != 0 {
            break tid as i32;
        }
        assert!(Instant::now() < deadline, "no agent started");
    };
    ptrace::seize(agent).unwrap();
    ptrace::interrupt(agent).unwrap();
    let held = hold(agent, &mem, page);
    let _ = ptrace::detach(agent, 0);
    let out = tool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.wait_line(|l| l == "main=1041");
    held.unwrap()
}

#[test]
fn review14_a_request_behind_a_long_registration_gets_its_answer() {
    // This test's copy of the agent page's layout is the agent's.
    for (name, value) in [
        ("REQ", REQ),
        ("DONE", DONE),
        ("TID", TID),
        ("REGISTERING", REGISTERING),
        ("NEXT", NEXT),
        ("CANCELLED", u64::from(CANCELLED)),
    ] {
        assert_eq!(agent_constant(name), value, "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "registers", TARGET, &[]);
    let mut spoiled = Vec::new();
    for _ in 0..5 {
        match attempt(&exe, &patch) {
            Attempt::Waited => return,
            // The tool may give up `ANSWER_WAIT` (100 ms) after the registration's end, by
            // design: sooner, it did not wait for the agent (it gave up at its first look
            // after the word was cleared, within a millisecond).
            Attempt::Cancelled(after) if after < Duration::from_millis(60) => panic!(
                "the tool cancelled the agent's program {after:?} after its registration's \
                 end (the agent was in the middle of it)"
            ),
            Attempt::Cancelled(after) => spoiled.push(format!(
                "cancelled {after:?} after the registration's end (the test was kept from a \
                 CPU?)"
            )),
            Attempt::Inconclusive(why) => spoiled.push(why),
        }
    }
    panic!("no attempt held the agent as planned: {spoiled:?}");
}

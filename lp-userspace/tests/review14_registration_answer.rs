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

mod common;
use common::*;
use lp_userspace::process::ptrace::{self, WaitStatus};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

// The agent's page words (lp-userspace/src/apply/switch/nonstop/sync_agent.rs).
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

/// What the test saw of the agent it held (see the module documentation).
struct Held {
    /// NEXT before the registration's end (the tool's request waited more than 100 ms).
    before: u32,
    /// The agent had answered when it was held again.
    answered_early: bool,
    /// The tool cancelled the program while the agent was held after its registration.
    cancelled: bool,
}

/// Holds the agent `agent` (seized and interrupted by the caller) as the module documentation
/// says. Every return leaves it stopped: the caller detaches it before it asserts anything (a
/// test that panics with a thread of the target traced could not reap the target).
fn hold(agent: i32, mem: &std::fs::File, page: u64) -> Result<Held, String> {
    // In its registration (a process's first makes the kernel wait for an RCU grace period,
    // 3-24 ms here), it stops at its end, the word still set; before it, it is taken to the
    // registration's entry.
    let mut st = stopped(agent)?;
    let mut stops = 0;
    while word(mem, page, REGISTERING) == 0 {
        let regs = ptrace::get_regs(agent).map_err(|e| e.to_string())?;
        if st == WaitStatus::Syscall && regs.orig_rax as i64 == libc::SYS_futex {
            return Err("the agent's registration was over before the test held it".into());
        }
        stops += 1;
        if stops > 32 {
            return Err("the agent never came to its registration".into());
        }
        ptrace::syscall(agent).map_err(|e| e.to_string())?;
        st = stopped(agent)?;
    }
    // The tool's request, made behind the registration: waited for more than its 100 ms.
    let deadline = Instant::now() + PATIENCE;
    while word(mem, page, REQ) == 0 {
        if Instant::now() > deadline {
            return Err("the tool made no request".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = word(mem, page, NEXT);
    // The registration ends (or is made now), the word is cleared, and the agent is held again
    // at the first system call of the request's program.
    loop {
        ptrace::syscall(agent).map_err(|e| e.to_string())?;
        st = stopped(agent)?;
        if st == WaitStatus::Syscall && word(mem, page, REGISTERING) == 0 {
            break;
        }
    }
    let answered_early = word(mem, page, DONE) == word(mem, page, REQ);
    let held_until = Instant::now() + Duration::from_millis(20);
    let mut cancelled = false;
    while Instant::now() < held_until && !cancelled {
        cancelled = word(mem, page, NEXT) & CANCELLED != 0;
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(Held {
        before,
        answered_early,
        cancelled,
    })
}

#[test]
fn review14_a_request_behind_a_long_registration_gets_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(
        dir.path(),
        "registers",
        "#include \"compute_loop.h\"\nint main(void) {\n    setvbuf(stdout, NULL, _IOLBF, 0);\n    printf(\"ready %d\\n\", getpid());\n    print_compute_forever(\"main\");\n}\n",
        &[],
    );
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "main=42");

    // The tool in the agent's clone (its entry stop): the area is there, the agent not yet.
    let tool = stop_tool_at(&nonstop_apply(&pid, &patch), "agent-start.4");
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
    let held = held.unwrap();
    assert_eq!(
        held.before & CANCELLED,
        0,
        "the tool gave up during the registration"
    );
    assert!(!held.answered_early, "held after the agent answered");
    assert!(
        !held.cancelled,
        "the tool cancelled the agent's program right after its registration (the agent was \
         in the middle of it)"
    );
}

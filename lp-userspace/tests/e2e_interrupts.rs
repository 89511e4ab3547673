//! An operator's Ctrl-C (or a SIGTERM from a service manager) in the middle of a switch must not
//! leave the target half-patched: `livepatch apply` holds those signals back until the switch is
//! done, then dies of the signal as usual. The signal is sent while the tool is inside the
//! switch — trap handler installed in the target, every site leading to its dispatch, the
//! commit not yet made: the tool stopped there (`LIVEPATCH_DEBUG_STOP=dispatch-flag`), sent the
//! signal, then continued — and the target must end up wholly patched, with its own SIGTRAP
//! action back. (Sent on a trace line instead, the signal came too late once the tool ran
//! real-time: the switch was over and the tool gone by then.)

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;

/// Whether a thread of process `pid` has a handler of its own for SIGTRAP (`SigCgt`).
fn catches_sigtrap(pid: &str) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cgt = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .unwrap()
        .trim();
    u64::from_str_radix(cgt, 16).unwrap() & (1 << (libc::SIGTRAP - 1)) != 0
}

fn interrupted_mid_switch(signal: i32) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["busy.c"], "busy", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    assert!(!catches_sigtrap(&pid));

    // Stopped there: `stop_tool_at` waits for the stop itself, not only for the line printed
    // right before it (a SIGCONT sent in between would come before the tool's own SIGSTOP, which
    // would then keep it stopped for good, and this test waiting on it).
    let tool = stop_tool_at(
        &["apply", &pid, patch.to_str().unwrap(), "--mode", "nonstop"],
        "dispatch-flag",
    );
    // Inside the switch (the tool stopped): our handler is in the target, every site leads to
    // its dispatch, the flag is not set. The signal comes, then the tool goes on.
    // SAFETY: plain kill(2)s of the child we started.
    assert_eq!(unsafe { libc::kill(tool.id() as i32, signal) }, 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) }, 0);
    let out = tool.wait_with_output().unwrap();
    let (status, rest) = (out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        status.signal(),
        Some(signal),
        "the tool finishes the switch, then dies of the signal: {status:?} {rest:?}"
    );
    // Wholly patched: the new code runs, the state says so, and the process's SIGTRAP action
    // is its own again (our handler gone).
    target.wait_line(|l| l == "value=1041");
    target.expect_steady(3, |l| l == "value=1041");
    assert_eq!(status_json(&pid)[0]["patches"][0]["id"], id.as_str());
    assert!(
        !catches_sigtrap(&pid),
        "our SIGTRAP handler was left behind"
    );
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "value=42");
}

#[test]
fn e2e_ctrl_c_mid_switch_takes_effect_after_it() {
    interrupted_mid_switch(libc::SIGINT);
}

#[test]
fn e2e_sigterm_mid_switch_takes_effect_after_it() {
    interrupted_mid_switch(libc::SIGTERM);
}

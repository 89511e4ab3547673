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
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

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

    let mut tool = Command::new(livepatch_bin())
        .args(["apply", &pid, patch.to_str().unwrap(), "--mode", "nonstop"])
        .env("LIVEPATCH_TRACE", "1")
        .env("LIVEPATCH_DEBUG_STOP", "dispatch-flag")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(tool.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "the tool ended before it reached the commit");
        if line.contains("livepatch: debug: stopped at dispatch-flag") {
            break;
        }
    }
    // Inside the switch (the tool stopped): our handler is in the target, every site leads to
    // its dispatch, the flag is not set. The signal comes, then the tool goes on.
    // SAFETY: plain kill(2)s of the child we started.
    assert_eq!(unsafe { libc::kill(tool.id() as i32, signal) }, 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) }, 0);
    let rest: Vec<String> = stderr.lines().map_while(Result::ok).collect();
    let status = tool.wait().unwrap();
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

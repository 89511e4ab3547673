//! A nonstop apply killed with its int3s on the sites is taken out by the next invocation; its
//! patch memory used to stay mapped for the life of the process (a thread that took one of the
//! int3s might still be sent there by our SIGTRAP handler). A nonstop recovery gives the
//! process's SIGTRAP action back once no thread can still need the handler: then nothing can
//! lead into the memory, and it is unmapped (/proc/PID/maps before and after).

mod common;
use common::*;

/// The mappings of `pid` that overlap `[addr, addr + len)`, as /proc/PID/maps lines.
fn mapped(pid: &str, addr: u64, len: u64) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (s, e) = range.split_once('-').unwrap();
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            s < addr + len && addr < e
        })
        .map(str::to_string)
        .collect()
}

/// Whether process `pid` has a SIGTRAP handler (our nonstop handler, here).
fn catches_sigtrap(pid: &str) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cgt = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .unwrap();
    u64::from_str_radix(cgt.trim(), 16).unwrap() & (1 << (libc::SIGTRAP - 1)) != 0
}

#[test]
fn e2e_a_killed_nonstop_apply_taken_out_by_a_nonstop_revert_frees_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["busy.c"], "busy", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    assert!(!catches_sigtrap(&pid));

    // Killed at its first sync: every int3 of the first window on its site.
    let mut tool = stop_tool_at(
        &["apply", &pid, &patch, "--mode", "nonstop"],
        "nonstop-sync:1",
    );
    tool.kill().unwrap();
    tool.wait().unwrap();
    assert!(target.alive());
    let st = lp_userspace::state::read(pid.parse().unwrap()).unwrap();
    assert!(st.unfinished.is_some(), "the apply is marked unfinished");
    let (addr, len) = (st.patches[0].code_addr, st.patches[0].code_len);
    assert!(
        !mapped(&pid, addr, len).is_empty(),
        "the killed apply's memory is mapped"
    );
    assert!(catches_sigtrap(&pid), "the killed switch's handler is left");

    let out = livepatch(&["revert", &pid, "--mode", "nonstop"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("taken out"), "{stderr}");
    assert_eq!(status_json(&pid)[0]["patches"].as_array().unwrap().len(), 0);
    assert!(!catches_sigtrap(&pid), "the handler is given back");
    assert_eq!(
        mapped(&pid, addr, len),
        Vec::<String>::new(),
        "the patch memory at {addr:#x} is still mapped"
    );
    target.expect_steady(3, |l| l == "value=42");
    assert!(target.alive());

    // Patched and unpatched as usual afterwards.
    livepatch_ok(&["apply", &pid, &patch, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "value=1041");
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "value=42");
}

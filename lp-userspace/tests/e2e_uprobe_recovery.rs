//! Review session 4, L6: after a livepatch is killed in the middle of a switch, the next one
//! finishes it, and an `int3` on one of the switch's sites looks like a leftover of ours. A
//! uprobe (perf probe, bpftrace) put on the function meanwhile must not be taken for one and
//! written over: the probe would silently stop firing. Only nonstop mode leaves int3s, and
//! only while its SIGTRAP handler is installed; a process without one has none of ours.
//!
//! A stop-mode revert is killed between its writes and its commit (every original byte back,
//! the record still marked), a real uprobe is put on work()'s entry through tracefs, and the
//! next `livepatch revert` finishes the revert: the probe's int3 is still there and still
//! counts hits. Needs root and tracefs (skipped otherwise).

mod common;
use common::uprobe::{byte_at, tracefs_missing, Uprobe};
use common::*;

const TARGET: &str = r#"
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int __attribute__((noipa)) work(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 7;
    return r;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec ts = {0, 5000000L};
    printf("ready %d\n", getpid());
    for (;;) {
        printf("value=%d\n", work(41));
        nanosleep(&ts, NULL);
    }
}
"#;

const NEW: &str = "int work(int x) { return x + 1000; }\n";

/// work()'s file vaddr (= its file offset in gcc's PIE output), from nm.
fn work_vaddr(exe: &std::path::Path) -> u64 {
    let out = std::process::Command::new("nm").arg(exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.ends_with(" T work"))
        .expect("work in nm");
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

#[test]
fn e2e_a_uprobe_on_a_site_of_a_killed_revert_is_kept_by_the_recovery() {
    if tracefs_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "w", TARGET, &[]);
    let new_src = dir.path().join("n.c");
    std::fs::write(&new_src, NEW).unwrap();
    let obj = dir.path().join("n.o");
    let (src, o) = (new_src.to_str().unwrap(), obj.to_str().unwrap());
    cc("gcc", &["-O2", "-c", "-fPIC", src, "-o", o]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = patch.display().to_string();

    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "value=42");
    let vaddr = work_vaddr(&exe);
    let entry = bias(pid.parse().unwrap(), &exe) + vaddr;
    let original = byte_at(&pid, entry);
    livepatch_ok(&["apply", &pid, &patch]);
    target.expect_steady(3, |l| l == "value=1041");

    // Killed with every original byte back and the record still marked "reverting".
    let mut tool = stop_tool_at(&["revert", &pid], "switch-written");
    tool.kill().unwrap();
    tool.wait().unwrap();
    target.expect_steady(3, |l| l == "value=42");
    assert_eq!(byte_at(&pid, entry), original);

    // Someone probes work() now.
    let Some(probe) = Uprobe::add("lptest", &format!("r{pid}"), &exe, vaddr) else {
        eprintln!("cannot add a uprobe: skipped");
        return;
    };
    assert_eq!(byte_at(&pid, entry), 0xcc, "the uprobe's int3 is in place");
    assert!(probe.fires_after(0), "the probe fires");

    // The next revert finishes the killed one: the patch is gone, the probe is not.
    let out = livepatch(&["revert", &pid]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("taken out"),
        "{out:?}"
    );
    assert_eq!(status_json(&pid)[0]["patches"].as_array().unwrap().len(), 0);
    assert_eq!(
        byte_at(&pid, entry),
        0xcc,
        "the uprobe's int3 was written over"
    );
    let hits = probe.hits();
    assert!(probe.fires_after(hits), "the probe stopped firing");
    target.expect_steady(3, |l| l == "value=42");

    // The probe's owner takes it out: the kernel puts the original byte back.
    probe.remove();
    assert_eq!(byte_at(&pid, entry), original);
    target.expect_steady(3, |l| l == "value=42");
    assert!(target.alive());
    // And the process can be patched again.
    livepatch_ok(&["apply", &pid, &patch]);
    target.expect_steady(3, |l| l == "value=1041");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == "value=42");
}

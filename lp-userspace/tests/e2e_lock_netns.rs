//! Review session 4, S7: the per-process lock must hold across network namespaces. It is an
//! abstract unix socket, and abstract names live in a network namespace: a livepatch started
//! in another one (`unshare -n`, a container agent sharing the host's pids but not its
//! network, `ip netns exec`) took "the" lock beside a livepatch working on the same process
//! (in nonstop mode each traces a different thread, so ptrace did not keep them apart either),
//! and the first one's commit then dropped the second's record: its patch live, unrecorded,
//! impossible to revert. Needs root (`unshare -n`; skipped otherwise).

mod common;
use common::*;
use std::process::Command;

const TARGET: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int __attribute__((noipa)) f1(int x) { int r = x + 1; if (x > 1000000) r = x * 3; return r; }
int __attribute__((noipa)) f2(int x) { int r = x + 2; if (x > 1000000) r = x * 5; return r; }
static void *idle(void *arg) { for (;;) pause(); return arg; }
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    pthread_create(&t, NULL, idle, NULL);
    struct timespec ts = {0, 5000000L};
    printf("ready %d\n", getpid());
    for (;;) {
        printf("f1=%d f2=%d\n", f1(1), f2(1));
        nanosleep(&ts, NULL);
    }
}
"#;

fn patch_of(dir: &std::path::Path, exe: &std::path::Path, name: &str, src: &str) -> String {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let o = dir.join(format!("{name}.o"));
    let (cs, os) = (c.to_str().unwrap(), o.to_str().unwrap());
    cc("gcc", &["-O2", "-c", "-fPIC", cs, "-o", os]);
    let (p, _) = pack(dir, exe, &o, &[], &format!("{name}.lp"));
    p.display().to_string()
}

#[test]
fn e2e_the_lock_holds_across_network_namespaces() {
    let probe = Command::new("unshare").args(["-n", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("cannot create a network namespace: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "two", TARGET, &["-pthread"]);
    let a = patch_of(dir.path(), &exe, "a", "int f1(int x) { return x + 100; }\n");
    let b = patch_of(dir.path(), &exe, "b", "int f2(int x) { return x + 200; }\n");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "f1=2 f2=3");

    // A holds the lock, stopped in its first remote system call (one thread traced).
    let mut first = stop_tool_at(
        &["apply", &pid, &a, "--mode", "nonstop"],
        "remote-syscall:1",
    );
    // B, from another network namespace, must be kept out like one from ours.
    let second = Command::new("unshare")
        .args([
            "-n",
            livepatch_bin(),
            "apply",
            &pid,
            &b,
            "--mode",
            "nonstop",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr).into_owned();
    // SAFETY: SIGCONT to the tool we started.
    unsafe { libc::kill(first.id() as i32, libc::SIGCONT) };
    assert!(first.wait().unwrap().success(), "A failed");
    assert!(
        !second.status.success(),
        "a livepatch in another network namespace applied beside one holding the lock: {}",
        String::from_utf8_lossy(&second.stdout)
    );
    assert!(
        said.contains("already traced by process") || said.contains("another livepatch"),
        "{said}"
    );

    // Only A went in, and it is recorded.
    target.expect_steady(3, |l| l == "f1=101 f2=3");
    let json = status_json(&pid);
    assert_eq!(json[0]["patches"].as_array().unwrap().len(), 1, "{json}");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == "f1=2 f2=3");
    // Without a holder, the other namespace's livepatch works as usual.
    let out = Command::new("unshare")
        .args(["-n", livepatch_bin(), "apply", &pid, &b])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    target.expect_steady(3, |l| l == "f1=2 f2=201");
    livepatch_ok(&["revert", &pid]);
}

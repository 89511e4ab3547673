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
use common::*;
use std::time::{Duration, Instant};

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

const TRACING: &str = "/sys/kernel/tracing";

/// A uprobe event through tracefs, removed on drop.
struct Uprobe {
    name: String,
}

impl Uprobe {
    fn add(name: &str, exe: &std::path::Path, offset: u64) -> Option<Uprobe> {
        let def = format!("p:lptest/{name} {}:{offset:#x}\n", exe.display());
        append(&format!("{TRACING}/uprobe_events"), &def).ok()?;
        let u = Uprobe { name: name.into() };
        std::fs::write(u.enable_path(), "1").ok()?;
        Some(u)
    }

    fn enable_path(&self) -> String {
        format!("{TRACING}/events/lptest/{}/enable", self.name)
    }

    /// Hits so far (tracefs `uprobe_profile`: file, event, hits).
    fn hits(&self) -> u64 {
        let text = std::fs::read_to_string(format!("{TRACING}/uprobe_profile")).unwrap();
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(self.name.as_str()))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .expect("our event in uprobe_profile")
    }

    /// Waits until the probe has fired more than `than` times.
    fn fires_after(&self, than: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.hits() > than {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn remove(&self) {
        let _ = std::fs::write(self.enable_path(), "0");
        let _ = append(
            &format!("{TRACING}/uprobe_events"),
            &format!("-:lptest/{}\n", self.name),
        );
    }
}

impl Drop for Uprobe {
    fn drop(&mut self) {
        self.remove();
    }
}

fn append(path: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

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

fn byte_at(pid: &str, addr: u64) -> u8 {
    let mem = lp_userspace::process::Memory::open(pid.parse().unwrap()).unwrap();
    mem.read_vec(addr, 1).unwrap()[0]
}

#[test]
fn e2e_a_uprobe_on_a_site_of_a_killed_revert_is_kept_by_the_recovery() {
    if !std::path::Path::new(&format!("{TRACING}/uprobe_events")).exists() {
        eprintln!("no tracefs uprobe_events: skipped");
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
    let Some(probe) = Uprobe::add(&format!("r{pid}"), &exe, vaddr) else {
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

//! Uprobes (perf probe, bpftrace, USDT) put `int3`s into a process's code and take them out
//! again, at any time, through the kernel. A nonstop switch writes each run of nearby sites
//! with one `/proc/PID/mem` write, the bytes between the sites included: they must be read
//! right before that write, not from a copy taken before the window (review session 5, #1:
//! a uprobe removed during the window had its `int3` put back, and the next thread to reach
//! it died of SIGTRAP — no uprobe claimed it, and it was no trap of ours).
//!
//! The tool is stopped at its first sync (every int3 of the callers' window written), the
//! uprobe removed, the tool let go. Needs root and tracefs (skipped otherwise).

mod common;
use common::*;
use std::time::{Duration, Instant};

const TARGET: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int __attribute__((noipa)) work(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 7;
    return r;
}
volatile int sink, sink0;
/* Two direct calls of work() a few bytes apart (its first instruction is long enough that
 * neither call is among the bytes a redirect of caller() would displace). */
int __attribute__((noipa)) caller(int x) {
    sink0 = x;
    int a = work(x);
    sink = a;
    int b = work(a);
    return b + 1;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec ts = {0, 2000000L};
    printf("ready %d\n", getpid());
    for (;;) {
        printf("value=%d\n", caller(41));
        nanosleep(&ts, NULL);
    }
}
"#;

const NEW: &str = "int work(int x) { return x + 1000; }\n";

const TRACING: &str = "/sys/kernel/tracing";

/// A uprobe event, removed on drop.
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

/// The file vaddr of each `call work` in caller(), from objdump.
fn calls_of_work(exe: &std::path::Path) -> Vec<u64> {
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(exe)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let body = text
        .split("<caller>:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap();
    body.lines()
        .filter(|l| l.contains("call") && l.contains("<work>"))
        .map(|l| u64::from_str_radix(l.trim().split(':').next().unwrap(), 16).unwrap())
        .collect()
}

/// The load address of `exe` in `pid` (PIE: file offset 0 mapped there; text vaddr = offset).
fn base(pid: &str, exe: &std::path::Path) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| l.ends_with(exe.to_str().unwrap()))
        .unwrap();
    u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap()
}

fn byte_at(pid: &str, addr: u64) -> Option<u8> {
    let mem = lp_userspace::process::Memory::open(pid.parse().unwrap()).ok()?;
    mem.read_vec(addr, 1).ok().map(|v| v[0])
}

#[test]
fn e2e_a_uprobe_removed_during_a_nonstop_window_stays_removed() {
    if !std::path::Path::new(&format!("{TRACING}/uprobe_events")).exists() {
        eprintln!("no tracefs uprobe_events: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "u", TARGET, &[]);
    let new_src = dir.path().join("n.c");
    std::fs::write(&new_src, NEW).unwrap();
    let obj = dir.path().join("n.o");
    cc(
        "gcc",
        &[
            "-O2",
            "-c",
            "-fPIC",
            new_src.to_str().unwrap(),
            "-o",
            obj.to_str().unwrap(),
        ],
    );
    let calls = calls_of_work(&exe);
    assert_eq!(calls.len(), 2, "caller() calls work() twice: {calls:?}");
    // The instruction right after the first call: between the two call sites.
    let probe = calls[0] + 5;
    assert!(probe < calls[1]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = patch.display().to_string();

    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "value=44");
    let at = base(&pid, &exe) + probe;
    let original = byte_at(&pid, at).unwrap();
    let Some(uprobe) = Uprobe::add(&format!("u{pid}"), &exe, probe) else {
        eprintln!("cannot add a uprobe: skipped");
        return;
    };
    assert_eq!(
        byte_at(&pid, at),
        Some(0xcc),
        "the uprobe's int3 is in place"
    );
    target.expect_steady(3, |l| l == "value=44");

    // The callers' window: every int3 written, the tool stopped before its first sync.
    let mut tool = stop_tool_at(
        &["apply", &pid, &patch, "--mode", "nonstop"],
        "nonstop-sync:1",
    );
    // The uprobe goes (perf probe -d, the end of a bpftrace session): the kernel puts the
    // original byte back.
    uprobe.remove();
    assert_eq!(byte_at(&pid, at), Some(original), "the kernel restored it");
    // SAFETY: SIGCONT to the tool we started.
    unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
    let status = tool.wait().unwrap();
    assert!(status.success(), "apply failed");

    // Nothing of ours belongs at the probed instruction.
    let now = byte_at(&pid, at);
    let deadline = Instant::now() + Duration::from_secs(2);
    while target.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        target.alive(),
        "the target died ({:?}) after the apply: the byte at the removed uprobe is {now:02x?}, was {original:#04x}",
        target.child.try_wait()
    );
    assert_eq!(now, Some(original));
    target.expect_steady(3, |l| l == "value=2042");
}

//! Real uprobes for the tests that check a switch never writes over someone else's `int3`:
//! a probe put on (or taken off) a site through tracefs, as perf probe or bpftrace would,
//! while the tool is stopped in the middle of a switch, and the target's code read back to
//! see whose bytes are there. Needs root and tracefs; the tests skip themselves without them.
// Only the uprobe tests use these; every test binary compiles tests/common.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// Where tracefs is mounted: its `uprobe_events` adds and removes probes, its `uprobe_profile`
/// counts their hits.
pub const TRACING: &str = "/sys/kernel/tracing";

/// True (after printing "skipped") when this machine has no tracefs uprobe events: the uprobe
/// tests then have nothing to probe with and return early instead of failing.
pub fn tracefs_missing() -> bool {
    if Path::new(&format!("{TRACING}/uprobe_events")).exists() {
        return false;
    }
    eprintln!("no tracefs uprobe_events: skipped");
    true
}

/// A uprobe event `group/name` through tracefs, enabled (its `int3` is in the target's code
/// from then on) and removed on drop, so that a failing test leaves no probe behind. Each
/// test passes its own group and a name with the target's pid, so tests running at the same
/// time never touch each other's events.
pub struct Uprobe {
    group: String,
    name: String,
}

impl Uprobe {
    /// Adds and enables a probe on file offset `offset` of `exe`; `None` when tracefs refuses
    /// (not root, or the event exists already): the caller skips its test then.
    pub fn add(group: &str, name: &str, exe: &Path, offset: u64) -> Option<Uprobe> {
        let def = format!("p:{group}/{name} {}:{offset:#x}\n", exe.display());
        append(&format!("{TRACING}/uprobe_events"), &def).ok()?;
        let u = Uprobe {
            group: group.into(),
            name: name.into(),
        };
        std::fs::write(u.enable_path(), "1").ok()?;
        Some(u)
    }

    /// The event's tracefs `enable` file: "1" puts the probe's `int3`s in, "0" takes them out.
    pub fn enable_path(&self) -> String {
        format!("{TRACING}/events/{}/{}/enable", self.group, self.name)
    }

    /// Hits so far (tracefs `uprobe_profile`: file, event, hits): a probe whose `int3` was
    /// written over stops counting.
    pub fn hits(&self) -> u64 {
        let text = std::fs::read_to_string(format!("{TRACING}/uprobe_profile")).unwrap();
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(self.name.as_str()))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .expect("our event in uprobe_profile")
    }

    /// Waits (5 s at most) until the probe has fired more than `than` times: whether it still
    /// works, not just whether its byte is there.
    pub fn fires_after(&self, than: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.hits() > than {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Disables and deletes the event, as its owner would (perf probe -d, the end of a
    /// bpftrace session): the kernel puts the original byte back. Errors are ignored, so that
    /// removing twice (explicitly, then on drop) is harmless.
    pub fn remove(&self) {
        let _ = std::fs::write(self.enable_path(), "0");
        let _ = append(
            &format!("{TRACING}/uprobe_events"),
            &format!("-:{}/{}\n", self.group, self.name),
        );
    }
}

impl Drop for Uprobe {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Appends `text` to a tracefs file: `uprobe_events` takes one command per write, and opening
/// it truncated (as `fs::write` does) would clear every uprobe event on the machine.
pub fn append(path: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// The byte at `addr` in process `pid` (an `int3` is 0xcc): whose byte a site holds is what
/// these tests assert. Panics if it cannot be read.
pub fn byte_at(pid: &str, addr: u64) -> u8 {
    let mem = lp_userspace::process::Memory::open(pid.parse().unwrap()).unwrap();
    mem.read_vec(addr, 1).unwrap()[0]
}

/// [`byte_at`], or `None` when it cannot be read (the target died): for reading a site right
/// after a switch that may have killed the target, so that the test can say so first.
pub fn try_byte_at(pid: &str, addr: u64) -> Option<u8> {
    let mem = lp_userspace::process::Memory::open(pid.parse().unwrap()).ok()?;
    mem.read_vec(addr, 1).ok().map(|v| v[0])
}

/// `objdump -d` of `exe` (no raw bytes): where the call sites a probe goes on are found.
pub fn disassembly(exe: &Path) -> String {
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(exe)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The file vaddrs (= file offsets in gcc's PIE output, what a uprobe is put on) of the
/// direct calls of `callee` in function `caller`, in address order, from [`disassembly`].
pub fn direct_calls(disassembly: &str, caller: &str, callee: &str) -> Vec<u64> {
    let (header, target) = (format!(" <{caller}>:"), format!(" <{callee}>"));
    let mut inside = false;
    let mut calls = Vec::new();
    for l in disassembly.lines() {
        if l.ends_with(">:") {
            inside = l.ends_with(&header);
            continue;
        }
        if inside && l.contains("call") && l.ends_with(&target) {
            let a = l.split(':').next().unwrap().trim();
            calls.push(u64::from_str_radix(a, 16).unwrap());
        }
    }
    calls
}

/// File vaddr of main's (first) `call work`: the caller site callers.c's tests probe.
pub fn main_call_of_work(exe: &Path) -> u64 {
    *direct_calls(&disassembly(exe), "main", "work")
        .first()
        .expect("main calls work directly")
}

/// A tool stopped at a debug point ([`super::stop_tool_at`]), killed if still there when
/// dropped: a stopped tool traces a thread of the target, and a test that fails (or skips)
/// while it is stopped must not leave both hanging.
pub struct Stopped(Option<Child>);

impl Stopped {
    /// Runs `livepatch args...` until it stops itself at `point`.
    pub fn at(args: &[&str], point: &str) -> Stopped {
        Stopped(Some(super::stop_tool_at(args, point)))
    }

    /// Lets the tool go on (SIGCONT) and waits for its end: its status and stderr.
    pub fn go_on(&mut self) -> Output {
        let tool = self.0.take().expect("a stopped tool");
        // SAFETY: kill() with the pid of the child we started and a signal number.
        unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
        tool.wait_with_output().unwrap()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// After a switch that met `probe` on the caller at `site` (its outcome `out`, from the tool
/// doing `what`): the target lives, the probe's int3 is still on the site, and it still fires.
pub fn assert_probe_kept(
    target: &mut super::Target,
    pid: &str,
    site: u64,
    probe: &Uprobe,
    out: &Output,
    what: &str,
) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(target.alive(), "{stderr}");
    assert_eq!(
        byte_at(pid, site),
        0xcc,
        "the uprobe's int3 on main's call of work was written over (the {what} said: {} {stderr})",
        out.status
    );
    let hits = probe.hits();
    assert!(probe.fires_after(hits), "the probe stopped firing");
}

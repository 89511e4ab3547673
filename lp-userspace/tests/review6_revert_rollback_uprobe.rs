//! Review session 6, finding 6 (the revert side of finding 3): a nonstop revert of a patch
//! stacked on another moves the callers the patch below had retargeted in two steps (to the
//! top patch's dispatch, then, after the flag's store, on to the patch below's code). When a
//! caller was changed by someone else between the two (a uprobe put on it), the second step's
//! window fails and the whole switch is rolled back — that caller included, from its first
//! window: its bytes are written over the probe's `int3`, which silently stops firing (the
//! kernel still counts it as installed). Finding 3's fix (0bbaa2a) covers an apply's second
//! step only (a caller left at a dispatch that stays); a revert cannot leave a caller at the
//! dispatch it frees, but its rollback need not write over the probe either (the site leads
//! to the dispatch, which runs the top patch again once the flag is set back).
//!
//! callers.c, patches below (1000 more) and on top (2000 more), both nonstop; the revert of
//! the top one is stopped at the last sync of its first callers' window (every caller at the
//! top patch's dispatch, the flag still set); a real uprobe goes on main's `call work`; the
//! revert goes on. Whatever it does then, the probe's int3 must still be there and fire, and
//! the target must print consistent lines. Needs root and tracefs (skipped otherwise).

mod common;
use common::*;
use std::time::{Duration, Instant};

const TRACING: &str = "/sys/kernel/tracing";

/// A uprobe event through tracefs, removed on drop.
struct Uprobe(String);

impl Uprobe {
    fn add(name: &str, exe: &std::path::Path, offset: u64) -> Option<Uprobe> {
        let def = format!("p:lpreview6/{name} {}:{offset:#x}\n", exe.display());
        append(&format!("{TRACING}/uprobe_events"), &def).ok()?;
        let u = Uprobe(name.into());
        std::fs::write(u.enable_path(), "1").ok()?;
        Some(u)
    }

    fn enable_path(&self) -> String {
        format!("{TRACING}/events/lpreview6/{}/enable", self.0)
    }

    fn hits(&self) -> u64 {
        let text = std::fs::read_to_string(format!("{TRACING}/uprobe_profile")).unwrap();
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(self.0.as_str()))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .expect("our event in uprobe_profile")
    }

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
}

impl Drop for Uprobe {
    fn drop(&mut self) {
        let _ = std::fs::write(self.enable_path(), "0");
        let _ = append(
            &format!("{TRACING}/uprobe_events"),
            &format!("-:lpreview6/{}\n", self.0),
        );
    }
}

fn append(path: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// File vaddr of main's `call work`, from objdump.
fn main_call_of_work(exe: &std::path::Path) -> u64 {
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(exe)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut in_main = false;
    for l in text.lines() {
        if l.ends_with(">:") {
            in_main = l.ends_with(" <main>:");
            continue;
        }
        if in_main && l.contains("call") && l.ends_with(" <work>") {
            let a = l.split(':').next().unwrap().trim();
            return u64::from_str_radix(a, 16).unwrap();
        }
    }
    panic!("main calls work directly")
}

fn byte_at(pid: &str, addr: u64) -> u8 {
    let mem = lp_userspace::process::Memory::open(pid.parse().unwrap()).unwrap();
    mem.read_vec(addr, 1).unwrap()[0]
}

/// A tool stopped at a debug point, killed if still there when dropped.
struct Stopped(Option<std::process::Child>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn review6_6_a_failed_stacked_revert_never_rolls_back_over_a_uprobe() {
    if !std::path::Path::new(&format!("{TRACING}/uprobe_events")).exists() {
        eprintln!("no tracefs uprobe_events: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let n1 = object(dir.path(), "new_work.c", "n1.o", &[]);
    let n2 = object(dir.path(), "new_work2.c", "n2.o", &[]);
    let (below, _) = pack(dir.path(), &exe, &n1, &[], "below.lp");
    let (top, _) = pack(dir.path(), &exe, &n2, &[], "top.lp");
    let (below, top) = (below.display().to_string(), top.display().to_string());
    let mut target = Target::spawn(&exe, &["2"]);
    let pid = target.pid();
    let vaddr = main_call_of_work(&exe);
    let site = bias(pid.parse().unwrap(), &exe) + vaddr;
    livepatch_ok(&["apply", &pid, &below, "--mode", "nonstop"]);
    livepatch_ok(&["apply", &pid, &top, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "direct=2041 tail=102020 pointer=2041");

    // Which sync ends the revert's first callers' window (LIVEPATCH_TRACE): a revert, and the
    // top patch applied again.
    let out = std::process::Command::new(livepatch_bin())
        .args(["revert", &pid, "--mode", "nonstop"])
        .env("LIVEPATCH_TRACE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let trace = String::from_utf8_lossy(&out.stderr);
    let first_done = trace
        .find("callers' windows done")
        .expect("a revert with windows");
    let n = trace[..first_done].matches(" synced").count();
    assert!(n > 0, "{trace}");
    target.expect_steady(3, |l| l == "direct=1041 tail=101020 pointer=1041");
    livepatch_ok(&["apply", &pid, &top, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == "direct=2041 tail=102020 pointer=2041");

    let mut tool = Stopped(Some(stop_tool_at(
        &["revert", &pid, "--mode", "nonstop"],
        &format!("nonstop-sync:{n}"),
    )));
    let tool_pid = tool.0.as_ref().unwrap().id() as i32;
    let Some(probe) = Uprobe::add(&format!("s6_{pid}"), &exe, vaddr) else {
        eprintln!("cannot add a uprobe: skipped");
        return;
    };
    assert_eq!(byte_at(&pid, site), 0xcc, "the uprobe's int3 is in place");
    // SAFETY: kill() with a pid and a signal number.
    unsafe { libc::kill(tool_pid, libc::SIGCONT) };
    let out = tool.0.take().unwrap().wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(target.alive(), "{stderr}");
    assert_eq!(
        byte_at(&pid, site),
        0xcc,
        "the uprobe's int3 on main's call of work was written over (the revert said: {} {stderr})",
        out.status
    );
    let hits = probe.hits();
    assert!(probe.fires_after(hits), "the probe stopped firing");
    if out.status.success() {
        target.expect_steady(3, |l| l == "direct=1041 tail=101020 pointer=1041");
    } else {
        target.expect_steady(3, |l| l == "direct=2041 tail=102020 pointer=2041");
    }
}

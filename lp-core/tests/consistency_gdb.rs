//! The consistency decision on a real stack: a gcc-compiled program blocks in `read` called from
//! `blocker`, called from `worker`, called from `main`; gdb (an unwinder independent of ours)
//! reports its instruction pointer and return addresses, `nm` the functions' ranges. The check
//! must call every function on that stack busy, naming the right frame, and an idle function of
//! the same program safe.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use lp_core::consistency::{
    check, check_with, Busy, CodeRange, EntryRule, Frame, ThreadStack, Verdict,
};

const SOURCE: &str = r#"
#include <unistd.h>
__attribute__((noinline)) int blocker(int fd) { char c; int r = read(fd, &c, 1); return r; }
__attribute__((noinline)) int worker(int fd) { int r = blocker(fd); return r + 1; }
__attribute__((noinline)) int idle_fn(int x) { return x * 3; }
int main(void) {
    int p[2];
    if (pipe(p)) return 1;
    if (write(1, "ready\n", 6) != 6) return 1;
    return worker(p[0]) + idle_fn(2);
}
"#;

/// Kills the fixture however the test ends.
struct Fixture(Child);
impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `name -> [start, start+size)` from `nm -S` (non-PIE: addresses are runtime addresses).
fn range_of(nm: &str, name: &str) -> CodeRange {
    nm.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[3] == name).then(|| {
                let start = u64::from_str_radix(f[0], 16).unwrap();
                CodeRange::new(start, start + u64::from_str_radix(f[1], 16).unwrap())
            })
        })
        .unwrap_or_else(|| panic!("{name} not in nm output:\n{nm}"))
}

/// `#N  0xADDR in name (...)` lines of gdb's backtrace: (address, function name).
fn frames(bt: &str) -> Vec<(u64, String)> {
    bt.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let addr = u64::from_str_radix(f[1].trim_start_matches("0x"), 16).unwrap();
            (addr, f[3].to_string())
        })
        .collect()
}

#[test]
fn functions_on_a_blocked_threads_stack_are_busy_and_an_idle_one_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let (src, exe) = (dir.path().join("t.c"), dir.path().join("t"));
    std::fs::write(&src, SOURCE).unwrap();
    run(Command::new("gcc")
        .args(["-O2", "-no-pie", "-fno-inline", "-o"])
        .arg(&exe)
        .arg(&src));
    let nm = run(Command::new("nm").arg("-S").arg(&exe));

    let mut fixture = Fixture(Command::new(&exe).stdout(Stdio::piped()).spawn().unwrap());
    let mut line = String::new();
    BufReader::new(fixture.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    let pid = fixture.0.id();
    // It is about to block (or blocked) in read(); gdb stops it wherever it is. Retry until the
    // innermost frames are the ones we expect.
    let mut stack = Vec::new();
    for _ in 0..50 {
        let bt =
            run(Command::new("gdb").args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "bt"]));
        stack = frames(&bt);
        let names: Vec<&str> = stack.iter().map(|(_, n)| n.as_str()).collect();
        if names.len() >= 4 && names[1..4] == ["blocker", "worker", "main"] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let names: Vec<&str> = stack.iter().map(|(_, n)| n.as_str()).collect();
    assert!(
        names.len() >= 4 && names[1..4] == ["blocker", "worker", "main"],
        "{stack:?}"
    );

    let ip = stack[0].0; // inside libc's read
    let returns: Vec<u64> = stack[1..].iter().map(|(a, _)| *a).collect();
    let thread = [ThreadStack {
        tid: pid,
        ip,
        return_addresses: &returns,
    }];

    let (blocker, worker, main, idle) = (
        range_of(&nm, "blocker"),
        range_of(&nm, "worker"),
        range_of(&nm, "main"),
        range_of(&nm, "idle_fn"),
    );
    let busy = |range, frame: usize| {
        Verdict::Busy(Busy {
            tid: pid,
            range,
            addr: returns[frame],
            frame: Frame::Return(frame),
        })
    };
    assert_eq!(check(&thread, &[idle]), Verdict::Safe);
    assert_eq!(
        check_with(&thread, &[idle], EntryRule::SafeWhenStopped),
        Verdict::Safe
    );
    assert_eq!(check(&thread, &[idle, blocker]), busy(1, 0));
    assert_eq!(check(&thread, &[worker]), busy(0, 1));
    assert_eq!(check(&thread, &[idle, main]), busy(1, 2));
    // innermost frame first: with worker and blocker both switched, blocker is reported
    assert_eq!(check(&thread, &[worker, blocker]), busy(1, 0));
}

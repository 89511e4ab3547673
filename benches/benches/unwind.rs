//! Unwinder benchmark (harness = false; prints figures).
//!
//! The cost of `unwind::Unwinder::unwind` on a real, ptrace-stopped thread: a C fixture (built
//! here with gcc -O2, no frame pointers) whose threads sleep in `nanosleep` under a recursion of
//! DEPTH frames. Each thread is seized and interrupted, then unwound through its CFI (libc's and
//! the fixture's `.eh_frame`):
//! - cold: the first `unwind` of a fresh `Unwinder`. `for_process` (timed apart) only reads
//!   `/proc/PID/maps` and registers each module lazily: the first unwind that reaches a module
//!   opens its file and reads its `.eh_frame` (in place, through `.eh_frame_hdr`), so the cold
//!   figure includes that loading for the modules this stack passes through, and no FDE row is
//!   cached yet;
//! - warm: later `unwind`s of the same thread on the same `Unwinder` (rows cached).
//!
//! Run: `cargo bench -p lp-benches --bench unwind` (root or ptrace rights; gcc needed).
//! The figures are wall time on a shared machine: read the medians and minimums.

use lp_userspace::process::Tracee;
use lp_userspace::unwind::{ProcMemory, Registers, Unwinder, DEFAULT_MAX_DEPTH};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FIXTURE: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
volatile int sink;
__attribute__((noinline)) int dive(int n) {
    if (n == 0) {
        struct timespec ts = {1000, 0};
        while (nanosleep(&ts, &ts) != 0) {}
        return sink;
    }
    int r = dive(n - 1);
    sink += r;          /* not a tail call: every level keeps a frame */
    return r + 1;
}
static void *thread_main(void *arg) { return (void *)(long)dive((int)(long)arg); }
int main(int argc, char **argv) {
    int deep = atoi(argv[1]);
    pthread_t t;
    pthread_create(&t, NULL, thread_main, (void *)(long)deep);
    printf("ready\n");
    fflush(stdout);
    return dive(2);
}
"#;

/// Frames of `dive` below the deep thread's entry.
const DEEP: usize = 60;
const COLD_ROUNDS: usize = 30;
const WARM_ROUNDS: usize = 2000;

/// The running fixture and its build directory, both gone on drop.
struct Target {
    child: Child,
    dir: PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn summary(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "median {:8.2} µs  min {:8.2} µs  max {:8.2} µs  (n={})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1],
        v.len()
    )
}

fn main() {
    let dir = std::env::temp_dir().join(format!("lp-bench-unwind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = dir.join("unwind_fixture.c");
    let exe = dir.join("unwind_fixture");
    std::fs::write(&src, FIXTURE).expect("write fixture");
    let out = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = Command::new(&exe)
        .arg(DEEP.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fixture");
    let stdout = child.stdout.take().expect("stdout");
    let target = Target { child, dir };
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read fixture");
    assert_eq!(line.trim(), "ready");
    let pid = target.child.id() as i32;
    std::thread::sleep(Duration::from_millis(100)); // both threads reach nanosleep

    // Every thread seized and stopped (PTRACE_SEIZE + PTRACE_INTERRUPT), as apply does.
    let mut tracee = Tracee::attach(pid).expect("attach");
    tracee.stop_all().expect("stop");
    let threads: Vec<(i32, Registers)> = tracee
        .threads()
        .into_iter()
        .map(|tid| {
            (
                tid,
                Registers::from_user_regs(&tracee.regs(tid).expect("regs")),
            )
        })
        .collect();
    let mem = ProcMemory::open(pid).expect("open /proc/PID/mem");

    println!("unwinding a ptrace-stopped thread of a gcc -O2 fixture (sleeping in nanosleep)");
    let mut build = Vec::new();
    for _ in 0..COLD_ROUNDS {
        let t = Instant::now();
        let u = Unwinder::for_process(pid).expect("unwinder");
        build.push(micros(t.elapsed()));
        drop(u);
    }
    println!(
        "  for_process (maps read, modules registered lazily): {}",
        summary(build)
    );
    for (tid, regs) in &threads {
        let mut cold = Vec::new();
        let mut frames = 0;
        for _ in 0..COLD_ROUNDS {
            let mut u = Unwinder::for_process(pid).expect("unwinder");
            let t = Instant::now();
            let bt = u.unwind(regs, &mem, DEFAULT_MAX_DEPTH);
            cold.push(micros(t.elapsed()));
            assert!(
                bt.complete(),
                "thread {tid}: incomplete unwind: {:?}",
                bt.stop
            );
            frames = bt.return_addresses.len();
        }
        let mut u = Unwinder::for_process(pid).expect("unwinder");
        u.unwind(regs, &mem, DEFAULT_MAX_DEPTH);
        let mut warm = Vec::with_capacity(WARM_ROUNDS);
        for _ in 0..WARM_ROUNDS {
            let t = Instant::now();
            let bt = u.unwind(regs, &mem, DEFAULT_MAX_DEPTH);
            warm.push(micros(t.elapsed()));
            assert_eq!(bt.return_addresses.len(), frames);
        }
        let per_frame = {
            let mut w = warm.clone();
            w.sort_by(|a, b| a.total_cmp(b));
            w[w.len() / 2] * 1000.0 / frames.max(1) as f64
        };
        println!("  thread {tid} ({frames} frames):");
        println!("    cold {}", summary(cold));
        println!("    warm {}  ≈ {per_frame:.0} ns/frame", summary(warm));
    }
}

//! Shared helpers for livepatch's benchmarks (see README for how to run them): compiling the
//! C fixtures and running one with its stdout read line by line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

/// Runs gcc with `args`, panicking with its stderr when it fails.
pub fn gcc(args: &[&str]) {
    let out = Command::new("gcc").args(args).output().expect("gcc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the benchmark fixture into a fresh temporary folder `lp-NAME-PID`: `funcs.h` (the
/// functions to patch), the target `target.c` built to `target`, and the same functions without
/// `noipa` compiled as the patch object `new.o`. Returns the folder.
pub fn build_fixture(name: &str, funcs: &str, target: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lp-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the fixture folder");
    std::fs::write(dir.join("funcs.h"), funcs).expect("write funcs.h");
    std::fs::write(dir.join("target.c"), target).expect("write target.c");
    std::fs::write(
        dir.join("new.c"),
        funcs.replace("__attribute__((noipa)) ", ""),
    )
    .expect("write new.c");
    let d = |n: &str| dir.join(n).display().to_string();
    gcc(&["-O2", "-pthread", &d("target.c"), "-o", &d("target")]);
    gcc(&["-O2", "-c", "-fPIC", &d("new.c"), "-o", &d("new.o")]);
    dir
}

/// A running fixture program whose stdout is read a line at a time; killed when dropped.
pub struct Fixture {
    /// The process.
    pub child: Child,
    out: BufReader<ChildStdout>,
}

impl Fixture {
    /// Starts `exe args...` and waits for its first line, which must start with "ready";
    /// returns the fixture and that line.
    pub fn start(exe: &Path, args: &[&str]) -> (Fixture, String) {
        let mut child = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the fixture");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut f = Fixture { child, out };
        let ready = f.line();
        assert!(ready.starts_with("ready"), "{ready}");
        (f, ready)
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next line of its output, trimmed.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .expect("read the fixture's output");
        line.trim().to_string()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! `livepatch demo`: live patching shown on a bundled program. It compiles a small C "service"
//! (with gcc, into a temporary directory), starts it, shows its output, packs a fix and applies
//! it to the running process, shows the changed output, reverts, and shows the original output
//! again. Plain text, no colors.

use crate::apply::{self, ApplyOptions, Error, Mode};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const TARGET_C: &str = include_str!("demo/target.c");
const FIX_C: &str = include_str!("demo/fix.c");

struct Running {
    child: Child,
    lines: Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Prints the next `n` lines of the service, indented.
    fn show(&self, n: usize) -> Result<(), Error> {
        for _ in 0..n {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| Error::Other("the demo program stopped printing".into()))?;
            println!("    | {line}");
        }
        Ok(())
    }

    /// Drops lines printed meanwhile (so the next ones shown are current).
    fn skip_pending(&self) {
        while self.lines.try_recv().is_ok() {}
    }
}

fn gcc(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("gcc")
        .args(args)
        .output()
        .map_err(|e| Error::Other(format!("demo needs gcc: {e}")))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "gcc failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        )));
    }
    Ok(())
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Runs the demo.
pub fn run() -> Result<(), Error> {
    let dir = TempDir(std::env::temp_dir().join(format!("livepatch-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|e| Error::Other(format!("temp dir: {e}")))?;
    let d = &dir.0;
    let (src, exe, fix_src, fix_obj, patch_file) = (
        d.join("service.c"),
        d.join("service"),
        d.join("fix.c"),
        d.join("fix.o"),
        d.join("fix.lpatch"),
    );
    let write = |p: &Path, s: &str| {
        std::fs::write(p, s).map_err(|e| Error::Other(format!("{}: {e}", p.display())))
    };
    write(&src, TARGET_C)?;
    write(&fix_src, FIX_C)?;

    println!("livepatch demo");
    println!();
    println!("1. A long-running service with a bug: apply_discount() takes 1% off instead of 10%.");
    println!("   Building it: gcc -O2 service.c -o service");
    gcc(&["-O2", "-g", path_str(&src), "-o", path_str(&exe)])?;
    let mut child = Command::new(&exe)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Other(format!("cannot start the demo program: {e}")))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let service = Running { child, lines: rx };
    let ready = service
        .lines
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| Error::Other("the demo program did not start".into()))?;
    let pid = service.child.id() as i32;
    println!("   Started as process {pid} ({ready}). Its output:");
    service.show(4)?;

    println!();
    println!("2. The fix, compiled on its own: gcc -O2 -c -fPIC fix.c -o fix.o");
    gcc(&[
        "-O2",
        "-c",
        "-fPIC",
        path_str(&fix_src),
        "-o",
        path_str(&fix_obj),
    ])?;
    println!("   livepatch pack --target service --object fix.o -o fix.lpatch");
    let patch = crate::pack::pack(&exe, &fix_obj, &[]).map_err(|e| Error::Other(e.to_string()))?;
    patch.save(&patch_file)?;
    println!(
        "   -> patch {} for {}, replacing {} (build-id and current bytes recorded)",
        patch.id,
        patch.target_name,
        patch
            .functions
            .iter()
            .map(|f| f.old_name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    println!();
    println!("3. Applying it to the running process: livepatch apply {pid} fix.lpatch");
    let applied = apply::apply(pid, &patch, ApplyOptions::default())?;
    println!(
        "   Applied in {} us; the process was stopped for {} us. It never restarted:",
        applied.total_us, applied.stats.stall_us
    );
    service.skip_pending();
    service.show(4)?;

    println!();
    println!("4. livepatch status {pid}");
    let st = crate::status::status(Some(pid))?;
    for line in crate::status::render(&st).lines() {
        println!("   {line}");
    }

    println!();
    println!("5. Taking the fix back out: livepatch revert {pid}");
    let reverted = crate::revert::revert(pid, None, Mode::Stop, Duration::from_secs(5))?;
    println!(
        "   Reverted patch {}; the original code runs again:",
        reverted.id
    );
    service.skip_pending();
    service.show(3)?;

    println!();
    println!("Done: the same process (pid {pid}) ran old code, new code, and old code again.");
    Ok(())
}

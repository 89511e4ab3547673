//! Shared helpers of the artifact-side tests (elf_, pack_, link_, unwind_, patchfile_): compile
//! the C fixtures of tests/fixtures/elf with gcc into a temporary directory.
#![allow(dead_code)]

pub mod in_process;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixture source `name` (in tests/fixtures/elf).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/elf")
        .join(name)
}

/// Runs gcc with `args` in `dir`, panicking with gcc's stderr when it fails; returns `dir/out`.
pub fn gcc(dir: &Path, out: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(out);
    let o = Command::new("gcc")
        .args(args)
        .arg("-o")
        .arg(&path)
        .current_dir(dir)
        .output()
        .expect("gcc runs");
    assert!(
        o.status.success(),
        "gcc {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    path
}

/// Compiles fixture `src` into relocatable object `out` with `-c -fPIC -O2` plus `extra`.
pub fn object(dir: &Path, src: &str, out: &str, extra: &[&str]) -> PathBuf {
    let src = fixture(src);
    let mut args = vec!["-c", "-fPIC", "-O2"];
    args.extend_from_slice(extra);
    args.push(src.to_str().unwrap());
    gcc(dir, out, &args)
}

/// Links fixture sources into an executable `out` with `extra` flags (e.g. `-no-pie`).
pub fn executable(dir: &Path, srcs: &[&str], out: &str, extra: &[&str]) -> PathBuf {
    let srcs: Vec<String> = srcs
        .iter()
        .map(|s| fixture(s).display().to_string())
        .collect();
    let mut args: Vec<&str> = vec!["-O2", "-g0"];
    args.extend_from_slice(extra);
    args.extend(srcs.iter().map(String::as_str));
    gcc(dir, out, &args)
}

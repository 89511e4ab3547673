//! Helpers shared by the end-to-end tests: compile C fixtures with gcc at test time, run them
//! with their output captured line by line, run the `livepatch` binary, and poll for output
//! with generous timeouts (the machine is small and shared: never sleep-and-hope).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod agent_stopper;
pub mod borrow;
pub mod threads;
pub mod uprobe;
pub mod watched;

#[allow(unused_imports)]
pub use agent_stopper::*;
#[allow(unused_imports)]
pub use borrow::*;
#[allow(unused_imports)]
pub use threads::*;
#[allow(unused_imports)]
pub use watched::*;

/// Generous default for waiting on a target's output.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// Lines [`Target::expect_steady`] lets go by before the state it waits for.
pub const STALE_LINES: usize = 3;

/// The fixtures directory of process tests.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/proc")
        .join(name)
}

/// Runs gcc (or g++ when `cmd` says so) with `args`, panicking with its stderr on failure.
pub fn cc(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run gcc");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles fixture sources into an executable `dir/name` with extra flags.
pub fn executable(dir: &Path, sources: &[&str], name: &str, flags: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args: Vec<String> = vec!["-O2".into(), "-g".into(), "-Wl,--build-id".into()];
    // Libraries (-l...) go after the sources, or the linker drops them.
    args.extend(
        flags
            .iter()
            .filter(|f| !f.starts_with("-l"))
            .map(|s| s.to_string()),
    );
    args.extend(sources.iter().map(|s| fixture(s).display().to_string()));
    args.extend(
        flags
            .iter()
            .filter(|f| f.starts_with("-l"))
            .map(|s| s.to_string()),
    );
    args.extend([
        "-o".into(),
        out.display().to_string(),
        "-lpthread".into(),
        "-ldl".into(),
    ]);
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    cc("gcc", &refs);
    out
}

/// Compiles a fixture into a relocatable object `dir/name` (gcc -c -fPIC -O2).
pub fn object(dir: &Path, source: &str, name: &str, flags: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let src = fixture(source).display().to_string();
    let dst = out.display().to_string();
    let mut args = vec!["-O2", "-c", "-fPIC"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[src.as_str(), "-o", dst.as_str()]);
    cc("gcc", &args);
    out
}

/// The `livepatch` binary built for these tests.
pub fn livepatch_bin() -> &'static str {
    env!("CARGO_BIN_EXE_livepatch")
}

/// Runs `livepatch args...`.
pub fn livepatch(args: &[&str]) -> Output {
    Command::new(livepatch_bin())
        .args(args)
        .output()
        .expect("run livepatch")
}

/// Runs `livepatch args...` with extra environment variables.
pub fn livepatch_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(livepatch_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run livepatch")
}

/// Runs `livepatch args...` with extra environment variables; if it has not ended after
/// [`PATIENCE`] (it hung), kills it and fails.
pub fn livepatch_bounded(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(livepatch_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run livepatch");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().expect("wait for livepatch").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait for livepatch");
            panic!(
                "livepatch {args:?} hung (killed after {PATIENCE:?}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait for livepatch")
}

/// Runs `livepatch args...` with `LIVEPATCH_TRACE`, asserts success; returns its trace.
pub fn traced(args: &[&str]) -> String {
    let out = livepatch_env(args, &[("LIVEPATCH_TRACE", "1")]);
    let trace = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "livepatch {args:?} failed ({}): {trace}",
        out.status
    );
    trace
}

/// Runs `livepatch args...` and asserts success; returns stdout.
pub fn livepatch_ok(args: &[&str]) -> String {
    let out = livepatch(args);
    assert!(
        out.status.success(),
        "livepatch {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `livepatch args...`, asserts it fails with a one-line error on stderr; returns
/// (exit code, that line).
pub fn livepatch_err(args: &[&str]) -> (i32, String) {
    let out = livepatch(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "livepatch {args:?} unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "error must be one line, got: {stderr}"
    );
    assert!(stderr.starts_with("livepatch: error: "), "got: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        stderr.trim_end().to_string(),
    )
}

/// A running fixture whose stdout lines are collected as they come.
pub struct Target {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Target {
    /// Starts `exe args...` with stdout captured; waits for its first line.
    pub fn spawn(exe: &Path, args: &[&str]) -> Target {
        Self::spawn_env(exe, args, &[])
    }

    /// Like [`Target::spawn`] with extra environment variables.
    pub fn spawn_env(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Target {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        Self::spawn_cmd(cmd, env)
    }

    /// Starts a CPU-hungry fixture at the lowest priority (`nice -n 19`, which execs it: same
    /// pid), so that on a small machine the tool under test still gets CPU time.
    pub fn spawn_niced(exe: &Path, args: &[&str]) -> Target {
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "19"]).arg(exe).args(args);
        Self::spawn_cmd(cmd, &[])
    }

    fn spawn_cmd(mut cmd: Command, env: &[(&str, &str)]) -> Target {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start fixture");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let t = Target { child, lines };
        t.wait_line(|l| l.starts_with("ready"));
        t
    }

    /// The process id, as a string for command lines.
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Lines printed so far.
    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a line (any, from the start) satisfies `pred`; returns it.
    pub fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line_after(0, pred)
    }

    /// Waits until a line printed after the first `mark` lines satisfies `pred`.
    pub fn wait_line_after(&self, mark: usize, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some(l) = lines.iter().skip(mark).find(|l| pred(l)) {
                    return l.clone();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no matching output line after line {mark} within {PATIENCE:?}; last lines: {:?}",
                    self.lines().iter().rev().take(5).collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the output shows the state `pred` describes, then for `n` more lines, and
    /// asserts every one satisfies `pred` too (the output is steady in this state). Up to
    /// [`STALE_LINES`] lines before the first match are skipped: computed before the change
    /// that the caller just made, or printed before it but read only now (on a loaded machine
    /// the thread that reads the target's output lags behind: e2e_ipa_ra once saw its old
    /// sum two lines after the apply at load 36).
    pub fn expect_steady(&self, n: usize, pred: impl Fn(&str) -> bool) {
        let mark = self.count();
        let deadline = Instant::now() + PATIENCE;
        let first = loop {
            let lines = self.lines();
            if let Some(i) = (mark..lines.len()).find(|&i| pred(&lines[i])) {
                break i;
            }
            if lines.len() > mark + STALE_LINES {
                panic!(
                    "unexpected lines {:?}",
                    &lines[mark..(mark + STALE_LINES + 1).min(lines.len())]
                );
            }
            assert!(Instant::now() < deadline, "target stopped printing");
            std::thread::sleep(Duration::from_millis(10));
        };
        while self.count() <= first + n {
            assert!(Instant::now() < deadline, "target stopped printing");
            std::thread::sleep(Duration::from_millis(10));
        }
        for l in self.lines().iter().skip(first) {
            assert!(pred(l), "unexpected line {l:?}");
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `patience` for the process to die; whether it did.
    pub fn dies_within(&mut self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `livepatch pack` of `object` against `target` into `dir/name`; returns the patch path and id.
pub fn pack(
    dir: &Path,
    target: &Path,
    object: &Path,
    replace: &[&str],
    name: &str,
) -> (PathBuf, String) {
    let out = dir.join(name);
    let mut args = vec![
        "pack".to_string(),
        "--target".into(),
        target.display().to_string(),
        "--object".into(),
        object.display().to_string(),
        "-o".into(),
        out.display().to_string(),
    ];
    for r in replace {
        args.push("--replace".into());
        args.push(r.to_string());
    }
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let stdout = livepatch_ok(&refs);
    let id = stdout
        .split_whitespace()
        .nth(2)
        .expect("pack prints the id")
        .to_string();
    (out, id)
}

/// Process `pid`'s /proc maps text.
#[allow(dead_code)]
pub fn maps_of(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
}

/// Asserts that process `pid` has no trap area (`livepatch-trap` memfd) that its maps text
/// `before` did not have: a refused apply takes out the area it made. (The remote-call stub,
/// process/stub.rs, stays by design: the first remote call makes it.)
#[allow(dead_code)]
pub fn assert_no_trap_area_added(pid: &str, before: &str) {
    let after = maps_of(pid);
    let added: Vec<&str> = after
        .lines()
        .filter(|l| !before.contains(*l) && l.contains("livepatch-trap"))
        .collect();
    assert!(
        added.is_empty(),
        "the refused apply left its trap area in the target: {added:?}"
    );
}

/// `livepatch status PID --json`, parsed.
pub fn status_json(pid: &str) -> serde_json::Value {
    let out = livepatch_ok(&["status", pid, "--json"]);
    serde_json::from_str(&out).expect("status --json is JSON")
}

/// Compiles a fixture into a shared library `dir/name` (gcc -shared -fPIC -O2).
pub fn shared_lib(dir: &Path, source: &str, name: &str) -> PathBuf {
    let out = dir.join(name);
    let src = fixture(source).display().to_string();
    let dst = out.display().to_string();
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-shared",
            "-fPIC",
            "-Wl,--build-id",
            &src,
            "-o",
            &dst,
        ],
    );
    out
}

/// Runs `livepatch args...` until it stops itself at `point` (its `LIVEPATCH_DEBUG_STOP` hook,
/// process/stop_point.rs), and returns it stopped there: a test then kills it (SIGKILL at
/// exactly that moment) or lets it go on (SIGCONT).
pub fn stop_tool_at(args: &[&str], point: &str) -> Child {
    stop_tool_at_with(args, point, &[])
}

/// [`stop_tool_at`] with extra environment variables (`LIVEPATCH_BORROW_COMM`, say).
pub fn stop_tool_at_with(args: &[&str], point: &str, env: &[(&str, &str)]) -> Child {
    let mut tool = Command::new(livepatch_bin())
        .args(args)
        .envs(env.iter().copied())
        .env("LIVEPATCH_DEBUG_STOP", point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(tool.stderr.take().unwrap());
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "livepatch {args:?} never reached {point}: {seen:?}");
        if line.starts_with("livepatch: debug: stopped at") {
            break;
        }
        seen.push(line);
    }
    // The line is printed right before the tool stops itself: wait for the stop.
    let stat = format!("/proc/{}/stat", tool.id());
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(&stat).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('T'))
    }) {
        assert!(
            Instant::now() < deadline,
            "the tool did not stop at {point}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    tool.stderr = Some(stderr.into_inner());
    tool
}

/// The format version in the header of process `pid`'s in-target state (state.rs).
#[allow(dead_code)]
pub fn state_version(pid: i32) -> u32 {
    let at = lp_userspace::state::locate(pid).expect("a state mapping");
    let h = lp_userspace::process::Memory::open(pid)
        .unwrap()
        .read_vec(at + 8, 4)
        .unwrap();
    u32::from_le_bytes(h.try_into().unwrap())
}

/// Writes `source` to DIR/NAME.c and builds it into DIR/NAME as the fixtures are built
/// (`-O2 -g -Wl,--build-id`), with `flags` after the source (e.g. `-pthread`).
#[allow(dead_code)]
pub fn executable_from_source(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let exe = dir.join(name);
    let mut args = vec!["-O2", "-g", "-Wl,--build-id", src.to_str().unwrap()];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["-o", exe.to_str().unwrap()]);
    cc("gcc", &args);
    exe
}

/// Compiles C `source` (which may include the fixture headers) into `dir/name`, and packs
/// new_compute.c (compute(41): 1041) against it; returns the executable and the patch's path.
pub fn compute_target_and_patch(
    dir: &Path,
    name: &str,
    source: &str,
    flags: &[&str],
) -> (PathBuf, String) {
    let include = format!("-I{}", fixture("").display());
    let mut flags = flags.to_vec();
    flags.push(&include);
    let exe = executable_from_source(dir, name, source, &flags);
    let patch = compute_patch(dir, &exe);
    (exe, patch)
}

/// Packs new_compute.c (compute(41): 1041) against executable `exe` into `dir/p.lp`; its path.
pub fn compute_patch(dir: &Path, exe: &Path) -> String {
    let obj = object(dir, "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir, exe, &obj, &[], "p.lp");
    patch.display().to_string()
}

/// The arguments of a nonstop apply of `patch` to process `pid` (with a timeout generous
/// enough for a loaded machine).
pub fn nonstop_apply<'a>(pid: &'a str, patch: &'a str) -> [&'a str; 7] {
    ["apply", pid, patch, "--mode", "nonstop", "--timeout", "60"]
}

/// The load bias of executable `exe` in process `pid` (where its file offset 0 is mapped,
/// less its lowest virtual address).
#[allow(dead_code)]
pub fn bias(pid: i32, exe: &Path) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| {
            l.ends_with(exe.to_str().unwrap()) && l.split_whitespace().nth(2) == Some("00000000")
        })
        .expect("executable mapped");
    let start = u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap();
    start - lp_userspace::elf::Module::open(exe).unwrap().min_vaddr()
}

/// How many syncs a traced nonstop revert of process `pid` runs before the `LIVEPATCH_TRACE`
/// line `marker` (e.g. "callers' windows done"): the N to stop a later revert at with
/// `nonstop-sync:N`. The revert must succeed; the caller applies the patch again.
#[allow(dead_code)]
pub fn revert_syncs_before(pid: &str, marker: &str) -> usize {
    let out = Command::new(livepatch_bin())
        .args(["revert", pid, "--mode", "nonstop"])
        .env("LIVEPATCH_TRACE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let trace = String::from_utf8_lossy(&out.stderr);
    let at = trace
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in the revert's trace: {trace}"));
    trace[..at].matches(" synced").count()
}

/// The value of `const NAME: TYPE = VALUE;` (VALUE a number or `A << B`) in the sync agent's
/// source, `src/apply/switch/nonstop/sync_agent.rs`: the agent page's layout, for a test that
/// reads or holds the page itself and keeps its own copy of the offsets (checked against this).
#[allow(dead_code)]
pub fn agent_constant(name: &str) -> u64 {
    let source = include_str!("../../src/apply/switch/nonstop/sync_agent.rs");
    let value = source
        .lines()
        .find_map(|l| {
            let l = l.trim().strip_prefix("pub(crate) ").unwrap_or(l.trim());
            let (n, rest) = l.strip_prefix("const ")?.split_once(':')?;
            (n == name).then_some(rest.split_once('=')?.1.trim().strip_suffix(';')?)
        })
        .unwrap_or_else(|| panic!("sync_agent.rs has no constant {name}"));
    let number = |v: &str| v.trim().trim_end_matches('u').parse::<u64>().ok();
    match value.split_once("<<") {
        Some((a, b)) => number(a).zip(number(b)).map(|(a, b)| a << b),
        None => number(value),
    }
    .unwrap_or_else(|| panic!("{name} = {value}: not a number"))
}

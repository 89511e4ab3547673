//! What `livepatch` refuses, on live processes: each refusal is one line on stderr, a distinct
//! non-zero exit code, and the target keeps running exactly as before (still printing the old
//! output, nothing of ours left in its memory).

mod common;
use common::*;
use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

fn has_patch_memory_or_state(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .contains("livepatch-state")
}

#[test]
fn e2e_wrong_build_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = executable(
        &other_dir,
        &["variant.c"],
        "simple",
        &[&format!("-I{}", fixture("").display())],
    );
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &other, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let (code, line) = livepatch_err(&["apply", &pid, patch.to_str().unwrap()]);
    assert_eq!(code, 4, "{line}");
    assert!(line.contains("build-id"), "{line}");
    target.expect_steady(3, |l| l == "direct=42 pointer=42");
    assert!(
        !has_patch_memory_or_state(&pid),
        "nothing may be mapped into the target"
    );
}

#[test]
fn e2e_bytes_changed_by_someone_else_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let obj = object(dir.path(), "new_spare.c", "new.o", &[]);
    let (patch_path, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    // Someone else changes one byte of spare() (never called) in the running process.
    let patch = lp_userspace::patchfile::Patch::load(&patch_path).unwrap();
    let spare = patch
        .functions
        .iter()
        .find(|f| f.old_name == "spare")
        .unwrap();
    let mappings = lp_userspace::maps::read(target.child.id() as i32).unwrap();
    let modules = lp_userspace::maps::modules(&mappings);
    let module = lp_userspace::maps::find_module(&modules, "simple").unwrap();
    let elf = lp_userspace::elf::Module::open(&exe).unwrap();
    let addr = module.load_bias(&elf).unwrap() + spare.old_vaddr + spare.old_size - 1;
    let mut mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    mem.seek(SeekFrom::Start(addr)).unwrap();
    mem.write_all(&[spare.old_bytes[spare.old_bytes.len() - 1] ^ 0x01])
        .unwrap();

    let (code, line) = livepatch_err(&["apply", &pid, patch_path.to_str().unwrap()]);
    assert_eq!(code, 4, "{line}");
    assert!(
        line.contains("spare") && line.contains("someone else"),
        "{line}"
    );
    // compute was not touched either: the process still prints the original values.
    target.expect_steady(3, |l| l == "direct=42 pointer=42");
    assert!(!has_patch_memory_or_state(&pid));
}

#[test]
fn e2e_busy_function_times_out_naming_thread_and_function() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["busy.c"], "busy", &["-pthread"]);
    let obj = object(dir.path(), "new_busy.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let ready = target.lines()[0].clone();
    let sleeper = ready.split("sleeper=").nth(1).unwrap().to_string();
    let started = Instant::now();
    let (code, line) = livepatch_err(&["apply", &pid, patch.to_str().unwrap(), "--timeout", "1"]);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "gave up before the timeout"
    );
    assert_eq!(code, 3, "{line}");
    assert!(
        line.contains(&format!("busy: thread {sleeper} is in function sleepy")),
        "{line}"
    );
    // Untouched: old output, and the patch memory was given back.
    target.expect_steady(3, |l| l == "value=42");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let anon_rx = maps
        .lines()
        .filter(|l| l.contains(" r-xp 00000000 00:00 0 ") && !l.contains('['))
        .count();
    assert_eq!(anon_rx, 0, "patch code left mapped:\n{maps}");
    assert!(
        !has_patch_memory_or_state(&pid),
        "state left mapped:\n{maps}"
    );
    assert!(livepatch_ok(&["status", &pid]).contains("no patches applied"));
}

#[test]
fn e2e_target_killed_during_apply() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["busy.c"], "busy", &["-pthread"]);
    let obj = object(dir.path(), "new_busy.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    // The apply retries (sleepy is busy for ever) until we kill the target under it.
    let apply = std::process::Command::new(livepatch_bin())
        .args(["apply", &pid, patch.to_str().unwrap(), "--timeout", "60"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if status
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
        {
            break;
        }
        assert!(Instant::now() < deadline, "livepatch never attached");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    target.child.kill().unwrap();
    let out = apply.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("process {pid}")), "{stderr}");
    assert!(!stderr.contains("panicked"));
    assert!(!target.alive());
}

#[test]
fn e2e_pid_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let (code, line) = livepatch_err(&["apply", "999999999", patch.to_str().unwrap()]);
    assert_eq!(code, 5, "{line}");
    assert!(
        line.contains("999999999") && line.contains("does not exist"),
        "{line}"
    );
    let (code, line) = livepatch_err(&["revert", "999999999"]);
    assert_eq!(code, 5, "{line}");
    let (code, line) = livepatch_err(&["status", "999999999"]);
    assert_eq!(code, 5, "{line}");
}

#[test]
fn e2e_not_a_patch_and_not_an_elf() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    // An ELF file is not a patch file.
    let (code, line) = livepatch_err(&["apply", &pid, exe.to_str().unwrap()]);
    assert_eq!(code, 7, "{line}");
    assert!(line.contains("not a livepatch patch file"), "{line}");
    // A truncated patch.
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let bytes = std::fs::read(&patch).unwrap();
    let cut = dir.path().join("cut.lp");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, line) = livepatch_err(&["apply", &pid, cut.to_str().unwrap()]);
    assert_eq!(code, 7, "{line}");
    // pack of something that is not ELF.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let (code, line) = livepatch_err(&[
        "pack",
        "--target",
        text.to_str().unwrap(),
        "--object",
        obj.to_str().unwrap(),
        "-o",
        dir.path().join("x.lp").to_str().unwrap(),
    ]);
    assert_eq!(code, 7, "{line}");
    assert!(line.contains("not an ELF"), "{line}");
    target.expect_steady(3, |l| l == "direct=42 pointer=42");
    assert!(!has_patch_memory_or_state(&pid));
}

#[test]
fn e2e_usage_errors_are_one_line() {
    let (code, line) = livepatch_err(&["apply", "notapid", "x"]);
    assert_eq!(code, 2, "{line}");
    let (code, _) = livepatch_err(&["frobnicate"]);
    assert_eq!(code, 2);
}

#[test]
fn e2e_tool_killed_mid_apply_leaves_target_running_and_patchable() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["busy.c"], "busy", &["-pthread"]);
    let busy_obj = object(dir.path(), "new_busy.c", "busy.o", &[]);
    let (busy_patch, _) = pack(dir.path(), &exe, &busy_obj, &[], "busy.lp");
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    // This apply retries for ever (sleepy is busy); the tool is killed while it holds the
    // process (seized, patch memory mapped).
    let mut tool = std::process::Command::new(livepatch_bin())
        .args([
            "apply",
            &pid,
            busy_patch.to_str().unwrap(),
            "--timeout",
            "60",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .contains("livepatch-state")
    {
        assert!(Instant::now() < deadline, "livepatch never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    tool.kill().unwrap();
    tool.wait().unwrap();
    // The kernel detached the dead tracer: the target runs on, unpatched.
    target.expect_steady(3, |l| l == "value=42");
    assert!(target.alive());
    assert!(livepatch_ok(&["status", &pid]).contains("no patches applied"));
    // And a fresh invocation can patch it.
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.expect_steady(3, |l| l == "value=1041");
    assert_eq!(status_json(&pid)[0]["patches"][0]["id"], id.as_str());
}

#[test]
fn e2e_process_held_by_a_debugger_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    // gdb attaches (stopping the process) and holds it for a few seconds.
    let mut gdb = std::process::Command::new("gdb")
        .args(["-q", "-nx", "-batch", "-p", &pid, "-ex", "shell sleep 4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("gdb is installed by scripts/install-deps.sh");
    let gdb_pid = gdb.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let tracer = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:").map(|v| v.trim().to_string()))
            .unwrap()
    };
    while tracer() != gdb_pid {
        assert!(Instant::now() < deadline, "gdb did not attach");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, line) = livepatch_err(&["apply", &pid, patch.to_str().unwrap()]);
    assert_eq!(code, 3, "{line}");
    assert!(
        line.contains(&format!("already traced by process {gdb_pid} (gdb)")),
        "{line}"
    );
    // Once gdb lets go, the process runs on unpatched, and the same patch goes in.
    assert!(gdb.wait().unwrap().success());
    target.expect_steady(3, |l| l == "direct=42 pointer=42");
    assert!(!has_patch_memory_or_state(&pid));
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.wait_line(|l| l == "direct=1041 pointer=1041");
}

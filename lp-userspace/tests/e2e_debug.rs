//! Issue 3 item 9 on live processes through the `livepatch` CLI: C++ exceptions thrown by and
//! through a replaced function still reach main's handler (the patch's unwind info, and its
//! register-preserving thunk's, are registered in the target); perf's /tmp/perf-PID.map and a
//! gdb script name the new functions while the patch is applied, and forget them on revert (a
//! map or script left by a dead process with the same pid is started afresh, a JIT's line kept);
//! the stack check's unwinder walks through patch code applied by an earlier invocation.

mod common;
use common::*;
use lp_userspace::debug_info;
use lp_userspace::process::Tracee;
use lp_userspace::unwind::{Registers, Unwinder};
use std::path::{Path, PathBuf};
use std::process::Command;

fn debug_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debug")
        .join(name)
        .display()
        .to_string()
}

/// g++ -O2 target and g++ -c -fPIC replacement of `parse`, packed.
fn cxx_setup(dir: &Path) -> (PathBuf, PathBuf, String) {
    let exe = dir.join("cxx_target");
    let obj = dir.join("new_parse.o");
    let (exe_s, obj_s) = (exe.display().to_string(), obj.display().to_string());
    cc(
        "g++",
        &[
            "-O2",
            "-g",
            "-Wl,--build-id",
            &debug_fixture("cxx_target.cpp"),
            "-o",
            &exe_s,
        ],
    );
    cc(
        "g++",
        &[
            "-O2",
            "-g",
            "-c",
            "-fPIC",
            &debug_fixture("cxx_new_parse.cpp"),
            "-o",
            &obj_s,
        ],
    );
    let (patch, id) = pack(dir, &exe, &obj, &[], "parse.lp");
    (exe, patch, id)
}

const OLD: &str = "caught 0 | 2 | 4 | caught 3 | caught -4 | 10";
// New: odd numbers throw from the new code; 4 throws from the target's validate() *through*
// the new frame (and its thunk); even results are tripled.
const NEW: &str = "0 | caught 1 | 6 | caught 3 | caught -4 | caught 5";

/// The perf map line of `name` tagged with patch `id`: (address, size).
fn perf_entry(pid: &str, name: &str, id: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/tmp/perf-{pid}.map")).ok()?;
    text.lines()
        .filter(|l| l.ends_with(&format!("[livepatch {id}]")))
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let size = u64::from_str_radix(f.next()?, 16).ok()?;
            (f.next()? == name).then_some((addr, size))
        })
}

fn status_new_addr(pid: &str) -> u64 {
    let st = status_json(pid);
    let new = st[0]["patches"][0]["functions"][0]["new"].as_str().unwrap();
    u64::from_str_radix(new.trim_start_matches("0x"), 16).unwrap()
}

fn cxx_exceptions(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch, _id) = cxx_setup(dir.path());
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == OLD);

    livepatch_ok(&["apply", &pid, patch.to_str().unwrap(), "--mode", mode]);
    target.wait_line_after(target.count(), |l| l == NEW);
    target.expect_steady(10, |l| l == NEW);
    assert!(target.alive(), "target died with the new code throwing");

    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.wait_line_after(target.count(), |l| l == OLD);
    target.expect_steady(5, |l| l == OLD);
    assert!(target.alive());

    // Apply again after the revert (the first registration was withdrawn cleanly).
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap(), "--mode", mode]);
    target.wait_line_after(target.count(), |l| l == NEW);
    target.expect_steady(5, |l| l == NEW);
    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.expect_steady(3, |l| l == OLD);
    assert!(target.alive());
}

#[test]
fn e2e_debug_cxx_exceptions_through_new_code_stop_mode() {
    cxx_exceptions("stop");
}

#[test]
fn e2e_debug_cxx_exceptions_through_new_code_nonstop_mode() {
    cxx_exceptions("nonstop");
}

#[test]
fn e2e_debug_perf_map_and_gdb_name_the_new_function() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch, id) = cxx_setup(dir.path());
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == OLD);
    // A script left by a dead process that had the same pid (pids are reused): not ours.
    let script = debug_info::gdb_script_path(target.child.id() as i32);
    std::fs::write(
        &script,
        "add-symbol-file /tmp/livepatch-stale.o -s .text 0x1000\n",
    )
    .unwrap();
    // The same for perf's map, which has no header: it was last written before this process
    // started (here: an hour before).
    let map = lp_userspace::perf_map::path(target.child.id() as i32);
    std::fs::write(&map, "1000 10 stale_function\n").unwrap();
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&map)
        .and_then(|f| f.set_modified(an_hour_ago))
        .unwrap();
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.wait_line_after(target.count(), |l| l == NEW);
    assert!(
        !std::fs::read_to_string(&script).unwrap().contains("stale"),
        "a dead process's script was appended to"
    );
    assert!(
        !std::fs::read_to_string(&map).unwrap().contains("stale"),
        "a dead process's perf map was appended to"
    );

    // perf: the new function at the address status reports, with its size.
    let new = status_new_addr(&pid);
    let (addr, size) = perf_entry(&pid, "_Z5parsei", &id).expect("perf map names the new parse");
    assert_eq!(addr, new);
    assert!(size > 0);

    // gdb: attached to the patched process with the script livepatch wrote, it names the new
    // function at its address (and at an address inside it).
    assert!(script.exists(), "{} missing", script.display());
    for probe in [new, new + size / 2] {
        let out = Command::new("gdb")
            .args(["-batch", "-nx", "-p", &pid, "-x"])
            .arg(&script)
            .args(["-ex", &format!("info symbol {probe:#x}")])
            .output()
            .expect("run gdb");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains(" in section "))
            .unwrap_or_else(|| panic!("gdb did not name {probe:#x}: {text}"));
        assert!(line.starts_with("parse(int)"), "{line}");
        assert!(line.contains(&id), "named from the patch object: {line}");
    }
    // gdb detached again; the process runs on with the new code.
    target.expect_steady(3, |l| l == NEW);

    // A JIT runtime inside the process adds its own line meanwhile: the map is the process's
    // own now, and neither the revert nor the next apply may drop that line.
    let jit_line = "7f0000001000 40 jit_compiled_function";
    std::fs::OpenOptions::new()
        .append(true)
        .open(&map)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{jit_line}\n").as_bytes()))
        .unwrap();

    livepatch_ok(&["revert", &pid]);
    target.expect_steady(2, |l| l == OLD);
    assert_eq!(
        perf_entry(&pid, "_Z5parsei", &id),
        None,
        "perf map still names it"
    );
    assert!(!script.exists(), "gdb script left behind");
    assert!(!debug_info::gdb_object_path(target.child.id() as i32, &id).exists());
    assert_eq!(
        std::fs::read_to_string(&map).unwrap(),
        format!("{jit_line}\n")
    );

    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.wait_line_after(target.count(), |l| l == NEW);
    let text = std::fs::read_to_string(&map).unwrap();
    assert!(
        text.starts_with(jit_line),
        "the process's own map was rewritten: {text}"
    );
    assert!(perf_entry(&pid, "_Z5parsei", &id).is_some(), "{text}");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(2, |l| l == OLD);
    let _ = std::fs::remove_file(&map);
}

/// A thread sleeping inside the new `work` (called through its register-preserving thunk): the
/// unwinder of the modules alone stops in patch code; with the patch CFI that the stack check
/// adds ([`debug_info::add_patch_cfi`], read back from the target by a later invocation) the
/// walk completes through the new function.
#[test]
fn e2e_debug_stack_check_unwinds_through_applied_patch_code() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("sleeper");
    let obj = dir.path().join("new_work.o");
    let (exe_s, obj_s) = (exe.display().to_string(), obj.display().to_string());
    cc(
        "gcc",
        &[
            "-O2",
            "-g",
            "-Wl,--build-id",
            &debug_fixture("sleeper.c"),
            "-o",
            &exe_s,
        ],
    );
    cc(
        "gcc",
        &[
            "-O2",
            "-c",
            "-fPIC",
            &debug_fixture("new_work.c"),
            "-o",
            &obj_s,
        ],
    );
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "work.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "work=1");
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.wait_line_after(target.count(), |l| l == "work=2");
    let (new, size) = perf_entry(&pid, "work", &id).expect("perf map names the new work");
    let in_new = |a: u64| (new..new + size).contains(&a);

    let pid_n = target.child.id() as i32;
    let mut seen = false;
    for _ in 0..100 {
        let mut t = Tracee::attach(pid_n).unwrap();
        t.stop_all().unwrap();
        let regs = Registers::from_user_regs(&t.regs(pid_n).unwrap());
        let mut modules_only = Unwinder::for_process(pid_n).unwrap();
        let without = modules_only.unwind(&regs, t.mem(), 256);
        let mut with_patch = Unwinder::for_process(pid_n).unwrap();
        debug_info::add_patch_cfi(pid_n, &mut with_patch);
        let with = with_patch.unwind(&regs, t.mem(), 256);
        t.detach().unwrap();
        assert!(with.complete(), "walk with patch CFI incomplete: {with:x?}");
        if with.return_addresses.iter().any(|&a| in_new(a)) {
            assert!(
                !without.complete(),
                "without patch CFI the walk should stop in patch code: {without:x?}"
            );
            // libc's CFI gives the return address into the new code; the walk ends there.
            assert!(without.return_addresses.last().is_some_and(|&a| in_new(a)));
            assert!(with.return_addresses.len() > without.return_addresses.len());
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(seen, "never caught the thread inside the new work()");
    target.expect_steady(2, |l| l == "work=2");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(2, |l| l == "work=1");
}

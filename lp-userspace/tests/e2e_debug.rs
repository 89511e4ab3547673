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

    // (this cycle with --boost: the tool at nice -20 does the same)
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap(), "--boost"]);
    target.wait_line_after(target.count(), |l| l == NEW);
    let text = std::fs::read_to_string(&map).unwrap();
    assert!(
        text.starts_with(jit_line),
        "the process's own map was rewritten: {text}"
    );
    assert!(perf_entry(&pid, "_Z5parsei", &id).is_some(), "{text}");
    livepatch_ok(&["revert", &pid, "--boost"]);
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

/// Memory of a stack: `words` from `base` up, nothing else readable.
struct StackWords {
    base: u64,
    words: Vec<u64>,
}

impl lp_userspace::unwind::MemoryReader for StackWords {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let off = addr
            .checked_sub(self.base)
            .map(|o| o as usize)
            .filter(|&o| o + buf.len() <= bytes.len())
            .ok_or_else(|| std::io::Error::other("outside the stack"))?;
        buf.copy_from_slice(&bytes[off..off + buf.len()]);
        Ok(())
    }
}

/// The trampoline of a g++ -O2 `work` that begins `sub rsp,8; call check`, with the CFI
/// debug_info generates for it, unwound (without any process) from every instruction of the
/// trampoline: before its last instruction the return address found is the one the original
/// function's frame holds; at the last one, where the trampoline leaves for `check` (lp-core
/// relocates that call as a push of the address after it plus a jump, or as the call and a jump
/// back: whichever it builds), the unwinder finds a frame that returns into the original
/// function right after the displaced call — never a frame in patch memory it cannot place.
#[test]
fn e2e_debug_trampoline_cfi_of_a_displaced_call() {
    use lp_core::jump::REL32_JUMP_LEN;
    use lp_userspace::unwind::{CfiSource, Registers, StopReason, Unwinder};
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("tramp_target");
    let src = debug_fixture("tramp_target.cpp");
    cc("g++", &["-O2", "-g", &src, "-o", exe.to_str().unwrap()]);
    let module = lp_userspace::elf::Module::open(&exe).unwrap();
    let work = module.lookup("_Z4worki").unwrap().clone();
    let bytes = module.bytes_at(work.value, work.size).unwrap();
    assert_eq!(
        &bytes[..4],
        &[0x48, 0x83, 0xec, 0x08],
        "sub rsp,8: {bytes:02x?}"
    );
    assert_eq!(bytes[4], 0xe8, "call check: {bytes:02x?}");
    let site = lp_core::site::validate_site(bytes, work.value, REL32_JUMP_LEN).unwrap();
    let resume = site.resume_addr();
    assert_eq!(
        resume,
        work.value + 9,
        "the call is the last displaced instruction"
    );

    let at = 0x4000_0000; // in rel32 reach of the executable (linked near 0)
    let mut code = vec![0u8; lp_core::trampoline::MAX_TRAMPOLINE_LEN];
    let n = lp_core::trampoline::build_trampoline(&site, at, &mut code).unwrap();
    code.truncate(n);
    let cfi = debug_info::ModuleCfi::new(&module, 0).expect("the executable's .eh_frame");
    let frame = debug_info::trampoline_frame(&cfi, &site, at, &code).expect("trampoline CFI");
    let eh_at = 0x5000_0000;
    let eh = lp_userspace::thunk_cfi::eh_frame(std::slice::from_ref(&frame), eh_at);
    let mut unwinder = Unwinder::new();
    unwinder.add(CfiSource::from_eh_frame(
        "trampoline",
        at,
        at + n as u64,
        eh_at,
        eh,
    ));

    // Where the caller of work would return to, one word above work's own frame.
    const CALLER: u64 = 0x1111_2222;
    let instrs: Vec<_> = iced_x86::Decoder::with_ip(64, &code, at, iced_x86::DecoderOptions::NONE)
        .into_iter()
        .collect();
    let last = instrs
        .iter()
        .position(|i| {
            matches!(
                i.flow_control(),
                iced_x86::FlowControl::Call
                    | iced_x86::FlowControl::UnconditionalBranch
                    | iced_x86::FlowControl::IndirectBranch
            )
        })
        .expect("the trampoline leaves by a call or a jump");
    let base = 0x7ff0_0000u64;
    for (k, i) in instrs[..=last].iter().enumerate() {
        // The stack before instruction k: work entered (its caller's return address CALLER on
        // top), `sub rsp,8` done from k = 1 on; in a push-based trampoline, the address after
        // the call pushed before the jump (its low half only, before the `mov` of the high half).
        let half_pushed = i.code() == iced_x86::Code::Mov_rm32_imm32;
        let pushed = k == last && i.flow_control() != iced_x86::FlowControl::Call;
        let (rsp, words) = if k == 0 {
            (base + 16, vec![0, 0, CALLER])
        } else if half_pushed || pushed {
            (base, vec![resume, 0xdead, CALLER])
        } else {
            (base + 8, vec![0, 0xdead, CALLER])
        };
        let mut regs = Registers([None; 17]); // DWARF numbering: 7 = rsp, 16 = rip
        regs.0[7] = Some(rsp);
        regs.0[16] = Some(i.ip());
        let bt = unwinder.unwind(&regs, &StackWords { base, words }, 4);
        let first = bt.return_addresses.first().copied();
        let at_k = format!("instruction {k} at {:#x}: {bt:?}", i.ip());
        if half_pushed {
            // The return address is half written: the unwind stops there, cleanly.
            assert!(bt.return_addresses.is_empty(), "{at_k}");
            assert_eq!(bt.stop, StopReason::End, "{at_k}");
        } else if pushed {
            assert_eq!(first, Some(resume), "at the jump to check: {at_k}");
        } else {
            assert_eq!(first, Some(CALLER), "{at_k}");
        }
    }
}

/// The gdb files have well-known names in /tmp and the tool runs as root: a symbolic link
/// planted at such a name is not written through (the apply goes on, with a warning).
#[test]
fn e2e_debug_symlinks_planted_at_the_gdb_file_names_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let pid_n: i32 = pid.parse().unwrap();
    let script = debug_info::gdb_script_path(pid_n);
    let object = debug_info::gdb_object_path(pid_n, &id);
    for link in [&script, &object] {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&victim, link).unwrap();
    }
    let out = livepatch(&["apply", &pid, patch.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot save the gdb symbol file"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    target.expect_steady(2, |l| l == "direct=1041 pointer=1041");
    livepatch_ok(&["revert", &pid]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    for link in [&script, &object] {
        let _ = std::fs::remove_file(link);
    }
}

/// A gdb script another user planted at the well-known name, with the header that makes an
/// apply append (anyone can compute it from /proc), is not written into: `gdb -x` of it as
/// root would run its `shell` lines (review session 4, S2). The apply replaces it with a file of
/// its own; the planted object file likewise.
#[test]
fn e2e_debug_a_gdb_script_planted_by_another_user_is_replaced_not_appended_to() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return; // only root can plant a file as another user here
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let pid_n: i32 = pid.parse().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .to_string();
    let script = debug_info::gdb_script_path(pid_n);
    let object = debug_info::gdb_object_path(pid_n, &id);
    let nobody = 65534;
    std::fs::write(
        &script,
        format!("# livepatch: symbols of process {pid} started at {start}\nshell id > /dev/null\n"),
    )
    .unwrap();
    std::fs::write(&object, "not the object").unwrap();
    for f in [&script, &object] {
        std::os::unix::fs::chown(f, Some(nobody), Some(nobody)).unwrap();
    }
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(!text.contains("shell"), "planted line kept: {text}");
    assert!(text.contains("add-symbol-file"), "{text}");
    for f in [&script, &object] {
        assert_eq!(std::fs::metadata(f).unwrap().uid(), 0, "{}", f.display());
    }
    assert_ne!(std::fs::read(&object).unwrap(), b"not the object");
    target.expect_steady(2, |l| l == "direct=1041 pointer=1041");
    livepatch_ok(&["revert", &pid]);
    assert!(!script.exists() && !object.exists());
}

//! Trampolines have unwind information: a g++ -O2 target's work() begins with a call to
//! check(), which throws for odd numbers. That call is displaced by the redirect and relocated
//! into work's trampoline, so while the original runs from its trampoline (where a thread that
//! must finish the original is sent), check()'s exception unwinds through the trampoline. The
//! target calls the trampoline itself once the test gives it the address: every exception must
//! still reach main's handler (without CFI for the trampoline, libgcc finds no frame there and
//! the target terminates).

mod common;
use common::*;
use std::path::Path;

fn debug_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debug")
        .join(name)
        .display()
        .to_string()
}

const ORIGINAL: &str = "1 caught 1 7 caught 3";

#[test]
fn e2e_exception_through_a_trampoline_reaches_the_handler() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("tramp_target");
    let obj = dir.path().join("new_work.o");
    let (exe_s, obj_s) = (exe.display().to_string(), obj.display().to_string());
    let target_src = debug_fixture("tramp_target.cpp");
    cc(
        "g++",
        &["-O2", "-g", "-Wl,--build-id", &target_src, "-o", &exe_s],
    );
    let new_src = debug_fixture("tramp_new_work.cpp");
    cc("g++", &["-O2", "-c", "-fPIC", &new_src, "-o", &obj_s]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "work.lp");

    let addr_file = dir.path().join("addr");
    let target = Target::spawn(&exe, &[addr_file.to_str().unwrap()]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == format!("work: {ORIGINAL}"));
    let mark = target.count();
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.wait_line_after(mark, |l| l == "work: 0 10 20 30");
    target.expect_steady(2, |l| l == "work: 0 10 20 30");

    // The premise: the trampoline holds the relocated call to check().
    let state = lp_userspace::state::read(pid.parse().unwrap()).unwrap();
    let f = &state.patches[0].functions[0];
    let mem = lp_userspace::process::Memory::open(pid.parse().unwrap()).unwrap();
    let tramp = mem.read_vec(f.trampoline, 16).unwrap();
    assert_eq!(
        &tramp[..4],
        &[0x48, 0x83, 0xec, 0x08],
        "sub rsp,8: {tramp:02x?}"
    );
    assert_eq!(tramp[4], 0xe8, "call check: {tramp:02x?}");

    // The stack check's unwinder knows the trampoline's CFI too (read back from the target).
    let mut unwinder = lp_userspace::unwind::Unwinder::new();
    lp_userspace::debug_info::add_patch_cfi(pid.parse().unwrap(), &mut unwinder);
    assert!(
        unwinder
            .sources()
            .iter()
            .any(|s| s.start <= f.trampoline && f.trampoline < s.end),
        "no CFI source covers the trampoline at {:#x}",
        f.trampoline
    );

    let tmp = dir.path().join("addr.tmp");
    std::fs::write(&tmp, format!("{:x}\n", f.trampoline)).unwrap();
    let mark = target.count();
    std::fs::rename(&tmp, &addr_file).unwrap();
    target.wait_line_after(mark, |l| l.starts_with("trampoline:"));
    // The original's behaviour, exceptions included, through its trampoline.
    target.expect_steady(5, |l| l == format!("trampoline: {ORIGINAL}"));

    let mark = target.count();
    std::fs::remove_file(&addr_file).unwrap();
    target.wait_line_after(mark, |l| l.starts_with("work:"));
    target.expect_steady(2, |l| l == "work: 0 10 20 30");
    let mark = target.count();
    livepatch_ok(&["revert", &pid]);
    target.wait_line_after(mark, |l| l == format!("work: {ORIGINAL}"));
    target.expect_steady(2, |l| l == format!("work: {ORIGINAL}"));
}

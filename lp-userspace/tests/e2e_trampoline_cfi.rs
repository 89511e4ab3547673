//! Exceptions and trampolines: a g++ -O2 target's work() and guarded() begin with a call to
//! check(), which throws for odd numbers. That call is displaced by the redirect and relocated
//! into the trampoline, where a thread that must finish the original is sent. lp-core relocates
//! it as a push of the original return address and a jump, so check() returns, and unwinds,
//! straight into the original function. The target calls the trampolines itself once the test
//! gives it their addresses: every exception of work() must still reach main's handler, and
//! every exception of guarded() guarded's own handler (only guarded's LSDA can catch it; a call
//! returning into the trampoline made the target terminate).

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

const ORIGINAL: &str = "1 caught 1 7 caught 3 guarded: 1 -1 7 -3";
const NEW: &str = "0 10 20 30 guarded: 0 100 200 300";

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
    target.wait_line_after(mark, |l| l == format!("work: {NEW}"));
    target.expect_steady(2, |l| l == format!("work: {NEW}"));

    // The premise: each trampoline holds the relocated call to check(), as a push of the
    // address after the call in the original function and a jump.
    let state = lp_userspace::state::read(pid.parse().unwrap()).unwrap();
    let mem = lp_userspace::process::Memory::open(pid.parse().unwrap()).unwrap();
    let function = |name: &str| {
        state.patches[0]
            .functions
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name} not in the state"))
            .clone()
    };
    let (f, g) = (function("_Z4worki"), function("_Z7guardedi"));
    for func in [&f, &g] {
        let tramp = mem.read_vec(func.trampoline, 13).unwrap();
        assert_eq!(&tramp[..3], &[0x48, 0x83, 0xec], "sub rsp,N: {tramp:02x?}");
        assert_eq!(tramp[4], 0x68, "push imm32: {tramp:02x?}");
        assert_eq!(
            &tramp[9..13],
            &[0xc7, 0x44, 0x24, 0x04],
            "mov [rsp+4]: {tramp:02x?}"
        );
        let low = u32::from_le_bytes(tramp[5..9].try_into().unwrap());
        assert_eq!(
            low,
            (func.old + 9) as u32,
            "the return address after the call"
        );
    }

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
    std::fs::write(&tmp, format!("{:x} {:x}\n", f.trampoline, g.trampoline)).unwrap();
    let mark = target.count();
    std::fs::rename(&tmp, &addr_file).unwrap();
    target.wait_line_after(mark, |l| l.starts_with("trampoline:"));
    // The original's behaviour, exceptions included, through its trampoline.
    target.expect_steady(5, |l| l == format!("trampoline: {ORIGINAL}"));

    let mark = target.count();
    std::fs::remove_file(&addr_file).unwrap();
    target.wait_line_after(mark, |l| l.starts_with("work:"));
    target.expect_steady(2, |l| l == format!("work: {NEW}"));
    let mark = target.count();
    livepatch_ok(&["revert", &pid]);
    target.wait_line_after(mark, |l| l == format!("work: {ORIGINAL}"));
    target.expect_steady(2, |l| l == format!("work: {ORIGINAL}"));
}

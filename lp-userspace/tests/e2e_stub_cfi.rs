//! The `.eh_frame` of the thunks and trampolines is written into the patch memory after them:
//! after *every* trampoline, also those without CFI of their own (a tail call's `jmp`), never
//! over one (review session 5, #7: the tail call's trampoline was overwritten, and a thread a
//! nonstop switch sent there died of SIGSEGV).
//!
//! callers.c's work() is called by main (`call`) and by tail() (`jmp`, whose trampoline gets
//! no CFI and comes last). After an apply, every trampoline in the process's memory is byte
//! for byte what lp-core builds for it, and the `.eh_frame` starts after all of them.

mod common;
use common::*;
use lp_core::jump::REL32_JUMP_LEN;
use lp_core::site::validate_site;
use lp_core::trampoline::{build_trampoline, MAX_TRAMPOLINE_LEN};
use lp_userspace::patchfile::Patch;
use lp_userspace::process::Memory;
use lp_userspace::state;

/// `site`'s trampoline as lp-core builds it at `at`.
fn expected(site: &lp_core::site::Site, at: u64) -> Vec<u8> {
    let mut out = vec![0u8; MAX_TRAMPOLINE_LEN];
    let n = build_trampoline(site, at, &mut out).unwrap();
    out.truncate(n);
    out
}

fn trampolines_intact(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (patch_path, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let patch = Patch::load(&patch_path).unwrap();
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let ipid: i32 = pid.parse().unwrap();
    let bias = bias(ipid, &exe);

    livepatch_ok(&["apply", &pid, patch_path.to_str().unwrap(), "--mode", mode]);
    let st = state::read(ipid).unwrap();
    let applied = st.patches.last().unwrap();
    let work = &applied.functions[0];
    let f = &patch.functions[0];
    assert_eq!(work.call_sites.len(), 2, "main's call and tail's jmp");
    let mem = Memory::open(ipid).unwrap();
    let entry = validate_site(&f.old_bytes, bias + f.old_vaddr, REL32_JUMP_LEN).unwrap();
    let mut stubs = vec![(work.trampoline, expected(&entry, work.trampoline))];
    for c in &work.call_sites {
        let site = validate_site(&c.original, c.addr, REL32_JUMP_LEN).unwrap();
        stubs.push((c.trampoline, expected(&site, c.trampoline)));
    }
    for (at, want) in &stubs {
        assert_eq!(
            &mem.read_vec(*at, want.len()).unwrap(),
            want,
            "trampoline at {at:#x} overwritten"
        );
    }
    let debug = applied.debug.as_ref().expect("debug record");
    let last_end = stubs
        .iter()
        .map(|(at, code)| at + code.len() as u64)
        .max()
        .unwrap();
    assert!(
        debug.thunk_eh_frame >= last_end || debug.thunk_eh_frame < work.trampoline,
        ".eh_frame at {:#x} among the trampolines (last ends at {last_end:#x})",
        debug.thunk_eh_frame
    );
    livepatch_ok(&["revert", &pid, "--mode", mode]);
}

#[test]
fn e2e_stub_cfi_is_written_after_every_trampoline_stop() {
    trampolines_intact("stop");
}

#[test]
fn e2e_stub_cfi_is_written_after_every_trampoline_nonstop() {
    trampolines_intact("nonstop");
}

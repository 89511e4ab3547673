//! Arbitrary bytes and addresses through site validation, planning, trampolines and the clobber
//! analysis: nothing may panic, and every plan returned must keep the int3 protocol's
//! invariants (checked here on a byte buffer, state by state).
//!
//! Input layout (so real functions make readable seeds): entry, target, second target and
//! trampoline address as four little-endian u64s, then the function's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lp_core::clobber::{
    clobbered_registers, registers_to_preserve, written_registers, Regs, SYSV_CALLER_SAVED,
};
use lp_core::jump::{Jump, REL32_JUMP_LEN};
use lp_core::plan::{plan_apply, plan_revert, plan_write, Step, WritePlan, MAX_STEPS};
use lp_core::site::{validate_site, Site, ENDBR64, INT3, MAX_DISPLACED_LEN};
use lp_core::trampoline::{build_trampoline, MAX_TRAMPOLINE_LEN};

fn word(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = data.get(i * 8..i * 8 + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

/// Runs `plan` over `mem` (first byte at `base`), checking every intermediate state.
fn check_plan(plan: &WritePlan, base: u64, mem: &mut [u8]) {
    let steps = plan.steps();
    assert!(steps.len() <= MAX_STEPS && steps.len() % 2 == 0);
    let off = (plan.addr() - base) as usize;
    let n = plan.len();
    assert_eq!(&mem[off..off + n], plan.expected());
    let outside: Vec<u8> = mem[..off].iter().chain(&mem[off + n..]).copied().collect();
    let mut first_write = true;
    for pair in steps.chunks(2) {
        assert!(matches!(pair[0], Step::Write { .. }));
        assert_eq!(pair[1], Step::Sync);
        let before = mem[off..off + n].to_vec();
        assert!(pair[0].apply(base, mem));
        let now = &mem[off..off + n];
        assert!(now == plan.expected() || now == plan.result() || now[0] == INT3);
        if before[1..] != now[1..] {
            assert!(
                before[0] == INT3 && now[0] == INT3,
                "tail written without int3"
            );
        }
        if first_write && plan.expected()[0] != INT3 {
            assert_eq!(now[0], INT3);
            assert_eq!(
                now[1..],
                before[1..],
                "after step 1 only the first byte differs"
            );
        }
        first_write = false;
    }
    assert_eq!(&mem[off..off + n], plan.result());
    let outside_after: Vec<u8> = mem[..off].iter().chain(&mem[off + n..]).copied().collect();
    assert_eq!(outside, outside_after, "a plan wrote outside its range");
}

fn check_site(site: &Site, code: &[u8], entry: u64, jump_len: usize) {
    let off = site.patch_offset();
    assert_eq!(site.entry, entry);
    assert_eq!(off, if code.starts_with(&ENDBR64) { 4 } else { 0 });
    assert!(site.displaced_len >= jump_len && site.displaced_len <= MAX_DISPLACED_LEN);
    assert_eq!(site.displaced(), &code[off..off + site.displaced_len]);
}

fuzz_target!(|data: &[u8]| {
    let (entry, target, target2, at) = (word(data, 0), word(data, 1), word(data, 2), word(data, 3));
    let code = data.get(32..).unwrap_or(&[]);

    let _ = clobbered_registers(code, entry).map(|r| assert!(!r.contains(Regs::RSP)));
    let _ = written_registers(code, entry).map(|r| assert!(!r.contains(Regs::RSP)));
    let _ = registers_to_preserve(code, entry, code, entry)
        .map(|r| assert!(SYSV_CALLER_SAVED.contains(r)));

    // raw plans over arbitrary byte pairs
    if code.len() >= 2 {
        let n = (code.len() / 2).min(16);
        let (old, new) = (&code[..n], &code[n..2 * n]);
        if let Ok(plan) = plan_write(entry, old, new) {
            let mut mem = old.to_vec();
            check_plan(&plan, entry, &mut mem);
            check_plan(&plan_revert(&plan), entry, &mut mem);
            assert_eq!(mem, old);
        }
    }

    for jump_len in [REL32_JUMP_LEN, 14] {
        let Ok(site) = validate_site(code, entry, jump_len) else {
            continue;
        };
        check_site(&site, code, entry, jump_len);

        // a roomier buffer than promised, to check the promise
        let mut tramp = [0u8; 4 * MAX_TRAMPOLINE_LEN];
        if let Ok(n) = build_trampoline(&site, at, &mut tramp) {
            assert!(n <= MAX_TRAMPOLINE_LEN, "trampoline of {n} bytes");
            check_trampoline_tail(&site, at, &tramp[..n]);
        }

        let mut mem = code.to_vec();
        let Ok(p1) = plan_apply(&site, site.displaced(), target) else {
            continue;
        };
        assert_eq!(p1.result(), Jump::to(site.patch_addr, target).as_bytes());
        check_plan(&p1, entry, &mut mem);
        let after1 = mem.clone();
        let off = site.patch_offset();
        let current = mem[off..off + site.displaced_len].to_vec();
        if let Ok(p2) = plan_apply(&site, &current, target2) {
            check_plan(&p2, entry, &mut mem);
            check_plan(&plan_revert(&p2), entry, &mut mem);
            assert_eq!(mem, after1);
        }
        check_plan(&plan_revert(&p1), entry, &mut mem);
        assert_eq!(mem, code);
    }
});

/// A trampoline ends with our jump back to the rest of the original, or, when the last displaced
/// instruction is a call, with `push imm32; mov dword [rsp+4], imm32; jmp` leaving the original's
/// own return address (the resume address) on the stack.
fn check_trampoline_tail(site: &Site, at: u64, tramp: &[u8]) {
    use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Mnemonic};
    let resume = site.resume_addr();
    let last_displaced =
        Decoder::with_ip(64, site.displaced(), site.patch_addr, DecoderOptions::NONE)
            .into_iter()
            .last();
    let ends_with_call = last_displaced.is_some_and(|i| {
        matches!(
            i.flow_control(),
            FlowControl::Call | FlowControl::IndirectCall
        )
    });
    if !ends_with_call {
        let near = tramp
            .len()
            .checked_sub(REL32_JUMP_LEN)
            .and_then(|start| Jump::rel32(at.wrapping_add(start as u64), resume));
        assert!(
            tramp.ends_with(Jump::absolute(resume).as_bytes())
                || near.is_some_and(|j| tramp.ends_with(j.as_bytes())),
            "trampoline must end with a jump back to {resume:#x}"
        );
        return;
    }
    let instrs: Vec<_> = Decoder::with_ip(64, tramp, at, DecoderOptions::NONE)
        .into_iter()
        .collect();
    // (a literal after an indirect jump decodes as junk: look for the whole triple)
    let returns_to_resume = instrs.windows(3).any(|w| {
        w[0].code() == Code::Pushq_imm32
            && w[1].code() == Code::Mov_rm32_imm32
            && w[2].mnemonic() == Mnemonic::Jmp
            && (w[0].immediate32() as u64 | (w[1].immediate32() as u64) << 32) == resume
    });
    assert!(
        returns_to_resume,
        "the callee must return to the original code at {resume:#x}"
    );
}

//! The encoder-free trampoline (`copy_trampoline`) against what the displaced instructions
//! mean: for arbitrary bytes that make a site, whenever the copy applies, its trampoline
//! decodes to the displaced instructions one for one — the same instruction, or the same
//! branch to the same absolute target, or the same RIP-relative operand reaching the same
//! absolute address — followed by the jump back to the rest of the original, or, after a last
//! `call`, by `push imm32; mov dword [rsp+4], imm32; jmp` to the callee with the original's
//! return address on the stack. Nothing may panic, and the length stays within the promise.
//!
//! Input layout (as `site_plan`'s, so its seeds serve): entry, two unused words and the
//! trampoline address as four little-endian u64s, then the function's bytes.
#![no_main]

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind};
use libfuzzer_sys::fuzz_target;
use lp_core::jump::{Jump, REL32_JUMP_LEN};
use lp_core::site::{validate_site, Site};
use lp_core::trampoline::{copy_trampoline, MAX_TRAMPOLINE_LEN};

fn word(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = data.get(i * 8..i * 8 + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

/// Whether `new` (in the trampoline) does what `old` (displaced) did.
fn same_meaning(old: &Instruction, new: &Instruction) -> bool {
    if old.is_ip_rel_memory_operand() {
        return new.is_ip_rel_memory_operand()
            && old.code() == new.code()
            && old.ip_rel_memory_address() == new.ip_rel_memory_address();
    }
    if old.op0_kind() == OpKind::NearBranch64 {
        return new.op0_kind() == OpKind::NearBranch64
            && old.mnemonic() == new.mnemonic()
            && old.near_branch_target() == new.near_branch_target();
    }
    old == new
}

/// Where the jump at the start of `bytes` (at `at`) goes, in either of `Jump`'s forms.
fn jump_target(at: u64, bytes: &[u8]) -> Option<u64> {
    Jump::decode(at, bytes).map(|(_, target)| target)
}

fn check(site: &Site, at: u64, tramp: &[u8]) {
    let old: Vec<Instruction> =
        Decoder::with_ip(64, site.displaced(), site.patch_addr, DecoderOptions::NONE)
            .into_iter()
            .collect();
    let mut dec = Decoder::with_ip(64, tramp, at, DecoderOptions::NONE);
    for (i, o) in old.iter().enumerate() {
        let last = i + 1 == old.len();
        if last && o.flow_control() == FlowControl::Call {
            assert_eq!(
                o.code(),
                Code::Call_rel32_64,
                "only direct calls are copied"
            );
            let push = dec.decode();
            let high = dec.decode();
            assert_eq!(push.code(), Code::Pushq_imm32);
            assert_eq!(high.code(), Code::Mov_rm32_imm32);
            let pushed = push.immediate32() as u64 | (high.immediate32() as u64) << 32;
            assert_eq!(
                pushed,
                site.resume_addr(),
                "the callee returns into the original"
            );
            let off = dec.ip().wrapping_sub(at) as usize;
            assert_eq!(
                jump_target(dec.ip(), &tramp[off..]),
                Some(o.near_branch_target())
            );
            let len = Jump::decode(dec.ip(), &tramp[off..]).unwrap().0.len();
            assert_eq!(
                off + len,
                tramp.len(),
                "nothing after the jump to the callee"
            );
            return;
        }
        let n = dec.decode();
        assert!(same_meaning(o, &n), "{o:?} became {n:?}");
    }
    let off = dec.ip().wrapping_sub(at) as usize;
    assert_eq!(
        jump_target(dec.ip(), &tramp[off..]),
        Some(site.resume_addr())
    );
    let len = Jump::decode(dec.ip(), &tramp[off..]).unwrap().0.len();
    assert_eq!(off + len, tramp.len(), "the jump back ends the trampoline");
}

fuzz_target!(|data: &[u8]| {
    let (entry, at) = (word(data, 0), word(data, 3));
    let code = data.get(32..).unwrap_or(&[]);
    for jump_len in [REL32_JUMP_LEN, 14] {
        let Ok(site) = validate_site(code, entry, jump_len) else {
            continue;
        };
        let mut tramp = [0u8; 4 * MAX_TRAMPOLINE_LEN];
        if let Ok(Some(n)) = copy_trampoline(&site, at, &mut tramp) {
            assert!(n <= MAX_TRAMPOLINE_LEN, "trampoline of {n} bytes");
            check(&site, at, &tramp[..n]);
        }
    }
});

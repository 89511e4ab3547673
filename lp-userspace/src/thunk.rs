//! Register-preserving thunks for replacements of functions whose callers rely on `-fipa-ra`.
//!
//! gcc at -O2 lets the caller of a function it can see (not interposable) keep values in
//! caller-saved registers that this callee never writes. A replacement compiled separately may
//! write them. lp-core's clobber analysis says which registers the old function may change and
//! which the new one may; the difference (caller-saved registers only) is saved and restored by
//! a thunk that the redirect targets instead of the new function:
//!
//! ```text
//! push <gpr>...                  ; each extra general-purpose register
//! sub  rsp, N                    ; room for mask and vector registers, keeping the call aligned
//! kmovq [rsp+8*j], kJ            ; each mask register (AVX-512; kmovw without AVX-512BW)
//! vmovdqu64 [rsp+K+64*i], zmmV   ; each vector register, at the width the CPU has:
//!                                ; movdqu xmm (SSE), vmovdqu ymm (AVX), vmovdqu64 zmm (AVX-512)
//! call new
//! ...the same loads in the same order...
//! add  rsp, N
//! pop  <gpr>...                  ; reverse order
//! ret
//! ```
//! Vector registers are saved whole: a caller may keep a `ymm`/`zmm` value in a register the
//! old function never touched, and a 128-bit save would lose its upper half. `zmm16`–`zmm31`
//! and `k0`–`k7` (lp-core reports them as one bit) are saved one by one, those the new code may
//! write ([`avx512_writes`]), and only where the CPU has them ([`VectorState`]).
//!
//! The return address stays where the caller put it, so unwinding through the thunk's caller is
//! unaffected; the thunk is in the patch memory, covered by the consistency check, and has CFI
//! ([`crate::thunk_cfi`]).

mod avx512_writes;
mod vector_state;

pub use avx512_writes::{scan as scan_vector_writes, Avx512Regs, VectorWrites};
pub use vector_state::VectorState;

use lp_core::clobber::{Regs, GPRS, SYSV_CALLER_SAVED, XMMS};

/// Longest thunk [`build`] emits (every register saved, AVX-512 encodings).
pub const MAX_LEN: usize = 1024;

/// Registers of lp-core's [`Regs`] a thunk can save: general-purpose and xmm0–15 (flags
/// never survive a call; the AVX-512-only ones are in [`Preserve::avx512`]).
pub fn savable() -> Regs {
    GPRS | XMMS
}

/// The registers a thunk must preserve: written by the new function, not by the old one, and
/// caller-saved (callee-saved ones the new function preserves itself, by the ABI).
pub fn extra_clobbers(old: Regs, new: Regs) -> Regs {
    ((new - old) & SYSV_CALLER_SAVED) - Regs::FLAGS
}

/// What a thunk saves around the new function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Preserve {
    /// General-purpose and `xmm0`–`xmm15` (saved at the CPU's vector width).
    pub regs: Regs,
    /// `zmm16`–`zmm31` and mask registers.
    pub avx512: Avx512Regs,
}

impl Preserve {
    /// Nothing to save: the redirect goes straight to the new function.
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty() && self.avx512.is_empty()
    }
}

/// Registers no caller can keep a value in across a call, whatever it knows of the callee:
/// flags, and the x87 stack (the ABI requires it empty at every call).
fn never_live_across_calls() -> Regs {
    Regs::FLAGS | Regs::X87
}

/// What the thunk of a replacement must preserve: lp-core's `registers_to_preserve(old, new)`
/// for general-purpose and `xmm0`–`xmm15`, plus the AVX-512-only registers the new code may
/// write when the target's CPU has them (`vectors`). `new_code` is `None` when the new
/// function's bytes are unknown (everything caller-saved is then assumed written).
///
/// Refuses (with the reason) a replacement that writes AMX tile registers in a target that has
/// them: a thunk cannot save tiles (their shape lives in the tile configuration).
pub fn plan(
    old_code: &[u8],
    old_entry: u64,
    new_code: Option<&[u8]>,
    new_entry: u64,
    vectors: &VectorState,
) -> Result<Preserve, String> {
    use lp_core::clobber::{clobbered_registers, written_registers};
    let (diff, new_writes) = match new_code {
        Some(code) => {
            // lp-core's `registers_to_preserve`, whose analysis of the new code is the one
            // needed below as well: made once (it is most of an apply's planning CPU).
            let new = clobbered_registers(code, new_entry);
            let diff = match (written_registers(old_code, old_entry), &new) {
                (Ok(old), Ok(new)) => (*new - old) & SYSV_CALLER_SAVED,
                _ => SYSV_CALLER_SAVED,
            };
            (diff, new.unwrap_or(SYSV_CALLER_SAVED))
        }
        None => (SYSV_CALLER_SAVED, SYSV_CALLER_SAVED),
    };
    let mut p = Preserve {
        regs: diff - never_live_across_calls() - Regs::OTHER_VECTOR,
        avx512: Avx512Regs::default(),
    };
    // The old function's own AVX-512 writes are not subtracted (lp-core lumps them into one
    // bit): the new code's are saved, which errs towards saving more.
    if new_writes.contains(Regs::OTHER_VECTOR) && (vectors.avx512 || vectors.amx) {
        let w = new_code.map_or(
            VectorWrites {
                avx512: Avx512Regs::ALL,
                tiles: true,
            },
            |c| scan_vector_writes(c, new_entry),
        );
        if w.tiles && vectors.amx {
            return Err(
                "the new version may change AMX tile registers, which a register-preserving thunk cannot save".into(),
            );
        }
        if vectors.avx512 {
            p.avx512 = w.avx512;
        }
    }
    Ok(p)
}

/// Builds the thunk placed at `at` that calls `target` preserving `save`, vector registers at
/// the width `vectors` gives them. Refuses (with the reason) registers it cannot save (x87,
/// AVX-512 registers on a CPU without them).
pub fn build(
    at: u64,
    target: u64,
    save: &Preserve,
    vectors: &VectorState,
) -> Result<Vec<u8>, String> {
    let unsupported = save.regs - savable();
    if !unsupported.is_empty() {
        return Err(format!(
            "the new version may change registers {unsupported:?} that callers of the old one rely on (not preservable by a thunk)"
        ));
    }
    if !save.avx512.is_empty() && !vectors.avx512 {
        return Err("AVX-512 registers to preserve on a CPU without AVX-512".into());
    }
    let gprs: Vec<u8> = (0..16u8)
        .filter(|&n| n != 4 && save.regs.contains(Regs::gpr(n as usize)))
        .collect();
    let vecs: Vec<u8> = (0..16u8)
        .filter(|&n| save.regs.contains(Regs::xmm(n as usize)))
        .chain((16..32u8).filter(|&n| save.avx512.zmm_hi & (1 << (n - 16)) != 0))
        .collect();
    let masks: Vec<u8> = (0..8u8)
        .filter(|&n| save.avx512.k & (1 << n) != 0)
        .collect();
    let width = vectors.vector_width();
    let mut out = Vec::new();
    for &r in &gprs {
        if r >= 8 {
            out.push(0x41);
        }
        out.push(0x50 + (r & 7));
    }
    // Frame: masks at [rsp + 8*j], vectors from `vec_base` on, `width` bytes each.
    let vec_base = (8 * masks.len() as u32).next_multiple_of(width);
    let mut frame = vec_base + width * vecs.len() as u32;
    // At entry rsp ≡ 8 (mod 16); before our call it must be ≡ 0.
    let pushed = 8 * gprs.len() as u32;
    if !(8 + pushed + frame).is_multiple_of(16) {
        frame += 8;
    }
    if frame > 0 {
        out.extend_from_slice(&[0x48, 0x81, 0xec]);
        out.extend_from_slice(&frame.to_le_bytes());
    }
    let moves = |out: &mut Vec<u8>, store: bool| {
        for (j, &k) in masks.iter().enumerate() {
            kmov(out, store, vectors.avx512bw, k, 8 * j as u32);
        }
        for (i, &v) in vecs.iter().enumerate() {
            let disp = vec_base + width * i as u32;
            match width {
                64 => vmovdqu64_zmm(out, store, v, disp),
                32 => vmovdqu_ymm(out, store, v, disp),
                _ => movdqu(out, if store { 0x7f } else { 0x6f }, v, disp),
            }
        }
    };
    moves(&mut out, true);
    let after_call = at + out.len() as u64 + 5;
    let rel = target.wrapping_sub(after_call) as i64;
    let rel =
        i32::try_from(rel).map_err(|_| "thunk out of reach of the new function".to_string())?;
    out.push(0xe8);
    out.extend_from_slice(&rel.to_le_bytes());
    moves(&mut out, false);
    if frame > 0 {
        out.extend_from_slice(&[0x48, 0x81, 0xc4]);
        out.extend_from_slice(&frame.to_le_bytes());
    }
    for &r in gprs.iter().rev() {
        if r >= 8 {
            out.push(0x41);
        }
        out.push(0x58 + (r & 7));
    }
    out.push(0xc3);
    debug_assert!(out.len() <= MAX_LEN);
    Ok(out)
}

/// ModRM + SIB + disp32 of `[rsp+disp32]` with register field `reg`.
fn rsp_operand(out: &mut Vec<u8>, reg: u8, disp: u32) {
    out.extend_from_slice(&[0x84 | ((reg & 7) << 3), 0x24]);
    out.extend_from_slice(&disp.to_le_bytes());
}

/// `movdqu [rsp+disp32], xmmN` (op 0x7f) or `movdqu xmmN, [rsp+disp32]` (op 0x6f).
fn movdqu(out: &mut Vec<u8>, op: u8, xmm: u8, disp: u32) {
    out.push(0xf3);
    if xmm >= 8 {
        out.push(0x44);
    }
    out.extend_from_slice(&[0x0f, op]);
    rsp_operand(out, xmm, disp);
}

/// `vmovdqu [rsp+disp32], ymmN` / `vmovdqu ymmN, [rsp+disp32]` (VEX.256.F3.0F 7F/6F), N < 16.
fn vmovdqu_ymm(out: &mut Vec<u8>, store: bool, ymm: u8, disp: u32) {
    // 2-byte VEX: R̄ vvvv(1111) L(1) pp(F3 = 10)
    let r_bar = if ymm >= 8 { 0 } else { 0x80 };
    out.extend_from_slice(&[0xc5, r_bar | 0x7e, if store { 0x7f } else { 0x6f }]);
    rsp_operand(out, ymm, disp);
}

/// `vmovdqu64 [rsp+disp32], zmmN` / `vmovdqu64 zmmN, [rsp+disp32]` (EVEX.512.F3.0F.W1
/// 7F/6F), N < 32.
fn vmovdqu64_zmm(out: &mut Vec<u8>, store: bool, zmm: u8, disp: u32) {
    // P0: R̄ X̄ B̄ R̄' 0 0 m m(01 = 0F); base rsp needs no X/B extension.
    let r_bar = if zmm & 8 != 0 { 0 } else { 0x80 };
    let r2_bar = if zmm & 16 != 0 { 0 } else { 0x10 };
    let p0 = r_bar | 0x60 | r2_bar | 0x01;
    // P1: W(1) vvvv(1111) 1 pp(10); P2: z(0) L'L(10) b(0) V̄'(1) aaa(000).
    out.extend_from_slice(&[0x62, p0, 0xfe, 0x48, if store { 0x7f } else { 0x6f }]);
    rsp_operand(out, zmm, disp);
}

/// `kmovq/kmovw [rsp+disp32], kN` (VEX.L0.0F.W1/W0 91) or the load (90), 3-byte VEX.
fn kmov(out: &mut Vec<u8>, store: bool, wide: bool, k: u8, disp: u32) {
    let w = if wide { 0xf8 } else { 0x78 };
    out.extend_from_slice(&[0xc4, 0xe1, w, if store { 0x91 } else { 0x90 }]);
    rsp_operand(out, k, disp);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(regs: Regs) -> Preserve {
        Preserve {
            regs,
            avx512: Avx512Regs::default(),
        }
    }

    const AVX512: VectorState = VectorState {
        avx: true,
        avx512: true,
        avx512bw: true,
        amx: false,
    };

    #[test]
    fn saves_and_restores_in_reverse_and_keeps_alignment() {
        let sse = VectorState::SSE;
        let t = build(
            0x1000,
            0x2000,
            &only(Regs::RCX | Regs::R9 | Regs::XMM1),
            &sse,
        )
        .unwrap();
        // push rcx; push r9; sub rsp,24 (8+16+16=40 → +8 = 48 ≡ 0)
        assert_eq!(&t[..3], &[0x51, 0x41, 0x51]);
        assert_eq!(&t[3..10], &[0x48, 0x81, 0xec, 24, 0, 0, 0]);
        // movdqu [rsp+0], xmm1
        assert_eq!(&t[10..19], &[0xf3, 0x0f, 0x7f, 0x8c, 0x24, 0, 0, 0, 0]);
        // call 0x2000
        assert_eq!(t[19], 0xe8);
        let rel = i32::from_le_bytes(t[20..24].try_into().unwrap());
        assert_eq!(0x1000 + 24 + rel as i64, 0x2000);
        assert_eq!(&t[t.len() - 4..], &[0x41, 0x59, 0x59, 0xc3]);
    }

    #[test]
    fn no_frame_when_aligned_and_refuses_x87_and_missing_avx512() {
        let sse = VectorState::SSE;
        let t = build(0x1000, 0x1100, &only(Regs::RDX), &sse).unwrap();
        assert_eq!(&t[..1], &[0x52]);
        assert_eq!(t[1], 0xe8);
        assert!(build(0, 0, &only(Regs::X87), &sse).is_err());
        let zmm20 = Preserve {
            regs: Regs::empty(),
            avx512: Avx512Regs {
                zmm_hi: 1 << 4,
                k: 0,
            },
        };
        assert!(build(0, 0, &zmm20, &sse).is_err());
        assert!(build(0, 0, &zmm20, &AVX512).is_ok());
    }

    /// Decodes `code` with iced-x86 into lines like `Vmovdqu64 [rsp+0x40],ZMM3`.
    fn disassemble(code: &[u8], at: u64) -> Vec<String> {
        use iced_x86::{Decoder, DecoderOptions, OpKind, Register};
        let mut d = Decoder::with_ip(64, code, at, DecoderOptions::NONE);
        let mut out = Vec::new();
        for i in d.iter() {
            assert!(!i.is_invalid(), "invalid instruction in {code:02x?}");
            let ops: Vec<String> = (0..i.op_count())
                .map(|n| match i.op_kind(n) {
                    OpKind::Register => format!("{:?}", i.op_register(n)),
                    OpKind::Memory => {
                        assert_eq!(i.memory_base(), Register::RSP);
                        format!("[rsp+{:#x}]", i.memory_displacement64())
                    }
                    OpKind::NearBranch64 => format!("{:#x}", i.near_branch64()),
                    _ => format!("{:#x}", i.immediate(n)),
                })
                .collect();
            out.push(
                format!("{:?} {}", i.mnemonic(), ops.join(","))
                    .trim()
                    .to_string(),
            );
        }
        out
    }

    #[test]
    fn vectors_are_saved_whole_at_the_cpu_width() {
        let save = Preserve {
            regs: Regs::RAX | Regs::XMM3 | Regs::XMM9,
            avx512: Avx512Regs {
                zmm_hi: (1 << 4) | (1 << 15),
                k: (1 << 1) | (1 << 5),
            },
        };
        let t = build(0x1000, 0x2000, &save, &AVX512).unwrap();
        let text = disassemble(&t, 0x1000);
        // push rax (8) + frame: masks 16 → 64, 4 zmm → 320; 8+8+320 ≡ 0 (mod 16)
        let expected = [
            "Push RAX",
            "Sub RSP,0x140",
            "Kmovq [rsp+0x0],K1",
            "Kmovq [rsp+0x8],K5",
            "Vmovdqu64 [rsp+0x40],ZMM3",
            "Vmovdqu64 [rsp+0x80],ZMM9",
            "Vmovdqu64 [rsp+0xc0],ZMM20",
            "Vmovdqu64 [rsp+0x100],ZMM31",
            "Call 0x2000",
            "Kmovq K1,[rsp+0x0]",
            "Kmovq K5,[rsp+0x8]",
            "Vmovdqu64 ZMM3,[rsp+0x40]",
            "Vmovdqu64 ZMM9,[rsp+0x80]",
            "Vmovdqu64 ZMM20,[rsp+0xc0]",
            "Vmovdqu64 ZMM31,[rsp+0x100]",
            "Add RSP,0x140",
            "Pop RAX",
            "Ret",
        ];
        assert_eq!(text, expected);
        // AVX only: ymm; AVX-512F without BW: kmovw.
        let avx = VectorState {
            avx: true,
            ..VectorState::SSE
        };
        let t = build(0x1000, 0x2000, &only(Regs::XMM3 | Regs::XMM12), &avx).unwrap();
        let text = disassemble(&t, 0x1000);
        assert_eq!(text[1], "Vmovdqu [rsp+0x0],YMM3");
        assert_eq!(text[2], "Vmovdqu [rsp+0x20],YMM12");
        assert_eq!(text[5], "Vmovdqu YMM12,[rsp+0x20]");
        let f = VectorState {
            avx512bw: false,
            ..AVX512
        };
        let t = build(0x1000, 0x2000, &save, &f).unwrap();
        assert_eq!(disassemble(&t, 0x1000)[2], "Kmovw [rsp+0x0],K1");
    }

    #[test]
    fn the_largest_thunk_fits() {
        let save = Preserve {
            regs: SYSV_CALLER_SAVED & savable(),
            avx512: Avx512Regs::ALL,
        };
        let t = build(0x1000, 0x2000, &save, &AVX512).unwrap();
        assert!(t.len() <= MAX_LEN, "{}", t.len());
        assert_eq!(disassemble(&t, 0x1000).len(), 9 * 2 + 2 + 2 * (32 + 8) + 2);
    }

    #[test]
    fn plan_adds_the_avx512_registers_the_new_code_writes() {
        let old = [0x8d, 0x04, 0x3f, 0xc3]; // lea eax,[rdi+rdi]; ret
                                            // vpxord xmm20,xmm20,xmm20; kxnorw k5,k5,k5; vpxor xmm3,xmm3,xmm3; lea eax,[rdi+rdi]; ret
        let new = [
            0x62, 0xa1, 0x5d, 0x00, 0xef, 0xe4, 0xc5, 0xd4, 0x46, 0xed, 0xc5, 0xe1, 0xef, 0xdb,
            0x8d, 0x04, 0x3f, 0xc3,
        ];
        let p = plan(&old, 0x1000, Some(&new), 0x2000, &AVX512).unwrap();
        assert_eq!(p.regs, Regs::XMM3);
        assert_eq!(
            p.avx512,
            Avx512Regs {
                zmm_hi: 1 << 4,
                k: 1 << 5
            }
        );
        // The same CPU without AVX-512: those registers do not exist, nothing to keep.
        let avx = VectorState {
            avx: true,
            ..VectorState::SSE
        };
        let p = plan(&old, 0x1000, Some(&new), 0x2000, &avx).unwrap();
        assert!(p.avx512.is_empty());
        // Equal register use: no thunk.
        let p = plan(&old, 0x1000, Some(&old), 0x2000, &AVX512).unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn plan_refuses_tile_writes_where_tiles_exist() {
        let old = [0x8d, 0x04, 0x3f, 0xc3];
        let new = [0xc4, 0xe2, 0x7b, 0x49, 0xc8, 0xc3]; // tilezero tmm1; ret
        let amx = VectorState {
            amx: true,
            ..AVX512
        };
        let e = plan(&old, 0x1000, Some(&new), 0x2000, &amx).unwrap_err();
        assert!(e.contains("AMX tile"), "{e}");
        assert!(plan(&old, 0x1000, Some(&new), 0x2000, &AVX512).is_ok());
    }

    #[test]
    fn extra_is_new_minus_old_caller_saved_only() {
        let old = Regs::RAX | Regs::FLAGS;
        let new = Regs::RAX | Regs::RCX | Regs::RBX | Regs::FLAGS;
        assert_eq!(extra_clobbers(old, new), Regs::RCX);
    }
}

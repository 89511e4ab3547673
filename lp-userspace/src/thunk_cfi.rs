//! Call frame information for the code livepatch generates around a patch: the
//! register-preserving thunks of [`crate::thunk`] and the trampolines (see
//! [`crate::debug_info`]'s `trampoline_cfi`).
//!
//! A thunk pushes registers, calls the new function and pops them again, so while the new
//! function runs a thunk frame sits between it and the old function's caller. An unwinder
//! (libgcc raising a C++ exception, our stack check) can only step over that frame with CFI.
//! The thunk is decoded back from its bytes (push / `sub rsp` / vector and mask moves / `call`
//! / `add rsp` / pop / `ret`: exactly what [`crate::thunk::build`] emits). Each such piece of
//! code gets a [`FrameCfi`]; [`eh_frame`] puts them into a small `.eh_frame` (one CIE, one FDE
//! per piece, zero-terminated) that is registered like the patch image's own.

/// Where the canonical frame address is, relative to `rsp`, from each offset on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThunkFrame {
    /// Runtime address of the thunk.
    pub start: u64,
    /// Its length in bytes (through the `ret`).
    pub len: u64,
    /// `(offset, cfa_offset)`: from `offset` on, CFA = rsp + cfa_offset.
    pub steps: Vec<(u64, u64)>,
}

/// The CFI of one piece of generated code: a CFA program run after the CIE's initial rules
/// (CFA = rsp + 8, return address at CFA - 8; data alignment -8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameCfi {
    /// Runtime address of the code.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    /// DWARF call frame instructions (advances relative to `start`).
    pub program: Vec<u8>,
}

/// Appends a `DW_CFA_advance_loc*` moving the location by `delta` bytes.
pub fn advance(out: &mut Vec<u8>, delta: u64) {
    if delta == 0 {
    } else if delta < 0x40 {
        out.push(0x40 | delta as u8); // DW_CFA_advance_loc
    } else if delta <= 0xff {
        out.push(0x02); // DW_CFA_advance_loc1
        out.push(delta as u8);
    } else if delta <= 0xffff {
        out.push(0x03); // DW_CFA_advance_loc2
        out.extend_from_slice(&(delta as u16).to_le_bytes());
    } else {
        out.push(0x04); // DW_CFA_advance_loc4
        out.extend_from_slice(&(delta as u32).to_le_bytes());
    }
}

impl ThunkFrame {
    /// The thunk's CFA program: one `DW_CFA_def_cfa_offset` per stack pointer change.
    pub fn cfi(&self) -> FrameCfi {
        let mut program = Vec::new();
        let mut last = 0u64;
        for &(off, cfa) in &self.steps {
            if off >= self.len {
                break;
            }
            advance(&mut program, off - last);
            program.push(0x0e); // DW_CFA_def_cfa_offset
            uleb(&mut program, cfa);
            last = off;
        }
        FrameCfi {
            start: self.start,
            len: self.len,
            program,
        }
    }
}

/// Decodes the thunk at `start` from `code` (its bytes and possibly more). `None` when the
/// bytes are not a thunk of ours.
pub fn decode(start: u64, code: &[u8]) -> Option<ThunkFrame> {
    let mut cfa = 8u64;
    let mut steps = Vec::new();
    let mut i = 0usize;
    loop {
        let b = *code.get(i)?;
        let rex_b = b == 0x41;
        let op = if rex_b { *code.get(i + 1)? } else { b };
        let len = if rex_b { 2 } else { 1 };
        match op {
            0x50..=0x57 => {
                i += len;
                cfa += 8;
                steps.push((i as u64, cfa));
            }
            0x58..=0x5f => {
                i += len;
                cfa = cfa.checked_sub(8)?;
                steps.push((i as u64, cfa));
            }
            0x48 if !rex_b => {
                // sub/add rsp, imm32: 48 81 ec|c4 imm32
                let bytes = code.get(i + 1..i + 7)?;
                if bytes[0] != 0x81 {
                    return None;
                }
                let imm = u64::from(u32::from_le_bytes(bytes[2..6].try_into().ok()?));
                cfa = match bytes[1] {
                    0xec => cfa + imm,
                    0xc4 => cfa.checked_sub(imm)?,
                    _ => return None,
                };
                i += 7;
                steps.push((i as u64, cfa));
            }
            // Saves and restores through [rsp+disp32], no CFA change: movdqu (optional REX.R,
            // 9 or 10 bytes), vmovdqu ymm (2-byte VEX, 9), kmov (3-byte VEX, 10), vmovdqu64
            // zmm (EVEX, 11).
            0xf3 if !rex_b => {
                let rex = usize::from(*code.get(i + 1)? == 0x44);
                i += 9 + rex;
            }
            0xc5 if !rex_b => i += 9,
            0xc4 if !rex_b => i += 10,
            0x62 if !rex_b => i += 11,
            0xe8 if !rex_b => i += 5,
            0xc3 if !rex_b => {
                i += 1;
                steps.dedup_by_key(|s| s.0);
                return Some(ThunkFrame {
                    start,
                    len: i as u64,
                    steps,
                });
            }
            _ => return None,
        }
        if i > crate::thunk::MAX_LEN {
            return None;
        }
    }
}

fn uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Appends an unsigned LEB128.
pub fn uleb_to(out: &mut Vec<u8>, v: u64) {
    uleb(out, v)
}

/// Appends a signed LEB128.
pub fn sleb_to(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if (v == 0 && b & 0x40 == 0) || (v == -1 && b & 0x40 != 0) {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The `.eh_frame` (zero-terminated) describing `frames`, to be placed at runtime address `at`.
pub fn eh_frame(frames: &[FrameCfi], at: u64) -> Vec<u8> {
    let mut out = Vec::new();
    // CIE: version 1, "zR", code align 1, data align -8, return address column 16,
    // FDE pointers pc-relative sdata4; CFA = rsp + 8, return address at CFA - 8.
    let mut cie = vec![0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, 16, 1, 0x1b];
    cie.extend_from_slice(&[0x0c, 7, 8, 0x90, 1]);
    // The length field counts everything after itself: pad (DW_CFA_nop) so that each record,
    // length included, keeps 8-byte alignment.
    while !(cie.len() + 4).is_multiple_of(8) {
        cie.push(0);
    }
    out.extend_from_slice(&(cie.len() as u32).to_le_bytes());
    out.extend_from_slice(&cie);
    for f in frames {
        let fde_start = out.len();
        let mut body = Vec::new();
        // CIE pointer: distance from this field back to the CIE (at offset 0).
        body.extend_from_slice(&((fde_start + 4) as u32).to_le_bytes());
        let pc_field = at + (fde_start + 8) as u64;
        body.extend_from_slice(&(f.start.wrapping_sub(pc_field) as u32).to_le_bytes());
        body.extend_from_slice(&(f.len as u32).to_le_bytes());
        body.push(0); // augmentation data length
        body.extend_from_slice(&f.program);
        while !(body.len() + 4).is_multiple_of(8) {
            body.push(0);
        }
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thunk::{Preserve, VectorState};
    use lp_core::clobber::Regs;

    fn only(regs: Regs) -> Preserve {
        Preserve {
            regs,
            avx512: Default::default(),
        }
    }

    const AVX512: VectorState = VectorState {
        avx: true,
        avx512: true,
        avx512bw: true,
        amx: false,
    };

    #[test]
    fn decodes_what_thunk_build_emits() {
        let code = crate::thunk::build(
            0x1000,
            0x2000,
            &only(Regs::RCX | Regs::R9 | Regs::XMM1),
            &VectorState::SSE,
        )
        .unwrap();
        let f = decode(0x1000, &code).unwrap();
        assert_eq!(f.len as usize, code.len());
        // push rcx (1) → 16, push r9 (3) → 24, sub rsp,24 (10) → 48; after the call, add
        // rsp (…) → 24, pop r9 → 16, pop rcx → 8.
        assert_eq!(&f.steps[..3], &[(1, 16), (3, 24), (10, 48)]);
        let tail: Vec<u64> = f.steps[3..].iter().map(|s| s.1).collect();
        assert_eq!(tail, vec![24, 16, 8]);
        assert!(decode(0x1000, &[0x90, 0xc3]).is_none());
    }

    #[test]
    fn eh_frame_of_a_long_thunk_gives_the_cfa_at_every_offset() {
        use gimli::{BaseAddresses, EhFrame, LittleEndian, UnwindContext, UnwindSection};
        // Every caller-saved register: the xmm saves make the thunk longer than 255 bytes,
        // so the CFI needs advances wider than one byte.
        let save = crate::thunk::Preserve {
            regs: lp_core::clobber::SYSV_CALLER_SAVED & crate::thunk::savable(),
            avx512: crate::thunk::Avx512Regs::ALL,
        };
        let start = 0x7000_1000;
        let code = crate::thunk::build(start, 0x7000_8000, &save, &AVX512).unwrap();
        assert!(code.len() > 255);
        let f = decode(start, &code).unwrap();
        let at = 0x7000_3000;
        let bytes = eh_frame(&[f.cfi()], at);
        let eh = EhFrame::new(&bytes, LittleEndian);
        let bases = BaseAddresses::default().set_eh_frame(at);
        let mut ctx = UnwindContext::new();
        for off in 0..f.len {
            let expected = f
                .steps
                .iter()
                .rev()
                .find(|s| s.0 <= off)
                .map(|s| s.1)
                .unwrap_or(8);
            let row = eh
                .unwind_info_for_address(&bases, &mut ctx, start + off, EhFrame::cie_from_offset)
                .unwrap();
            match row.cfa() {
                gimli::CfaRule::RegisterAndOffset { register, offset } => {
                    assert_eq!((register.0, *offset as u64), (7, expected), "offset {off}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn eh_frame_parses_and_gives_the_cfa_at_the_call_return() {
        use gimli::{BaseAddresses, EhFrame, LittleEndian, UnwindContext, UnwindSection};
        let code = crate::thunk::build(
            0x7000_1000,
            0x7000_2000,
            &only(Regs::RDX | Regs::XMM0),
            &VectorState::SSE,
        )
        .unwrap();
        let f = decode(0x7000_1000, &code).unwrap();
        let at = 0x7000_3000;
        let bytes = eh_frame(&[f.cfi()], at);
        let eh = EhFrame::new(&bytes, LittleEndian);
        let bases = BaseAddresses::default().set_eh_frame(at);
        let mut ctx = UnwindContext::new();
        let call_ret = 0x7000_1000 + code.iter().position(|&b| b == 0xe8).unwrap() as u64 + 5;
        let row = eh
            .unwind_info_for_address(&bases, &mut ctx, call_ret, EhFrame::cie_from_offset)
            .unwrap();
        // Return address (8) + push rdx (8) + room for xmm0 (16): CFA = rsp + 32.
        match row.cfa() {
            gimli::CfaRule::RegisterAndOffset { register, offset } => {
                assert_eq!((register.0, *offset), (7, 32));
            }
            other => panic!("{other:?}"),
        }
    }
}

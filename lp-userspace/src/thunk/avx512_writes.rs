//! Which AVX-512-only registers (`zmm16`–`zmm31`, `k0`–`k7`) and AMX tiles a new function may
//! write. lp-core's clobber analysis reports them as one bit (`OTHER_VECTOR`); a thunk saves
//! each register on its own, so it scans the new code for them (an upper bound: every
//! instruction counts, reachable or not, and leaving the function — a call, a tail call, an
//! indirect jump — counts as writing all of them).

use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess};

/// A set of AVX-512-only registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Avx512Regs {
    /// `zmm16`–`zmm31`: bit n is `zmm(16 + n)`.
    pub zmm_hi: u16,
    /// `k0`–`k7`: bit n is `kn`.
    pub k: u8,
}

impl Avx512Regs {
    /// Every AVX-512-only register.
    pub const ALL: Avx512Regs = Avx512Regs {
        zmm_hi: u16::MAX,
        k: u8::MAX,
    };

    /// No register.
    pub fn is_empty(&self) -> bool {
        self.zmm_hi == 0 && self.k == 0
    }
}

/// What [`scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VectorWrites {
    /// AVX-512-only registers the function may write.
    pub avx512: Avx512Regs,
    /// It writes AMX tile registers.
    pub tiles: bool,
}

/// Scans the function `code` at `entry`. Undecodable bytes count as writing everything.
pub fn scan(code: &[u8], entry: u64) -> VectorWrites {
    let all = VectorWrites {
        avx512: Avx512Regs::ALL,
        tiles: true,
    };
    let end = entry + code.len() as u64;
    let mut out = VectorWrites::default();
    let mut factory = InstructionInfoFactory::new();
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    while decoder.can_decode() {
        let instr = decoder.decode();
        if instr.is_invalid() {
            return all;
        }
        let leaves = match instr.flow_control() {
            FlowControl::Call | FlowControl::IndirectCall | FlowControl::IndirectBranch => true,
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                !(entry..end).contains(&instr.near_branch_target())
            }
            _ => false,
        };
        if leaves {
            // A callee may write any of them; tiles are not kept by compilers across calls
            // (gcc names them only in intrinsics' inline asm), so a call does not count.
            out.avx512 = Avx512Regs::ALL;
        }
        for used in factory.info(&instr).used_registers() {
            if !matches!(
                used.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                continue;
            }
            let reg = used.register().full_register();
            if reg.is_zmm() && reg.number() >= 16 {
                out.avx512.zmm_hi |= 1 << (reg.number() - 16);
            } else if reg.is_k() {
                out.avx512.k |= 1 << reg.number();
            } else if reg.is_tmm() {
                out.tiles = true;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_high_zmm_and_mask_writes() {
        // vpxord xmm20,xmm20,xmm20 ; kxnorw k5,k5,k5 ; vmovdqa64 zmm0,zmm31 ; ret
        let code = [
            0x62, 0xa1, 0x5d, 0x00, 0xef, 0xe4, // vpxord xmm20,xmm20,xmm20
            0xc5, 0xd4, 0x46, 0xed, // kxnorw k5,k5,k5
            0x62, 0x91, 0xfd, 0x48, 0x6f, 0xc7, // vmovdqa64 zmm0,zmm31 (writes zmm0 only)
            0xc3,
        ];
        let w = scan(&code, 0x1000);
        assert_eq!(w.avx512.zmm_hi, 1 << 4);
        assert_eq!(w.avx512.k, 1 << 5);
        assert!(!w.tiles);
    }

    #[test]
    fn a_call_may_write_all_and_plain_code_none() {
        // call elsewhere ; ret
        let w = scan(&[0xe8, 0, 0x10, 0, 0, 0xc3], 0x1000);
        assert_eq!(w.avx512, Avx512Regs::ALL);
        // lea eax,[rdi+rdi] ; ret
        let w = scan(&[0x8d, 0x04, 0x3f, 0xc3], 0x1000);
        assert!(w.avx512.is_empty() && !w.tiles);
    }

    #[test]
    fn finds_tile_writes() {
        // tilezero tmm1 ; ret
        let w = scan(&[0xc4, 0xe2, 0x7b, 0x49, 0xc8, 0xc3], 0x1000);
        assert!(w.tiles);
    }
}

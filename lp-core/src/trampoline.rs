//! The trampoline: the instructions a redirect displaced, relocated to another address and
//! followed by a jump back into the original function, so that new code (or a trap handler that
//! must "resume the original") can still run the old function.
//!
//! The displaced instructions are re-encoded with iced-x86's `BlockEncoder`: RIP-relative memory
//! operands keep pointing at the same absolute address, relative branches keep their absolute
//! target (`jcc rel8` grows to `jcc rel32`, or to `jncc` over an absolute jump when even rel32 does
//! not reach), and branches between displaced instructions stay inside the trampoline. Then comes
//! a jump to [`Site::resume_addr`].
//!
//! **Allocation.** `BlockEncoder` builds its result in a `Vec`, so this module uses `alloc`
//! (iced-x86 itself always depends on `alloc`). That is planning code, run once per patch, never
//! on the trap path; the kernel adapter provides a `kmalloc`-backed global allocator. The caller
//! still supplies the output buffer, so nothing escapes as an allocation.
//!
//! What cannot be relocated is refused with a reason: a RIP-relative memory operand whose data
//! lies beyond ±2 GiB of the trampoline (no encoding reaches it), or a buffer too small.

extern crate alloc;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, Instruction, InstructionBlock,
};

use crate::jump::Jump;
use crate::site::{Site, MAX_DISPLACED_LEN};

/// An output buffer of this size always holds a trampoline: at most 32 displaced bytes, i.e. at
/// most 16 relative branches of 2 bytes that each grow to 18 bytes (`loop`/`jrcxz` rewritten to
/// reach an absolute jump), plus the 14-byte jump back.
///
/// ```
/// use lp_core::trampoline::MAX_TRAMPOLINE_LEN;
/// let buffer = [0u8; MAX_TRAMPOLINE_LEN]; // what callers allocate per trampoline
/// assert_eq!(buffer.len(), 304);
/// ```
pub const MAX_TRAMPOLINE_LEN: usize = 16 * 18 + 14 + 2;

/// Why a trampoline cannot be built. `Display` is one line naming the problem.
///
/// ```
/// use lp_core::{site::validate_site, trampoline::{build_trampoline, TrampolineError}};
/// let code = [0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0xc3]; // mov eax,[rip+0x100]; ret
/// let site = validate_site(&code, 0x1000, 5).unwrap();
/// let mut out = [0u8; 64];
/// let err = build_trampoline(&site, 0x7f00_0000_0000, &mut out).unwrap_err();
/// assert!(matches!(err, TrampolineError::OutOfReach { target: 0x1106, .. }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TrampolineError {
    /// A displaced instruction reads or writes memory beyond ±2 GiB of the trampoline.
    #[error("instruction at {addr:#x} uses data at {target:#x}, out of RIP-relative reach of a trampoline at {at:#x}")]
    OutOfReach {
        /// Address of the displaced instruction.
        addr: u64,
        /// The memory it refers to.
        target: u64,
        /// The trampoline address asked for.
        at: u64,
    },
    /// The site's displaced bytes do not decode (the site was not made by `validate_site`).
    #[error("displaced bytes at {addr:#x} do not decode to whole instructions")]
    Undecodable {
        /// Address of the offending instruction.
        addr: u64,
    },
    /// iced-x86 could not re-encode an instruction at the new address.
    #[error("cannot re-encode the instructions displaced from {addr:#x} at {at:#x}")]
    Encode {
        /// The patch address.
        addr: u64,
        /// The trampoline address asked for.
        at: u64,
    },
    /// The output buffer is too small.
    #[error("trampoline needs {needed} bytes, the buffer has {have}")]
    BufferTooSmall {
        /// Bytes the trampoline needs.
        needed: usize,
        /// Bytes the buffer has.
        have: usize,
    },
}

/// Build the trampoline for `site` at address `at` into `out`; returns its length.
///
/// ```
/// use lp_core::{site::validate_site, trampoline::{build_trampoline, MAX_TRAMPOLINE_LEN}};
/// // push rbp; mov rbp,rsp; mov eax,[rip+0x100]; pop rbp; ret
/// let code = [0x55, 0x48, 0x89, 0xe5, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0x5d, 0xc3];
/// let site = validate_site(&code, 0x40_1000, 5).unwrap();
/// assert_eq!(site.displaced_len, 10);
/// let mut out = [0u8; MAX_TRAMPOLINE_LEN];
/// let n = build_trampoline(&site, 0x40_8000, &mut out).unwrap();
/// // push rbp; mov rbp,rsp copied as is; the load still reads 0x40_110a; then jmp 0x40_100a
/// assert_eq!(out[..4], [0x55, 0x48, 0x89, 0xe5]);
/// assert_eq!(out[4..10], [0x8b, 0x05, 0x00, 0x91, 0xff, 0xff]); // 0x40_800a + disp = 0x40_110a
/// assert_eq!(out[10], 0xe9);
/// assert_eq!(n, 15);
/// ```
pub fn build_trampoline(site: &Site, at: u64, out: &mut [u8]) -> Result<usize, TrampolineError> {
    let mut instrs = [Instruction::default(); MAX_DISPLACED_LEN];
    let mut count = 0;
    let mut decoder = Decoder::with_ip(64, site.displaced(), site.patch_addr, DecoderOptions::NONE);
    while decoder.can_decode() {
        let addr = decoder.ip();
        let instr = decoder.decode();
        if instr.is_invalid() {
            return Err(TrampolineError::Undecodable { addr });
        }
        if instr.is_ip_rel_memory_operand() {
            let target = instr.ip_rel_memory_address();
            if !in_rip_reach(at, target) {
                return Err(TrampolineError::OutOfReach { addr, target, at });
            }
        }
        instrs[count] = instr;
        count += 1;
    }
    let block = InstructionBlock::new(&instrs[..count], at);
    let encoded = BlockEncoder::encode(64, block, BlockEncoderOptions::NONE).map_err(|_| {
        TrampolineError::Encode {
            addr: site.patch_addr,
            at,
        }
    })?;
    let code: alloc::vec::Vec<u8> = encoded.code_buffer;
    // The jump back is appended by hand: inside the block, iced would resolve a jump to
    // `resume` against any block instruction claiming that address.
    let back_at = at.wrapping_add(code.len() as u64);
    let back = Jump::to(back_at, site.resume_addr());
    let needed = code.len() + back.len();
    let have = out.len();
    let dst = out
        .get_mut(..needed)
        .ok_or(TrampolineError::BufferTooSmall { needed, have })?;
    dst[..code.len()].copy_from_slice(&code);
    dst[code.len()..].copy_from_slice(back.as_bytes());
    Ok(needed)
}

/// Whether a RIP-relative operand in a trampoline at `at` can reach `target`, with margin for the
/// instruction's position inside the trampoline.
fn in_rip_reach(at: u64, target: u64) -> bool {
    let margin = MAX_TRAMPOLINE_LEN as i64;
    let delta = target.wrapping_sub(at) as i64;
    delta > i32::MIN as i64 + margin && delta < i32::MAX as i64 - margin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::validate_site;
    use iced_x86::{FlowControl, Mnemonic};

    fn decode_all(bytes: &[u8], ip: u64) -> alloc::vec::Vec<Instruction> {
        Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    #[test]
    fn short_branch_far_away_keeps_its_target() {
        // 0: test edi,edi ; 2: je +0x10 (-> 0x14) ; 4: nop ; 5..: padding body
        let mut code = [0x90u8; 0x20];
        code[..5].copy_from_slice(&[0x85, 0xff, 0x74, 0x10, 0x90]);
        code[0x1f] = 0xc3;
        let site = validate_site(&code, 0x1000, 5).unwrap();
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        let at = 0x7000_0000;
        let n = build_trampoline(&site, at, &mut out).unwrap();
        let instrs = decode_all(&out[..n], at);
        let je = instrs
            .iter()
            .find(|i| i.mnemonic() == Mnemonic::Je)
            .unwrap();
        assert_eq!(je.near_branch_target(), 0x1014);
        let last = instrs.last().unwrap();
        assert_eq!(last.flow_control(), FlowControl::UnconditionalBranch);
        assert_eq!(last.near_branch_target(), 0x1005);
    }

    #[test]
    fn beyond_rel32_uses_absolute_jumps() {
        let code = [0x85, 0xff, 0x74, 0x10, 0x90, 0xc3];
        let mut full = [0x90u8; 0x20];
        full[..6].copy_from_slice(&code);
        let site = validate_site(&full, 0x1000, 5).unwrap();
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        let at = 0x7f00_0000_0000;
        let n = build_trampoline(&site, at, &mut out).unwrap();
        // the branch and the jump back can no longer be rel32: they go through memory
        let instrs = decode_all(&out[..n], at);
        assert!(instrs
            .iter()
            .any(|i| i.mnemonic() == Mnemonic::Jmp && i.is_ip_rel_memory_operand()));
    }

    #[test]
    fn rip_relative_data_out_of_reach_is_refused() {
        let code = [0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0xc3]; // mov eax,[rip+0x100]; ret
        let site = validate_site(&code, 0x1000, 5).unwrap();
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        assert_eq!(
            build_trampoline(&site, 0x7f00_0000_0000, &mut out),
            Err(TrampolineError::OutOfReach {
                addr: 0x1000,
                target: 0x1106,
                at: 0x7f00_0000_0000
            })
        );
    }

    #[test]
    fn worst_case_fits_the_promised_length() {
        // 14 bytes of 2-byte `loop`/`jrcxz`/`jcc` whose targets are far from the trampoline: each
        // becomes a branch over an absolute jump; the bound must still hold.
        for op in [0xe2u8, 0xe3, 0x74] {
            let mut code = [0x90u8; 40];
            for i in 0..7 {
                code[2 * i] = op;
                code[2 * i + 1] = 0x10;
            }
            code[39] = 0xc3;
            let site = validate_site(&code, 0x1000, 14).unwrap();
            assert_eq!(site.displaced_count, 7);
            let mut out = [0u8; 4 * MAX_TRAMPOLINE_LEN];
            let n = build_trampoline(&site, 0x7f00_0000_0000, &mut out).unwrap();
            assert!(n <= MAX_TRAMPOLINE_LEN, "{n}");
        }
    }

    #[test]
    fn small_buffer_is_refused() {
        let code = [0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3];
        let site = validate_site(&code, 0x1000, 5).unwrap();
        let mut out = [0u8; 4];
        assert_eq!(
            build_trampoline(&site, 0x2000, &mut out),
            Err(TrampolineError::BufferTooSmall {
                needed: 11,
                have: 4
            })
        );
    }

    #[test]
    fn branch_back_to_the_patch_address_stays_in_the_trampoline() {
        // 0: dec edi ; 2: jne 0 ; 4: xor eax,eax ; 6: ret
        let code = [0xff, 0xcf, 0x75, 0xfc, 0x31, 0xc0, 0xc3];
        let site = validate_site(&code, 0x1000, 5).unwrap();
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        let n = build_trampoline(&site, 0x9000, &mut out).unwrap();
        let instrs = decode_all(&out[..n], 0x9000);
        assert_eq!(instrs[1].near_branch_target(), 0x9000);
    }
}

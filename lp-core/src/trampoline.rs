//! The trampoline: the instructions a redirect displaced, relocated to another address and
//! followed by a jump back into the original function, so that new code (or a trap handler that
//! must "resume the original") can still run the old function.
//!
//! Nearly always the displaced instructions are copied as they are (RIP-relative displacements
//! and branch targets rewritten by hand: [`copy_trampoline`]), which needs no instruction
//! encoder. Otherwise they are re-encoded with iced-x86's `BlockEncoder`
//! ([`build_trampoline_reencoded`]): RIP-relative memory operands keep pointing at the same
//! absolute address, relative branches keep their absolute target (`jcc rel8` grows to
//! `jcc rel32`, or to `jncc` over an absolute jump when even rel32 does not reach), and branches
//! between displaced instructions stay inside the trampoline. Either way a jump to
//! [`Site::resume_addr`] follows. [`build_trampoline`] takes the first that applies.
//!
//! **A displaced call returns into the original code, not here.** When the last displaced
//! instruction is a call (direct or indirect), it is emitted as "push the return address it would
//! have pushed ([`Site::resume_addr`]), then jump where it would have called": `push imm32`,
//! `mov dword [rsp+4], imm32` (the high half), then `jmp` to the same target; no jump back follows.
//! The callee then returns straight into the original function, so its frame is the original
//! function's as far as any unwinder is concerned: a C++ exception the callee throws finds the
//! original function's own handlers (its LSDA covers the return address; the trampoline's could
//! not), and the trampoline can be freed while a callee entered through it still runs.
//! A call that is not the last displaced instruction (only a 2–3 byte indirect one can be) runs
//! as a call from the trampoline, as before.
//!
//! **Allocation.** `BlockEncoder` builds its result in a `Vec`, so this module uses `alloc` (the
//! copy does not allocate)
//! (iced-x86 itself always depends on `alloc`). That is planning code, run once per patch, never
//! on the trap path; the kernel adapter provides a `kmalloc`-backed global allocator. The caller
//! still supplies the output buffer, so nothing escapes as an allocation.
//!
//! What cannot be relocated is refused with a reason: a RIP-relative memory operand whose data
//! lies beyond ±2 GiB of the trampoline (no encoding reaches it), or a buffer too small.

extern crate alloc;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, ConstantOffsets, Decoder, DecoderOptions, FlowControl,
    Instruction, InstructionBlock, MemoryOperand, OpKind, Register,
};

use crate::jump::Jump;
use crate::site::{Site, MAX_DISPLACED_LEN};

mod copy;

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

/// Build the trampoline for `site` at address `at` into `out`; returns its length. The copy
/// ([`copy_trampoline`]) when it applies, else the re-encoding ([`build_trampoline_reencoded`]).
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
    match copy_trampoline(site, at, out)? {
        Some(n) => Ok(n),
        None => build_trampoline_reencoded(site, at, out),
    }
}

/// The trampoline for `site` at `at` built without an instruction encoder (no encoder tables:
/// see the `copy` module): the displaced instructions copied, RIP-relative displacements and
/// `call`/`jmp`/`jcc` targets rewritten for the new address, a last `call` as push + `jmp`,
/// then the jump back. `Ok(None)` when some instruction needs [`build_trampoline_reencoded`]
/// (an indirect call, `loop`, a branch into the displaced bytes or out of rel32 reach...).
///
/// ```
/// use lp_core::{site::validate_site, trampoline::{copy_trampoline, MAX_TRAMPOLINE_LEN}};
/// // endbr64; sub rsp,8; call 0x2000; ... — the call returns into the original at 0x100d
/// let mut code = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0, 0xc3];
/// code[9..13].copy_from_slice(&(0x2000u32 - 0x100d).to_le_bytes());
/// let site = validate_site(&code, 0x1000, 5).unwrap();
/// let mut out = [0u8; MAX_TRAMPOLINE_LEN];
/// let n = copy_trampoline(&site, 0x9000, &mut out).unwrap().unwrap();
/// assert_eq!(out[..4], [0x48, 0x83, 0xec, 0x08]); // copied
/// assert_eq!(out[4], 0x68); // push imm32 0x100d, then mov dword [rsp+4], 0
/// assert_eq!(out[5..9], 0x100du32.to_le_bytes());
/// assert_eq!(out[9..17], [0xc7, 0x44, 0x24, 0x04, 0, 0, 0, 0]);
/// assert_eq!(out[17], 0xe9); // jmp 0x2000
/// assert_eq!(i32::from_le_bytes(out[18..22].try_into().unwrap()), 0x2000 - 0x9016);
/// assert_eq!(n, 22);
/// // `loop` has no rel32 form: that one is re-encoded
/// let mut code = [0x90u8; 0x20];
/// code[..2].copy_from_slice(&[0xe2, 0x10]); // loop 0x1012
/// code[0x1f] = 0xc3;
/// let site = validate_site(&code, 0x1000, 5).unwrap();
/// assert_eq!(copy_trampoline(&site, 0x9000, &mut out), Ok(None));
/// ```
pub fn copy_trampoline(
    site: &Site,
    at: u64,
    out: &mut [u8],
) -> Result<Option<usize>, TrampolineError> {
    let d = Displaced::decode(site, at)?;
    match copy::build(site, d.instrs(), d.offsets(), at) {
        Some((bytes, n)) => place(out, &[&bytes[..n]]).map(Some),
        None => Ok(None),
    }
}

/// The displaced instructions of a site, decoded, each with the offsets of its constants.
struct Displaced {
    instrs: [Instruction; MAX_DISPLACED_LEN],
    offsets: [ConstantOffsets; MAX_DISPLACED_LEN],
    count: usize,
}

impl Displaced {
    /// Decodes `site`'s displaced bytes; refuses what no trampoline at `at` can hold.
    fn decode(site: &Site, at: u64) -> Result<Displaced, TrampolineError> {
        let mut d = Displaced {
            instrs: [Instruction::default(); MAX_DISPLACED_LEN],
            offsets: [ConstantOffsets::default(); MAX_DISPLACED_LEN],
            count: 0,
        };
        let mut decoder =
            Decoder::with_ip(64, site.displaced(), site.patch_addr, DecoderOptions::NONE);
        while decoder.can_decode() {
            let addr = decoder.ip();
            let instr = decoder.decode();
            if instr.is_invalid() || d.count == MAX_DISPLACED_LEN {
                return Err(TrampolineError::Undecodable { addr });
            }
            if instr.is_ip_rel_memory_operand() {
                let target = instr.ip_rel_memory_address();
                if !in_rip_reach(at, target) {
                    return Err(TrampolineError::OutOfReach { addr, target, at });
                }
            }
            d.offsets[d.count] = decoder.get_constant_offsets(&instr);
            d.instrs[d.count] = instr;
            d.count += 1;
        }
        Ok(d)
    }

    fn instrs(&self) -> &[Instruction] {
        &self.instrs[..self.count]
    }

    fn offsets(&self) -> &[ConstantOffsets] {
        &self.offsets[..self.count]
    }
}

/// Writes `parts` one after the other at the start of `out`; their total length.
fn place(out: &mut [u8], parts: &[&[u8]]) -> Result<usize, TrampolineError> {
    let needed = parts.iter().map(|p| p.len()).sum();
    let have = out.len();
    let mut dst = out
        .get_mut(..needed)
        .ok_or(TrampolineError::BufferTooSmall { needed, have })?;
    for p in parts {
        let (head, rest) = dst.split_at_mut(p.len());
        head.copy_from_slice(p);
        dst = rest;
    }
    Ok(needed)
}

/// The trampoline for `site` at `at`, every displaced instruction re-encoded by iced-x86's
/// `BlockEncoder` (which builds its encoder tables on first use): what [`build_trampoline`]
/// does when [`copy_trampoline`] does not apply. It handles every instruction `validate_site`
/// accepts: `loop`/`jrcxz` and far `jcc`s become a branch over an absolute jump, branches back
/// to the patch address stay in the trampoline, a last indirect call becomes push + `jmp`.
///
/// ```
/// use lp_core::{site::validate_site, trampoline::{build_trampoline_reencoded, MAX_TRAMPOLINE_LEN}};
/// // 0: dec edi; 2: jne 0 (back to the patch address); 4: xor eax,eax; 6: ret
/// let site = validate_site(&[0xff, 0xcf, 0x75, 0xfc, 0x31, 0xc0, 0xc3], 0x1000, 5).unwrap();
/// let mut out = [0u8; MAX_TRAMPOLINE_LEN];
/// let n = build_trampoline_reencoded(&site, 0x9000, &mut out).unwrap();
/// assert_eq!(out[..4], [0xff, 0xcf, 0x75, 0xfc]); // the loop stays inside the trampoline
/// assert_eq!(out[4..6], [0x31, 0xc0]);
/// assert_eq!(out[6], 0xe9); // jmp 0x1006
/// assert_eq!(n, 11);
/// ```
pub fn build_trampoline_reencoded(
    site: &Site,
    at: u64,
    out: &mut [u8],
) -> Result<usize, TrampolineError> {
    let d = Displaced::decode(site, at)?;
    let (instrs, count) = (d.instrs(), d.count);
    let encode_err = TrampolineError::Encode {
        addr: site.patch_addr,
        at,
    };
    // A last displaced call becomes push + jmp (module doc): three instructions instead of one.
    let mut block_instrs = [Instruction::default(); MAX_DISPLACED_LEN + 2];
    block_instrs[..count].copy_from_slice(instrs);
    let mut block_len = count;
    let ends_with_call = count > 0 && is_call(&instrs[count - 1]);
    if ends_with_call {
        let [push, high, jmp] =
            call_as_push_and_jump(&instrs[count - 1], site.resume_addr()).ok_or(encode_err)?;
        block_instrs[count - 1..count + 2].copy_from_slice(&[push, high, jmp]);
        block_len = count + 2;
    }
    let block = InstructionBlock::new(&block_instrs[..block_len], at);
    let encoded =
        BlockEncoder::encode(64, block, BlockEncoderOptions::NONE).map_err(|_| encode_err)?;
    let code: alloc::vec::Vec<u8> = encoded.code_buffer;
    // The jump back is appended by hand: inside the block, iced would resolve a jump to
    // `resume` against any block instruction claiming that address. After a call turned into a
    // jump, nothing comes back here.
    let back_at = at.wrapping_add(code.len() as u64);
    let back = Jump::to(back_at, site.resume_addr());
    let back: &[u8] = if ends_with_call { &[] } else { back.as_bytes() };
    place(out, &[&code, back])
}

/// Whether `instr` is a near call (direct or indirect).
fn is_call(instr: &Instruction) -> bool {
    matches!(
        instr.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    )
}

/// `call X` with return address `ret` as `push imm32` (low half, sign-extended), `mov dword
/// [rsp+4], imm32` (high half), `jmp X`. The push keeps the call's address (no displaced branch
/// may target a displaced instruction but the first: `validate_site`). A memory operand based on
/// `rsp` reads 8 bytes higher after the push. `None` for a far call or an operand that is `rsp` itself.
fn call_as_push_and_jump(call: &Instruction, ret: u64) -> Option<[Instruction; 3]> {
    let mut push = Instruction::with1(Code::Pushq_imm32, ret as u32 as i32).ok()?;
    push.set_ip(call.ip());
    let high = Instruction::with2(
        Code::Mov_rm32_imm32,
        MemoryOperand::with_base_displ(Register::RSP, 4),
        (ret >> 32) as u32,
    )
    .ok()?;
    let mut jmp = *call;
    match call.code() {
        Code::Call_rel32_64 => {
            jmp = Instruction::with_branch(Code::Jmp_rel32_64, call.near_branch_target()).ok()?;
        }
        Code::Call_rm64 => {
            jmp.set_code(Code::Jmp_rm64);
            match call.op0_kind() {
                OpKind::Register if call.op0_register() == Register::RSP => return None,
                OpKind::Memory if call.memory_base() == Register::RSP => {
                    jmp.set_memory_displacement64(call.memory_displacement64().wrapping_add(8));
                    if call.memory_displ_size() == 0 {
                        jmp.set_memory_displ_size(1); // `[rsp]` had no displacement byte
                    }
                }
                _ => {}
            }
        }
        _ => return None,
    }
    // Distinct addresses inside the call's bytes, which no branch targets, so the block encoder
    // never resolves a branch to them.
    let mut high = high;
    high.set_ip(call.ip().wrapping_add(1));
    jmp.set_ip(call.ip().wrapping_add(2));
    Some([push, high, jmp])
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

    /// The value a trampoline's last `push imm32; mov dword [rsp+4], imm32` leaves on the stack,
    /// and the last jump's target.
    fn pushed_return_and_jump(instrs: &[Instruction]) -> (u64, Instruction) {
        let [push, high, jmp] = instrs[instrs.len() - 3..] else {
            unreachable!()
        };
        assert_eq!(push.code(), Code::Pushq_imm32);
        assert_eq!(high.code(), Code::Mov_rm32_imm32);
        assert_eq!(
            (high.memory_base(), high.memory_displacement64()),
            (Register::RSP, 4)
        );
        assert_eq!(jmp.mnemonic(), Mnemonic::Jmp);
        let low = push.immediate32() as u64;
        (low | (high.immediate32() as u64) << 32, jmp)
    }

    #[test]
    fn a_last_displaced_call_returns_into_the_original_code() {
        // 0: sub rsp,8 ; 4: call 0x2000 ; 9: add rsp,8 ; 13: ret — the call ends the displaced bytes
        let mut code = [
            0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0, 0x48, 0x83, 0xc4, 0x08, 0xc3,
        ];
        code[5..9].copy_from_slice(&(0x2000u32 - 0x1009).to_le_bytes());
        let site = validate_site(&code, 0x1000, 5).unwrap();
        assert_eq!(site.resume_addr(), 0x1009);
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        let at = 0x9000;
        let n = build_trampoline(&site, at, &mut out).unwrap();
        let instrs = decode_all(&out[..n], at);
        assert_eq!(instrs.len(), 4, "sub, push, mov, jmp — no jump back");
        assert_eq!(instrs[0].code(), Code::Sub_rm64_imm8);
        let (ret, jmp) = pushed_return_and_jump(&instrs);
        assert_eq!(ret, 0x1009);
        assert_eq!(jmp.near_branch_target(), 0x2000);
    }

    #[test]
    fn a_call_far_from_the_trampoline_jumps_through_memory_and_pushes_a_high_address() {
        // call rel32 as the whole site, in a library mapped high
        let entry = 0x7f00_1234_5000u64;
        let mut code = [0xe8, 0, 0, 0, 0, 0xc3];
        code[1..5].copy_from_slice(&0x100i32.to_le_bytes());
        let site = validate_site(&code, entry, 5).unwrap();
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        let n = build_trampoline(&site, 0x1000_0000, &mut out).unwrap();
        let instrs = decode_all(&out[..n], 0x1000_0000);
        // (the literal after the indirect jump decodes as more instructions: find the push)
        let push_at = instrs
            .iter()
            .position(|i| i.code() == Code::Pushq_imm32)
            .unwrap();
        let (ret, jmp) = pushed_return_and_jump(&instrs[..push_at + 3]);
        assert_eq!(ret, entry + 5);
        // out of rel32 reach: the encoder jumps through a literal holding the target
        assert!(jmp.is_ip_rel_memory_operand());
        let lit = (jmp.ip_rel_memory_address() - 0x1000_0000) as usize;
        assert_eq!(
            u64::from_le_bytes(out[lit..lit + 8].try_into().unwrap()),
            entry + 5 + 0x100
        );
    }

    #[test]
    fn an_indirect_call_through_the_stack_reads_the_same_slot_after_the_push() {
        // nop*3 ; call [rsp+0x10] ; ret — and nop*2 ; call [rsp] ; ret (no displacement byte)
        let with_disp: &[u8] = &[0x90, 0x90, 0x90, 0xff, 0x54, 0x24, 0x10, 0xc3];
        let without: &[u8] = &[0x90, 0x90, 0xff, 0x14, 0x24, 0xc3];
        let disp8_overflows: &[u8] = &[0x90, 0x90, 0x90, 0xff, 0x54, 0x24, 0x7c, 0xc3];
        for (code, ret_at, slot) in [
            (with_disp, 0x1007, 0x18),
            (without, 0x1005, 0x8),
            (disp8_overflows, 0x1007, 0x84),
        ] {
            let site = validate_site(code, 0x1000, 5).unwrap();
            let mut out = [0u8; MAX_TRAMPOLINE_LEN];
            let n = build_trampoline(&site, 0x9000, &mut out).unwrap();
            let (ret, jmp) = pushed_return_and_jump(&decode_all(&out[..n], 0x9000));
            assert_eq!(ret, ret_at);
            assert_eq!(jmp.code(), Code::Jmp_rm64);
            assert_eq!(
                (jmp.memory_base(), jmp.memory_displacement64()),
                (Register::RSP, slot)
            );
        }
    }

    #[test]
    fn a_call_that_is_not_last_still_runs_from_the_trampoline() {
        // 0: call rax ; 2: nop*3 ; 5: ret — the call returns into the trampoline, which jumps back
        let code = [0xff, 0xd0, 0x90, 0x90, 0x90, 0xc3];
        let site = validate_site(&code, 0x1000, 5).unwrap();
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        let n = build_trampoline(&site, 0x9000, &mut out).unwrap();
        let instrs = decode_all(&out[..n], 0x9000);
        assert_eq!(instrs[0].code(), Code::Call_rm64);
        assert_eq!(instrs.last().unwrap().near_branch_target(), 0x1005);
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

    /// Semantics of each decoded instruction of a trampoline's body: (mnemonic, absolute
    /// branch target or RIP-relative address, or the instruction itself).
    fn meaning(i: &Instruction) -> (Mnemonic, u64, Option<Instruction>) {
        if i.is_ip_rel_memory_operand() {
            (i.mnemonic(), i.ip_rel_memory_address(), None)
        } else if matches!(i.op0_kind(), OpKind::NearBranch64) {
            (i.mnemonic(), i.near_branch_target(), None)
        } else {
            (i.mnemonic(), 0, Some(*i))
        }
    }

    #[test]
    fn the_copy_means_what_the_re_encoding_means() {
        let mut call = [0x55u8, 0x48, 0x89, 0xe5, 0xe8, 0, 0, 0, 0, 0xc3];
        call[5..9].copy_from_slice(&0x300i32.to_le_bytes());
        let cases: &[&[u8]] = &[
            // endbr64; push rbp; mov rbp,rsp; ...
            &[
                0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3,
            ],
            // lea rax,[rip+0x2000]; mov ecx,[rip-0x10]; ret
            &[
                0x48, 0x8d, 0x05, 0, 0x20, 0, 0, 0x8b, 0x0d, 0xf0, 0xff, 0xff, 0xff, 0xc3,
            ],
            // cmp dword [rip+0x100],5 (displacement before an immediate); jne +0x20; ret
            &[0x83, 0x3d, 0, 1, 0, 0, 5, 0x75, 0x20, 0xc3],
            // push rbp; mov rbp,rsp; call +0x300 (last); ret
            &call,
            // jmp +0x40 (a tail call); nop*3; ret
            &[0xeb, 0x40, 0x90, 0x90, 0x90, 0xc3],
        ];
        for code in cases {
            let mut full = [0xccu8; 0x80];
            full[..code.len()].copy_from_slice(code);
            let site = validate_site(&full, 0x40_1000, 5).unwrap();
            for at in [0x40_9000u64, 0x5000_0000] {
                let mut copy = [0u8; MAX_TRAMPOLINE_LEN];
                let n = copy_trampoline(&site, at, &mut copy)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{code:x?} is not copied"));
                let mut re = [0u8; MAX_TRAMPOLINE_LEN];
                let m = build_trampoline_reencoded(&site, at, &mut re).unwrap();
                let a: alloc::vec::Vec<_> =
                    decode_all(&copy[..n], at).iter().map(meaning).collect();
                let b: alloc::vec::Vec<_> = decode_all(&re[..m], at).iter().map(meaning).collect();
                assert_eq!(a, b, "{code:x?} at {at:#x}");
                let mut built = [0u8; MAX_TRAMPOLINE_LEN];
                assert_eq!(build_trampoline(&site, at, &mut built), Ok(n));
                assert_eq!(built[..n], copy[..n]);
            }
        }
    }

    #[test]
    fn position_independent_instructions_are_copied_byte_for_byte() {
        // endbr64 (kept in place); push r15; push r14; mov r14,rdi; sub rsp,0x18; ret
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x41, 0x57, 0x41, 0x56, 0x49, 0x89, 0xfe, 0x48, 0x83, 0xec,
            0x18, 0xc3,
        ];
        let site = validate_site(&code, 0x1000, 5).unwrap();
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        let n = copy_trampoline(&site, 0x9000, &mut out).unwrap().unwrap();
        let d = site.displaced_len;
        assert_eq!(out[..d], *site.displaced());
        assert_eq!(
            out[d..n],
            *Jump::to(0x9000 + d as u64, site.resume_addr()).as_bytes()
        );
        // far away: the jump back is the absolute form
        let n = copy_trampoline(&site, 0x7f00_0000_0000, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(out[d..n], *Jump::absolute(site.resume_addr()).as_bytes());
    }

    #[test]
    fn what_the_copy_cannot_express_is_left_to_the_re_encoding() {
        let mut out = [0u8; MAX_TRAMPOLINE_LEN];
        let mut far_jcc = [0x90u8; 0x20];
        far_jcc[..5].copy_from_slice(&[0x85, 0xff, 0x74, 0x10, 0x90]);
        far_jcc[0x1f] = 0xc3;
        let cases: [(&[u8], u64); 4] = [
            // dec edi; jne 0 (a branch to the patch address)
            (&[0xff, 0xcf, 0x75, 0xfc, 0x31, 0xc0, 0xc3], 0x9000),
            // call rax (indirect); nop*3; ret
            (&[0xff, 0xd0, 0x90, 0x90, 0x90, 0xc3], 0x9000),
            // nop*2; call [rsp] (indirect, last); ret
            (&[0x90, 0x90, 0xff, 0x14, 0x24, 0xc3], 0x9000),
            // test edi,edi; je +0x10 with the trampoline beyond rel32 reach
            (&far_jcc, 0x7f00_0000_0000),
        ];
        for (code, at) in cases {
            let site = validate_site(code, 0x1000, 5).unwrap();
            assert_eq!(copy_trampoline(&site, at, &mut out), Ok(None), "{code:x?}");
            assert!(build_trampoline(&site, at, &mut out).is_ok());
        }
    }
}

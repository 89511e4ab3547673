//! The common trampoline, built without iced-x86's encoder: the displaced instructions copied
//! byte for byte, then the jump back encoded by hand.
//!
//! Why: iced builds its encoder tables on the first encode (about 0.6–1.5 ms of CPU and ~190
//! page faults in a fresh process: a fifth of a command-line apply), and the instructions a
//! function entry starts with are nearly always position-independent (`push`, `mov`, `sub`,
//! `endbr64`...), which need no re-encoding at all.
//!
//! Handled here, each in a way that keeps what the instruction does at its new address:
//! - an instruction that neither branches nor refers to memory relative to RIP: copied;
//! - a RIP-relative memory operand: copied, its 32-bit displacement rewritten so that it still
//!   reaches the same absolute address (the decoder says where the displacement is);
//! - `jcc rel8/rel32` and `jmp rel8/rel32`: `jcc rel32` / `jmp rel32` to the same target;
//! - `call rel32`: copied with its displacement rewritten, or, when it is the last displaced
//!   instruction, `push imm32; mov dword [rsp+4], imm32; jmp target` (the module doc of
//!   [`super`]: the callee returns into the original code).
//!
//! Anything else — a branch to the displaced bytes themselves, a target out of rel32 reach of
//! the trampoline, indirect calls and jumps, `loop`/`jrcxz`, returns — is left to the
//! `BlockEncoder` path ([`super::build_trampoline_reencoded`]): `None`.

use iced_x86::{Code, ConditionCode, ConstantOffsets, FlowControl, Instruction, OpKind};

use super::MAX_TRAMPOLINE_LEN;
use crate::jump::Jump;
use crate::site::Site;

/// `out` filled up to `len`; every write checks the room left.
struct Out {
    buf: [u8; MAX_TRAMPOLINE_LEN],
    len: usize,
}

impl Out {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        self.buf
            .get_mut(self.len..self.len + bytes.len())?
            .copy_from_slice(bytes);
        self.len += bytes.len();
        Some(())
    }
}

/// `target - next` as a rel32 field, if it fits.
fn rel32(next: u64, target: u64) -> Option<[u8; 4]> {
    i32::try_from(target.wrapping_sub(next) as i64)
        .ok()
        .map(i32::to_le_bytes)
}

/// Builds the trampoline of `site` (its displaced instructions `instrs`, each with the
/// constant offsets its decoder reported, all RIP-relative operands already checked to be in
/// reach of `at`) at `at`; its bytes and length, or `None` when it needs re-encoding.
pub(super) fn build(
    site: &Site,
    instrs: &[Instruction],
    offsets: &[ConstantOffsets],
    at: u64,
) -> Option<([u8; MAX_TRAMPOLINE_LEN], usize)> {
    let displaced = site.displaced();
    let start = site.patch_addr;
    let end = start.wrapping_add(site.displaced_len as u64);
    let inside = |target: u64| target >= start && target < end;
    let mut out = Out {
        buf: [0; MAX_TRAMPOLINE_LEN],
        len: 0,
    };
    let mut ends_with_call = false;
    for (i, (instr, offs)) in instrs.iter().zip(offsets).enumerate() {
        let here = at.wrapping_add(out.len as u64);
        let from = usize::try_from(instr.ip().wrapping_sub(start)).ok()?;
        let bytes = displaced.get(from..from + instr.len())?;
        let last = i + 1 == instrs.len();
        match instr.flow_control() {
            FlowControl::Next if instr.is_ip_rel_memory_operand() => {
                // The displacement field is relative to the end of the instruction.
                let at_disp = offs.displacement_offset();
                if !offs.has_displacement() || offs.displacement_size() != 4 {
                    return None;
                }
                let next = here.wrapping_add(bytes.len() as u64);
                let disp = rel32(next, instr.ip_rel_memory_address())?;
                let copied_at = out.len;
                out.put(bytes)?;
                out.buf
                    .get_mut(copied_at + at_disp..copied_at + at_disp + 4)?
                    .copy_from_slice(&disp);
            }
            FlowControl::Next => out.put(bytes)?,
            FlowControl::ConditionalBranch
                if instr.is_jcc_short_or_near() && instr.op0_kind() == OpKind::NearBranch64 =>
            {
                let target = instr.near_branch_target();
                let cc = condition_nibble(instr.condition_code())?;
                if inside(target) {
                    return None;
                }
                out.put(&[0x0f, 0x80 | cc])?;
                out.put(&rel32(here.wrapping_add(6), target)?)?;
            }
            FlowControl::UnconditionalBranch
                if matches!(instr.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64) =>
            {
                let target = instr.near_branch_target();
                if inside(target) {
                    return None;
                }
                out.put(&[0xe9])?;
                out.put(&rel32(here.wrapping_add(5), target)?)?;
            }
            FlowControl::Call if instr.code() == Code::Call_rel32_64 => {
                let target = instr.near_branch_target();
                if last {
                    let ret = site.resume_addr();
                    out.put(&[0x68])?; // push imm32 (sign-extended: the low half)
                    out.put(&(ret as u32).to_le_bytes())?;
                    out.put(&[0xc7, 0x44, 0x24, 0x04])?; // mov dword [rsp+4], imm32
                    out.put(&((ret >> 32) as u32).to_le_bytes())?;
                    let jmp_at = at.wrapping_add(out.len as u64);
                    out.put(Jump::to(jmp_at, target).as_bytes())?;
                    ends_with_call = true;
                } else {
                    out.put(&[0xe8])?;
                    out.put(&rel32(here.wrapping_add(5), target)?)?;
                }
            }
            _ => return None,
        }
    }
    if !ends_with_call {
        let back_at = at.wrapping_add(out.len as u64);
        out.put(Jump::to(back_at, site.resume_addr()).as_bytes())?;
    }
    Some((out.buf, out.len))
}

/// The low nibble of `jcc`'s opcode for condition `cc` (`0F 80+cc rel32`).
fn condition_nibble(cc: ConditionCode) -> Option<u8> {
    match cc {
        ConditionCode::None => None,
        cc => Some(cc as u8 - 1),
    }
}

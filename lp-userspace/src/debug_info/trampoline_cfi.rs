//! Call frame information for trampolines: the original function's first instructions,
//! relocated into the patch memory and followed by a jump back into the original. A thread
//! runs one when it must execute the original (nonstop mode sends a thread that trapped
//! before the switch there, and a revert too); if a displaced instruction is a `call`, the
//! callee's frames return into the trampoline, so an exception thrown there, a profiler or our
//! stack check must unwind through it.
//!
//! The trampoline does exactly what the displaced instructions did, so its CFI is the original
//! function's, row by row: the rows of the original's FDE at each displaced instruction are
//! re-emitted at that instruction's offset in the trampoline (found by decoding the trampoline
//! and matching its instructions with the displaced ones; when lp-core had to re-encode them,
//! by encoding them again with iced-x86's `BlockEncoder` as it does and checking that the bytes
//! are the trampoline's), and the jump back gets the row of the first instruction after the
//! displaced ones.
//!
//! A last displaced `call` may instead be relocated as "push the address after the call in the
//! original, then jump to the callee" (lp-core's trampoline, so that the callee returns into the
//! original code, where the function's own FDE and LSDA apply): the push gets the original's
//! row at the call, and once the return address is on the stack the row is a function entry's
//! (CFA = rsp + 8, return address at CFA − 8: the generated CIE's initial rules), since the
//! frame the unwinder finds next is the original function's at that return address. While the
//! address is only half written (`push imm32` then `mov dword [rsp+4], imm32`) the return
//! address is marked undefined: an unwind from there stops instead of following a wrong one.

use crate::elf::Module;
use crate::thunk_cfi::{advance, sleb_to, uleb_to, FrameCfi};
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection, UnwindTableRow,
};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock, OpKind, Register,
};
use lp_core::site::Site;

type Row = UnwindTableRow<usize>;

/// The CFI rows of a module's code, looked up by runtime address.
pub struct ModuleCfi<'a> {
    eh: EhFrame<gimli::EndianSlice<'a, LittleEndian>>,
    hdr: Option<&'a [u8]>,
    bases: BaseAddresses,
}

impl<'a> ModuleCfi<'a> {
    /// The `.eh_frame` of `module` loaded with `bias`; `None` when it has none.
    pub fn new(module: &'a Module, bias: u64) -> Option<ModuleCfi<'a>> {
        let eh = module.eh_frame()?;
        let mut bases = BaseAddresses::default().set_eh_frame(eh.vaddr.wrapping_add(bias));
        if let Some(t) = module.text() {
            bases = bases.set_text(t.vaddr.wrapping_add(bias));
        }
        let hdr = module.eh_frame_hdr().map(|h| {
            bases = bases.clone().set_eh_frame_hdr(h.vaddr.wrapping_add(bias));
            module.section_data(h)
        });
        Some(ModuleCfi {
            eh: EhFrame::new(module.section_data(eh), LittleEndian),
            hdr,
            bases,
        })
    }

    /// The rows in force at each of `addrs` (all in one function).
    fn rows(&self, addrs: &[u64]) -> Result<Vec<Row>, String> {
        let first = *addrs.first().ok_or("no address")?;
        let by_hdr = self.hdr.and_then(|h| {
            EhFrameHdr::new(h, LittleEndian)
                .parse(&self.bases, 8)
                .ok()?
                .table()?
                .fde_for_address(&self.eh, &self.bases, first, EhFrame::cie_from_offset)
                .ok()
        });
        let fde = match by_hdr {
            Some(f) => f,
            None => self
                .eh
                .fde_for_address(&self.bases, first, EhFrame::cie_from_offset)
                .map_err(|_| format!("no CFI for {first:#x} in its module"))?,
        };
        let mut ctx = Box::new(UnwindContext::new());
        addrs
            .iter()
            .map(|&a| {
                fde.unwind_info_for_address(&self.eh, &self.bases, &mut ctx, a)
                    .cloned()
                    .map_err(|e| format!("CFI of {a:#x}: {e}"))
            })
            .collect()
    }
}

/// The CFI of the trampoline `code` placed at `at` for `site`, from the original function's
/// rows in `cfi`.
pub fn trampoline_frame(
    cfi: &ModuleCfi<'_>,
    site: &Site,
    at: u64,
    code: &[u8],
) -> Result<FrameCfi, String> {
    let instrs: Vec<Instruction> =
        Decoder::with_ip(64, site.displaced(), site.patch_addr, DecoderOptions::NONE)
            .into_iter()
            .collect();
    if instrs.iter().any(|i| i.is_invalid()) {
        return Err("displaced bytes do not decode".into());
    }
    // Every displaced instruction relocated, then the jump back; or a last call as push + jmp
    // (lp-core relocates a last call only that way).
    let ends_with_call = instrs.last().is_some_and(|i| {
        matches!(
            i.flow_control(),
            FlowControl::Call | FlowControl::IndirectCall
        )
    });
    let points = if ends_with_call {
        call_as_push_and_jump(&instrs, site.resume_addr(), at, code)?
    } else {
        let (mut points, end) = relocated(&instrs, at, code)?
            .ok_or("the trampoline's bytes are not the displaced instructions")?;
        if jump_target(at, code, end) != Some(site.resume_addr()) {
            return Err("the trampoline does not jump back after the displaced code".into());
        }
        points.push((end, Point::Original(site.resume_addr())));
        points
    };
    let addrs: Vec<u64> = points
        .iter()
        .filter_map(|p| match p.1 {
            Point::Original(a) => Some(a),
            _ => None,
        })
        .collect();
    let mut rows = cfi.rows(&addrs)?.into_iter();
    let mut program = Vec::new();
    let mut last_off = 0;
    let mut prev: Option<Row> = None;
    let mut prev_point = None;
    for (off, point) in points {
        let row = match point {
            Point::Original(_) => Some(rows.next().ok_or("a row is missing")?),
            _ => None,
        };
        // The same rules as the row emitted last (an original row after an original row, or
        // the same kind of synthetic row): nothing to emit.
        let unchanged = match (&row, &prev, prev_point) {
            (Some(r), Some(p), Some(Point::Original(_))) => same_rules(p, r),
            (None, _, Some(last)) => last == point,
            _ => false,
        };
        if unchanged {
            continue;
        }
        advance(&mut program, off - last_off);
        match &row {
            Some(r) => emit_row(&mut program, prev.as_ref(), r)?,
            None => emit_function_entry(
                &mut program,
                prev.as_ref(),
                point == Point::ReturnAddressPending,
            ),
        }
        last_off = off;
        prev = row.or(prev);
        prev_point = Some(point);
    }
    Ok(FrameCfi {
        start: at,
        len: code.len() as u64,
        program,
    })
}

/// Where the jump at offset `off` of `code` (placed at `at`) goes: `jmp rel32`, or
/// `jmp [rip+disp]` through a literal inside `code` (lp-core's absolute form and iced's
/// out-of-reach form).
fn jump_target(at: u64, code: &[u8], off: u64) -> Option<u64> {
    let bytes = code.get(usize::try_from(off).ok()?..)?;
    let jmp = Decoder::with_ip(64, bytes, at + off, DecoderOptions::NONE).decode();
    match jmp.code() {
        Code::Jmp_rel32_64 | Code::Jmp_rel8_64 => Some(jmp.near_branch_target()),
        Code::Jmp_rm64 if jmp.is_ip_rel_memory_operand() => {
            let lit = usize::try_from(jmp.ip_rel_memory_address().checked_sub(at)?).ok()?;
            Some(u64::from_le_bytes(code.get(lit..lit + 8)?.try_into().ok()?))
        }
        _ => None,
    }
}

/// What unwinds a thread stopped at one offset of a trampoline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// The original function's row at this address.
    Original(u64),
    /// A return address is being pushed (its high half not written yet): unwinding stops.
    ReturnAddressPending,
    /// A return address is on the stack, as at a function's entry.
    FunctionEntry,
}

/// (trampoline offset, what unwinds there) for each instruction of a trampoline.
type Points = Vec<(u64, Point)>;

/// (trampoline offset, original address) of each of `instrs` relocated to `at`, and the offset
/// where they end, when `code` starts with them; `None` when it does not.
///
/// Found by decoding `code` (lp-core copies the displaced instructions when it can: no
/// encoder, whose tables cost a fresh process ~1 ms of CPU), else by re-encoding `instrs` as
/// lp-core's `BlockEncoder` path does (which may have grown one instruction into several).
fn relocated(
    instrs: &[Instruction],
    at: u64,
    code: &[u8],
) -> Result<Option<(Points, u64)>, String> {
    if instrs.is_empty() {
        return Ok(Some((Vec::new(), 0)));
    }
    if let Some(found) = decoded_one_for_one(instrs, at, code) {
        return Ok(Some(found));
    }
    let encoded = BlockEncoder::encode(
        64,
        InstructionBlock::new(instrs, at),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(|e| format!("cannot re-encode the displaced instructions: {e}"))?;
    if !code.starts_with(&encoded.code_buffer) {
        return Ok(None);
    }
    let points: Points = instrs
        .iter()
        .zip(&encoded.new_instruction_offsets)
        .map(|(i, &off)| (u64::from(off), Point::Original(i.ip())))
        .collect();
    if points.iter().any(|p| p.0 == u64::from(u32::MAX)) {
        return Err("an instruction has no offset in the trampoline".into());
    }
    Ok(Some((points, encoded.code_buffer.len() as u64)))
}

/// [`relocated`]'s points when `code` decodes to `instrs` one for one: each the same
/// instruction, or the same branch to the same absolute target (`jcc rel8` may have become
/// `jcc rel32`), or the same RIP-relative operand reaching the same address.
fn decoded_one_for_one(instrs: &[Instruction], at: u64, code: &[u8]) -> Option<(Points, u64)> {
    let mut dec = Decoder::with_ip(64, code, at, DecoderOptions::NONE);
    let mut points = Vec::with_capacity(instrs.len());
    for old in instrs {
        if !dec.can_decode() {
            return None;
        }
        let off = dec.ip().wrapping_sub(at);
        let new = dec.decode();
        let same = if old.op0_kind() == OpKind::NearBranch64 {
            new.op0_kind() == OpKind::NearBranch64
                && new.mnemonic() == old.mnemonic()
                && new.near_branch_target() == old.near_branch_target()
        } else {
            // (iced compares a RIP-relative operand by its absolute address)
            !new.is_invalid() && new == *old
        };
        if !same {
            return None;
        }
        points.push((off, Point::Original(old.ip())));
    }
    Some((points, dec.ip().wrapping_sub(at)))
}

/// The points of a trampoline whose last displaced instruction, a call, was relocated as a push
/// of `ret` (the address after it in the original) and a jump to the callee — `push imm32` +
/// `mov dword [rsp+4], imm32`, or `push qword [rip+slot]` with the slot in `code` — then the
/// jump, checked against the call.
fn call_as_push_and_jump(
    instrs: &[Instruction],
    ret: u64,
    at: u64,
    code: &[u8],
) -> Result<Points, String> {
    let not_ours = || "the trampoline's bytes are not the displaced instructions".to_string();
    let (call, before) = instrs.split_last().ok_or_else(not_ours)?;
    if !matches!(
        call.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    ) {
        return Err(not_ours());
    }
    let (mut points, tail_off) = relocated(before, at, code)?.ok_or_else(not_ours)?;
    points.push((tail_off, Point::Original(call.ip())));
    let tail = code.get(tail_off as usize..).ok_or_else(not_ours)?;
    let mut dec = Decoder::with_ip(64, tail, at + tail_off, DecoderOptions::NONE);
    let literal = |addr: u64| -> Option<u64> {
        let off = usize::try_from(addr.checked_sub(at)?).ok()?;
        Some(u64::from_le_bytes(code.get(off..off + 8)?.try_into().ok()?))
    };
    let push = dec.decode();
    let (pushed, jmp) = match push.code() {
        Code::Pushq_imm32 => {
            let high = dec.decode();
            let high_ok = high.code() == Code::Mov_rm32_imm32
                && high.memory_base() == Register::RSP
                && high.memory_index() == Register::None
                && high.memory_displacement64() == 4;
            if !high_ok {
                return Err(not_ours());
            }
            points.push((high.ip() - at, Point::ReturnAddressPending));
            let low = u64::from(push.immediate32());
            (low | u64::from(high.immediate32()) << 32, dec.decode())
        }
        Code::Push_rm64 if push.is_ip_rel_memory_operand() => (
            literal(push.ip_rel_memory_address()).ok_or_else(not_ours)?,
            dec.decode(),
        ),
        _ => return Err(not_ours()),
    };
    if pushed != ret {
        return Err(format!(
            "the trampoline pushes {pushed:#x}, not the return address {ret:#x}"
        ));
    }
    let target_ok = match (call.code(), jmp.code()) {
        (Code::Call_rel32_64, _) => {
            jump_target(at, code, jmp.ip() - at) == Some(call.near_branch_target())
        }
        // An indirect call's operand, relocated: lp-core's; its own tests check it.
        (Code::Call_rm64, Code::Jmp_rm64) => {
            jmp.op0_kind() == call.op0_kind()
                && (call.op0_kind() != OpKind::Register
                    || jmp.op0_register() == call.op0_register())
        }
        _ => false,
    };
    if !target_ok {
        return Err("the trampoline does not jump where the displaced call went".into());
    }
    points.push((jmp.ip() - at, Point::FunctionEntry));
    Ok(points)
}

/// A function entry's rules (the generated CIE's initial ones: CFA = rsp + 8, return address at
/// CFA − 8), every rule of `prev` restored to them; with `ra_pending`, the return address
/// undefined instead (it is only half written).
fn emit_function_entry(out: &mut Vec<u8>, prev: Option<&Row>, ra_pending: bool) {
    out.push(0x0c); // DW_CFA_def_cfa rsp, 8
    uleb_to(out, 7);
    uleb_to(out, 8);
    if let Some(p) = prev {
        for (reg, _) in p.registers() {
            out.push(0x06); // DW_CFA_restore_extended
            uleb_to(out, u64::from(reg.0));
        }
    }
    out.push(0x06); // the return address too (a previous pending row left it undefined)
    uleb_to(out, 16);
    if ra_pending {
        out.push(0x07); // DW_CFA_undefined
        uleb_to(out, 16);
    }
}

fn same_rules(a: &Row, b: &Row) -> bool {
    a.cfa() == b.cfa() && a.registers().eq(b.registers())
}

/// Emits the whole state of `row` (CFA and every register rule); rules `prev` had that `row`
/// lacks go back to the CIE's (unspecified).
fn emit_row(out: &mut Vec<u8>, prev: Option<&Row>, row: &Row) -> Result<(), String> {
    match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *offset >= 0 => {
            out.push(0x0c); // DW_CFA_def_cfa
            uleb_to(out, u64::from(register.0));
            uleb_to(out, *offset as u64);
        }
        other => return Err(format!("CFA rule {other:?} not reproducible")),
    }
    for (reg, rule) in row.registers() {
        let r = u64::from(reg.0);
        let factored = |n: i64| -> Result<i64, String> {
            if n % 8 == 0 {
                Ok(n / -8)
            } else {
                Err(format!("register {r} saved at an unaligned offset {n}"))
            }
        };
        match rule {
            RegisterRule::Undefined => {
                out.push(0x07);
                uleb_to(out, r);
            }
            RegisterRule::SameValue => {
                out.push(0x08);
                uleb_to(out, r);
            }
            RegisterRule::Offset(n) => {
                out.push(0x11); // DW_CFA_offset_extended_sf
                uleb_to(out, r);
                sleb_to(out, factored(*n)?);
            }
            RegisterRule::ValOffset(n) => {
                out.push(0x15); // DW_CFA_val_offset_sf
                uleb_to(out, r);
                sleb_to(out, factored(*n)?);
            }
            RegisterRule::Register(other) => {
                out.push(0x09);
                uleb_to(out, r);
                uleb_to(out, u64::from(other.0));
            }
            other => return Err(format!("register rule {other:?} not reproducible")),
        }
    }
    if let Some(p) = prev {
        for (reg, _) in p.registers() {
            if !row.registers().any(|(r, _)| r == reg) {
                out.push(0x06); // DW_CFA_restore_extended
                uleb_to(out, u64::from(reg.0));
            }
        }
    }
    Ok(())
}

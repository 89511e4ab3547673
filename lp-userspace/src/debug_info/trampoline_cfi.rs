//! Call frame information for trampolines: the original function's first instructions,
//! relocated into the patch memory and followed by a jump back into the original. A thread
//! runs one when it must execute the original (nonstop mode sends a thread that trapped
//! before the switch there, and a revert too); if a displaced instruction is a `call`, the
//! callee's frames return into the trampoline, so an exception thrown there, a profiler or our
//! stack check must unwind through it.
//!
//! The trampoline does exactly what the displaced instructions did, so its CFI is the original
//! function's, row by row: the rows of the original's FDE at each displaced instruction are
//! re-emitted at that instruction's offset in the trampoline (found by encoding the displaced
//! instructions again with iced-x86's `BlockEncoder`, like lp-core does, and checking that the
//! bytes are the trampoline's), and the jump back gets the row of the first instruction after
//! the displaced ones.

use crate::elf::Module;
use crate::thunk_cfi::{advance, sleb_to, uleb_to, FrameCfi};
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection, UnwindTableRow,
};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, Instruction, InstructionBlock,
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
    let encoded = BlockEncoder::encode(
        64,
        InstructionBlock::new(&instrs, at),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(|e| format!("cannot re-encode the displaced instructions: {e}"))?;
    if !code.starts_with(&encoded.code_buffer) {
        return Err("the trampoline's bytes are not the displaced instructions".into());
    }
    // (trampoline offset, original address) of each displaced instruction, then the jump back.
    let mut points: Vec<(u64, u64)> = instrs
        .iter()
        .zip(&encoded.new_instruction_offsets)
        .map(|(i, &off)| (u64::from(off), i.ip()))
        .collect();
    if points.iter().any(|p| p.0 == u64::from(u32::MAX)) {
        return Err("an instruction has no offset in the trampoline".into());
    }
    points.push((encoded.code_buffer.len() as u64, site.resume_addr()));
    let addrs: Vec<u64> = points.iter().map(|p| p.1).collect();
    let rows = cfi.rows(&addrs)?;
    let mut program = Vec::new();
    let mut last_off = 0;
    let mut prev: Option<&Row> = None;
    for (&(off, _), row) in points.iter().zip(&rows) {
        if prev.is_some_and(|p| same_rules(p, row)) {
            continue;
        }
        advance(&mut program, off - last_off);
        emit_row(&mut program, prev, row)?;
        last_off = off;
        prev = Some(row);
    }
    Ok(FrameCfi {
        start: at,
        len: code.len() as u64,
        program,
    })
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

//! The callers of the replaced functions, found at pack time: every direct `call rel32`,
//! tail-call `jmp rel32` and conditional tail call `jcc rel32` in the target file's code whose
//! destination is the entry of a replaced function. `apply` retargets them at the new code, so
//! that a direct call no longer pays the redirect's jump from the old entry into the patch
//! memory (another page: about a cycle per call, see benches/benches/call_overhead.rs).
//!
//! Each function of the target is decoded from its own start (its symbol), never by a linear
//! sweep across the gaps between functions (padding, data), so every instruction seen is one
//! the CPU executes. A function with an instruction that does not decode is skipped whole. Code
//! without a symbol (a stripped file without its debug file) is not searched: its callers keep
//! going through the redirect, which is correct, one jump slower.
//!
//! Left out as well:
//! - sites inside a replaced function (its code no longer runs once the patch is in);
//! - sites inside the first instructions of any function, the bytes a redirect of that function
//!   would displace (`lp_core::site::validate_site`): a later patch of that function must find
//!   its original entry bytes there, and its trampoline copies them.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Decoder, DecoderOptions};
use lp_core::jump::REL32_JUMP_LEN;
use lp_core::site::validate_site;

use crate::elf::{Module, SymbolKind};
use crate::patchfile::CallSitePatch;

/// The call sites of each function starting at `entries[i]` (file vaddrs), in address order.
/// `replaced` holds the replaced functions' `[start, end)`: no site is taken from there.
pub(crate) fn find(
    module: &Module,
    entries: &[u64],
    replaced: &[(u64, u64)],
) -> Vec<Vec<CallSitePatch>> {
    let index: BTreeMap<u64, usize> = entries.iter().enumerate().map(|(i, &e)| (e, i)).collect();
    let mut out: Vec<BTreeMap<u64, CallSitePatch>> = vec![BTreeMap::new(); entries.len()];
    let exec = |vaddr: u64, size: u64| {
        module
            .segments()
            .iter()
            .any(|s| s.exec && vaddr >= s.vaddr && vaddr.saturating_add(size) <= s.vaddr + s.filesz)
    };
    // The bytes a redirect of any function would displace are not ours to touch: every
    // function's, not only the one a site is decoded from (symbols may nest in hand-written
    // code).
    let mut seen = BTreeSet::new();
    let mut entry_spans: Vec<(u64, u64)> = module
        .symbols()
        .iter()
        .filter(|f| f.kind == SymbolKind::Function && f.size > 0 && exec(f.value, f.size))
        .filter(|f| seen.insert((f.value, f.size)))
        .filter_map(|f| {
            let s =
                validate_site(module.bytes_at(f.value, f.size)?, f.value, REL32_JUMP_LEN).ok()?;
            Some((s.patch_addr, s.patch_addr + s.displaced_len as u64))
        })
        .collect();
    entry_spans.sort_unstable();
    let in_entry_span = |addr: u64, end: u64| {
        let i = entry_spans.partition_point(|&(s, _)| s < end);
        // A span is at most the few bytes of a redirect's displaced instructions long.
        entry_spans[..i]
            .iter()
            .rev()
            .take_while(|&&(s, _)| s + 64 > addr)
            .any(|&(s, e)| addr < e && s < end)
    };
    let mut seen = BTreeSet::new();
    for f in module.symbols() {
        if f.kind != SymbolKind::Function || f.size == 0 || !seen.insert((f.value, f.size)) {
            continue;
        }
        if replaced
            .iter()
            .any(|&(s, e)| f.value < e && s < f.value.saturating_add(f.size))
        {
            continue;
        }
        if !exec(f.value, f.size) {
            continue;
        }
        let Some(code) = module.bytes_at(f.value, f.size) else {
            continue;
        };
        let Some(found) = sites_in(code, f.value, &index) else {
            continue;
        };
        for (addr, len, target) in found {
            let end = addr + len as u64;
            if in_entry_span(addr, end) {
                continue;
            }
            let off = (addr - f.value) as usize;
            out[target].entry(addr).or_insert_with(|| CallSitePatch {
                vaddr: addr,
                caller: format!("{}+{:#x}", f.name, off),
                bytes: code[off..off + len].to_vec(),
            });
        }
    }
    out.into_iter().map(|m| m.into_values().collect()).collect()
}

/// (address, length, index of the entry it branches to) of each direct rel32 branch of the
/// function `code` at `start` to one of `entries`; `None` when an instruction does not decode.
fn sites_in(
    code: &[u8],
    start: u64,
    entries: &BTreeMap<u64, usize>,
) -> Option<Vec<(u64, usize, usize)>> {
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    let mut found = Vec::new();
    while decoder.can_decode() {
        let off = decoder.position();
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        let bytes = &code[off..off + insn.len()];
        if let Ok(site) = lp_core::call_site::decode(insn.ip(), bytes) {
            if let Some(&i) = entries.get(&site.target) {
                found.push((site.addr, site.len, i));
            }
        }
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_calls_jumps_and_jccs_to_entries_only() {
        // 0x1000: push rbx; call 0x2000; call 0x3000; test eax,eax; je 0x2000 (rel32);
        //         pop rbx; jmp 0x2000
        let mut code = vec![0x53];
        let call = |at: u64, to: u64| {
            let mut b = vec![0xe8];
            b.extend(((to as i64 - (at as i64 + 5)) as i32).to_le_bytes());
            b
        };
        code.extend(call(0x1001, 0x2000));
        code.extend(call(0x1006, 0x3000));
        code.extend([0x85, 0xc0]);
        let je_at = 0x1000 + code.len() as u64;
        code.extend([0x0f, 0x84]);
        code.extend(((0x2000i64 - (je_at as i64 + 6)) as i32).to_le_bytes());
        code.push(0x5b);
        let jmp_at = 0x1000 + code.len() as u64;
        code.push(0xe9);
        code.extend(((0x2000i64 - (jmp_at as i64 + 5)) as i32).to_le_bytes());
        let entries = BTreeMap::from([(0x2000u64, 0usize)]);
        let found = sites_in(&code, 0x1000, &entries).unwrap();
        assert_eq!(
            found,
            vec![(0x1001, 5, 0), (je_at, 6, 0), (jmp_at, 5, 0)],
            "call 0x3000 is not a replaced function's"
        );
        // an undecodable instruction: the function is not searched at all
        code.push(0x06); // push es: invalid in 64-bit mode
        assert_eq!(sites_in(&code, 0x1000, &entries), None);
    }
}

//! Names for the code livepatch generates around a patch in the patch memory: each function's
//! trampoline (the original's displaced instructions, then a jump back), its
//! register-preserving thunk, its dispatch (nonstop mode: `testb $1,flag(%rip); jnz new;
//! jmp trampoline`) and the trampolines of its retargeted callers. Every call of a function
//! patched in nonstop mode passes its dispatch, so without a name a profile or a debugger stop
//! there shows an unknown address (review session 5, #4).
//!
//! The names are the same for perf and gdb: `livepatch dispatch F`, `livepatch trampoline F`,
//! `livepatch thunk F`, `livepatch trampoline F at CALLER+0xOFF`. Each range is exact: a
//! trampoline's length is that of the code lp-core builds again from the same site (what the
//! apply wrote), a thunk's and a dispatch's come from decoding their bytes in the target.

use crate::patchfile::Patch;
use crate::process::Memory;
use crate::state::AppliedFunction;
use lp_core::jump::REL32_JUMP_LEN;
use lp_core::site::validate_site;
use lp_core::trampoline::{build_trampoline, MAX_TRAMPOLINE_LEN};

/// One piece of generated code and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StubSymbol {
    /// Runtime address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// `livepatch KIND FUNCTION` (see the module documentation).
    pub name: String,
}

/// The generated code of `functions` (the records of `patch`'s functions, in its order), read
/// back from `mem` where needed. A piece that cannot be measured is left out: naming is
/// best effort and never decides anything.
pub fn stub_symbols(patch: &Patch, functions: &[AppliedFunction], mem: &Memory) -> Vec<StubSymbol> {
    let mut out = Vec::new();
    for (i, f) in functions.iter().enumerate() {
        // The same site the apply built the trampoline from: the file's original bytes.
        let original = patch
            .functions
            .get(i)
            .filter(|pf| pf.old_name == f.name)
            .map(|pf| pf.old_bytes.as_slice());
        if let Some(len) = original.and_then(|b| trampoline_len(b, f.old, f.trampoline)) {
            out.push(StubSymbol {
                addr: f.trampoline,
                len,
                name: format!("livepatch trampoline {}", f.name),
            });
        }
        if f.via != f.new {
            let thunk = mem
                .read_vec(f.via, crate::thunk::MAX_LEN)
                .ok()
                .and_then(|code| crate::thunk_cfi::decode(f.via, &code));
            if let Some(thunk) = thunk {
                out.push(StubSymbol {
                    addr: f.via,
                    len: thunk.len,
                    name: format!("livepatch thunk {}", f.name),
                });
            }
        }
        if let Some(d) = f.dispatch {
            let len = mem
                .read_vec(d, 32)
                .ok()
                .and_then(|code| dispatch_len(d, &code));
            if let Some(len) = len {
                out.push(StubSymbol {
                    addr: d,
                    len,
                    name: format!("livepatch dispatch {}", f.name),
                });
            }
        }
        for c in &f.call_sites {
            if let Some(len) = trampoline_len(&c.original, c.addr, c.trampoline) {
                out.push(StubSymbol {
                    addr: c.trampoline,
                    len,
                    name: format!("livepatch trampoline {} at {}", f.name, c.caller),
                });
            }
        }
    }
    out.retain(|s| s.addr != 0 && s.len != 0);
    out
}

/// The length of the trampoline lp-core builds at `at` for the code `original` at `entry`.
fn trampoline_len(original: &[u8], entry: u64, at: u64) -> Option<u64> {
    if at == 0 {
        return None;
    }
    let site = validate_site(original, entry, REL32_JUMP_LEN).ok()?;
    let mut code = [0u8; MAX_TRAMPOLINE_LEN];
    build_trampoline(&site, at, &mut code)
        .ok()
        .map(|n| n as u64)
}

/// The length of the dispatch at `at` decoded from `code`: a `test` of a RIP-relative byte,
/// a `jne` and a `jmp`. None when the bytes are not that.
fn dispatch_len(at: u64, code: &[u8]) -> Option<u64> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, Register};
    let mut d = Decoder::with_ip(64, code, at, DecoderOptions::NONE);
    let test = d.decode();
    let jnz = d.decode();
    let jmp = d.decode();
    let shape = test.mnemonic() == Mnemonic::Test
        && test.memory_base() == Register::RIP
        && jnz.mnemonic() == Mnemonic::Jne
        && jmp.mnemonic() == Mnemonic::Jmp;
    shape.then(|| d.position() as u64)
}

/// The perf map lines for `stubs`, tagged like the patch's own (`[livepatch ID]`) so that a
/// revert's [`crate::perf_map::forget`] removes them with the rest.
pub fn perf_lines(stubs: &[StubSymbol], tag: &str) -> String {
    stubs
        .iter()
        .map(|s| format!("{:x} {:x} {} [livepatch {tag}]\n", s.addr, s.len, s.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatch the apply encodes (testb/jnz/jmp, 18 bytes) is measured exactly; other
    /// bytes are not taken for one.
    #[test]
    fn a_dispatch_is_recognised_by_its_shape() {
        let at = 0x7f00_0000_1040u64;
        let rel = |end: u64, to: u64| ((to.wrapping_sub(end)) as i32).to_le_bytes();
        let mut code = vec![0xf6, 0x05];
        code.extend(rel(at + 7, at - 0x40));
        code.push(1);
        code.extend([0x0f, 0x85]);
        code.extend(rel(at + 13, at + 0x1000));
        code.push(0xe9);
        code.extend(rel(at + 18, at - 0x20));
        code.extend([0xcc; 14]);
        assert_eq!(dispatch_len(at, &code), Some(18));
        assert_eq!(dispatch_len(at, &[0xcc; 32]), None);
        assert_eq!(dispatch_len(at, &code[7..]), None, "jnz first");
    }

    /// A trampoline's length is that of the code built for the site: here `push rbp; mov
    /// rbp, rsp; sub rsp, 0x10` (8 bytes displaced) and a 5-byte jump back.
    #[test]
    fn a_trampoline_is_as_long_as_lp_core_builds_it() {
        let entry = 0x40_1000u64;
        let original = [
            0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0x89, 0x7d, 0xfc, 0xc3,
        ];
        assert_eq!(
            trampoline_len(&original, entry, entry + 0x1000),
            Some(8 + 5)
        );
        assert_eq!(trampoline_len(&original, entry, 0), None);
        assert_eq!(
            trampoline_len(&[0xc3], entry, entry + 0x1000),
            None,
            "too short for a site"
        );
    }

    #[test]
    fn perf_lines_carry_the_patch_tag() {
        let stubs = [StubSymbol {
            addr: 0x7f00_0000_1040,
            len: 18,
            name: "livepatch dispatch compute".into(),
        }];
        assert_eq!(
            perf_lines(&stubs, "0123456789abcdef"),
            "7f0000001040 12 livepatch dispatch compute [livepatch 0123456789abcdef]\n"
        );
    }
}

//! Names for the code livepatch generates around a patch in the patch memory: each function's
//! trampoline (the original's displaced instructions, then a jump back), its
//! register-preserving thunk, its dispatch (nonstop mode: `testb $1,flag(%rip); jnz new;
//! jmp trampoline`) and the trampolines of its retargeted callers. Every call of a function
//! patched in nonstop mode passes its dispatch, so without a name a profile or a debugger stop
//! there shows an unknown address (review session 5, #4).
//!
//! The names are the same for perf and gdb: `livepatch dispatch F`, `livepatch trampoline F`,
//! `livepatch thunk F`, `livepatch trampoline F at CALLER+0xOFF`. Each range is exact: the
//! length of the code the apply built (a thunk's and a dispatch's measured by decoding the
//! bytes it wrote), named as the apply builds it ([`StubSymbol::trampoline`] and the others).

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

impl StubSymbol {
    /// `None` for nothing to name (no address, or no length).
    fn named(addr: u64, len: u64, name: impl FnOnce() -> String) -> Option<StubSymbol> {
        (addr != 0 && len != 0).then(|| StubSymbol {
            addr,
            len,
            name: name(),
        })
    }

    /// The trampoline of `function`'s entry: `len` bytes at `addr`.
    pub fn trampoline(function: &str, addr: u64, len: u64) -> Option<StubSymbol> {
        Self::named(addr, len, || format!("livepatch trampoline {function}"))
    }

    /// The register-preserving thunk of `function` at `addr`, measured from its `code` (its
    /// bytes and possibly more); `None` when they are not a thunk.
    pub fn thunk(function: &str, addr: u64, code: &[u8]) -> Option<StubSymbol> {
        let len = crate::thunk_cfi::decode(addr, code)?.len;
        Self::named(addr, len, || format!("livepatch thunk {function}"))
    }

    /// The dispatch of `function` at `addr`, measured from its `code`; `None` when they are
    /// not a dispatch.
    pub fn dispatch(function: &str, addr: u64, code: &[u8]) -> Option<StubSymbol> {
        let len = dispatch_len(addr, code)?;
        Self::named(addr, len, || format!("livepatch dispatch {function}"))
    }

    /// The trampoline of a call site of `function` in `caller` (`CALLER+0xOFF`): `len`
    /// bytes at `addr`.
    pub fn call_site_trampoline(
        function: &str,
        caller: &str,
        addr: u64,
        len: u64,
    ) -> Option<StubSymbol> {
        Self::named(addr, len, || {
            format!("livepatch trampoline {function} at {caller}")
        })
    }
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

    /// The names say what the code is and whose; nothing is named without an address or a
    /// length, nor a thunk or a dispatch whose bytes are not one.
    #[test]
    fn stubs_are_named_by_kind_and_function() {
        let t = StubSymbol::call_site_trampoline("compute", "main+0x1a", 0x7000, 13).unwrap();
        assert_eq!(t.name, "livepatch trampoline compute at main+0x1a");
        assert_eq!((t.addr, t.len), (0x7000, 13));
        assert_eq!(
            StubSymbol::trampoline("compute", 0x7000, 13).unwrap().name,
            "livepatch trampoline compute"
        );
        assert_eq!(StubSymbol::trampoline("compute", 0, 13), None);
        assert_eq!(StubSymbol::trampoline("compute", 0x7000, 0), None);
        assert_eq!(StubSymbol::dispatch("compute", 0x7000, &[0xcc; 32]), None);
        assert_eq!(StubSymbol::thunk("compute", 0x7000, &[0xcc; 32]), None);
        // push rax; pop rax; ret: a thunk's shape, 3 bytes.
        let thunk = StubSymbol::thunk("compute", 0x7000, &[0x50, 0x58, 0xc3, 0xcc]).unwrap();
        assert_eq!(
            (thunk.name.as_str(), thunk.len),
            ("livepatch thunk compute", 3)
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

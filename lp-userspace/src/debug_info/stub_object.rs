//! A symbol file for gdb naming the generated code of a patch ([`super::stub_names`]).
//!
//! gdb learns names from object files (`add-symbol-file`), not from a list of addresses. So
//! the names go into a small ELF relocatable of our own: one section, `.livepatch`, without
//! contents (`SHT_NOBITS`: gdb reads the code from the process), that `add-symbol-file FILE
//! -s .livepatch ADDR` places at the first stub; one local function symbol (with its size,
//! so gdb names no byte after it) per stub. The generated `.eh_frame` of the thunks,
//! trampolines and dispatches ([`crate::thunk_cfi`]) goes in too, as the `.eh_frame` section
//! placed where it lies in the process: gdb then unwinds through them (a backtrace from a new
//! function called by its register-preserving thunk reaches the caller) instead of guessing.
//!
//! Every section's address in the file is its runtime address (and `add-symbol-file` is given
//! the same), so gdb's section offsets are all zero: the `.eh_frame`'s pc-relative pointers,
//! computed for its runtime address, then mean what they mean in the process.

use super::stub_names::StubSymbol;

/// The section gdb is told to place.
pub const SECTION: &str = ".livepatch";

const EHDR_LEN: usize = 64;
const SHDR_LEN: usize = 64;
const SYM_LEN: usize = 24;
const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_NOBITS: u32 = 8;
const SHT_PROGBITS: u32 = 1;
const SHF_ALLOC: u64 = 2;
const SHF_EXECINSTR: u64 = 4;
const STB_LOCAL_STT_FUNC: u8 = 2;

/// The generated code's `.eh_frame`: its runtime address and bytes.
pub type EhFrame<'a> = Option<(u64, &'a [u8])>;

/// The `add-symbol-file` command loading the object [`build`] makes for `stubs` and
/// `eh_frame`, saved at `path`. None without stubs.
pub fn gdb_command(
    path: &std::path::Path,
    stubs: &[StubSymbol],
    eh_frame: EhFrame,
) -> Option<String> {
    let base = stubs.iter().map(|s| s.addr).min()?;
    let mut cmd = format!("add-symbol-file {} -s {SECTION} {base:#x}", path.display());
    if let Some((at, _)) = eh_frame {
        cmd.push_str(&format!(" -s .eh_frame {at:#x}"));
    }
    Some(cmd)
}

/// The object naming `stubs` (none empty) and holding their `eh_frame`, if any. None without
/// stubs.
pub fn build(stubs: &[StubSymbol], eh_frame: EhFrame) -> Option<Vec<u8>> {
    let base = stubs.iter().map(|s| s.addr).min()?;
    let span = stubs.iter().map(|s| s.addr + s.len).max()? - base;
    let (eh_addr, eh_bytes) = eh_frame.unwrap_or((0, &[]));
    // Section indices: 1 .livepatch, 2 .eh_frame, 3 .symtab, 4 .strtab, 5 .shstrtab.
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; SYM_LEN]; // the null symbol
    for s in stubs {
        let name = strtab.len() as u32;
        strtab.extend_from_slice(s.name.as_bytes());
        strtab.push(0);
        symtab.extend_from_slice(&name.to_le_bytes());
        symtab.push(STB_LOCAL_STT_FUNC);
        symtab.push(0); // st_other: default visibility
        symtab.extend_from_slice(&1u16.to_le_bytes()); // st_shndx: .livepatch
        symtab.extend_from_slice(&(s.addr - base).to_le_bytes());
        symtab.extend_from_slice(&s.len.to_le_bytes());
    }
    let mut shstrtab = vec![0u8];
    let mut shname = |n: &str| {
        let at = shstrtab.len() as u32;
        shstrtab.extend_from_slice(n.as_bytes());
        shstrtab.push(0);
        at
    };
    let names = [
        shname(SECTION),
        shname(".eh_frame"),
        shname(".symtab"),
        shname(".strtab"),
        shname(".shstrtab"),
    ];

    // Layout: header, .eh_frame (8-aligned), .symtab (8-aligned), .strtab, .shstrtab, section
    // headers (8-aligned).
    let eh_off = EHDR_LEN;
    let symtab_off = (eh_off + eh_bytes.len()).next_multiple_of(8);
    let strtab_off = symtab_off + symtab.len();
    let shstrtab_off = strtab_off + strtab.len();
    let shoff = (shstrtab_off + shstrtab.len()).next_multiple_of(8);
    let nsyms = symtab.len() / SYM_LEN;

    let mut out = Vec::with_capacity(shoff + 6 * SHDR_LEN);
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    out.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    out.extend_from_slice(&0u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&(shoff as u64).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // e_phentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_phnum
    out.extend_from_slice(&(SHDR_LEN as u16).to_le_bytes());
    out.extend_from_slice(&6u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&5u16.to_le_bytes()); // e_shstrndx
    out.extend_from_slice(eh_bytes);
    out.resize(symtab_off, 0);
    out.extend_from_slice(&symtab);
    out.extend_from_slice(&strtab);
    out.extend_from_slice(&shstrtab);
    out.resize(shoff, 0);

    let mut shdr = |h: Shdr| {
        out.extend_from_slice(&h.name.to_le_bytes());
        out.extend_from_slice(&h.kind.to_le_bytes());
        out.extend_from_slice(&h.flags.to_le_bytes());
        out.extend_from_slice(&h.addr.to_le_bytes());
        out.extend_from_slice(&(h.off as u64).to_le_bytes());
        out.extend_from_slice(&h.size.to_le_bytes());
        out.extend_from_slice(&h.link.to_le_bytes());
        out.extend_from_slice(&h.info.to_le_bytes());
        out.extend_from_slice(&h.align.to_le_bytes());
        out.extend_from_slice(&h.entsize.to_le_bytes());
    };
    shdr(Shdr::default());
    shdr(Shdr {
        name: names[0],
        kind: SHT_NOBITS,
        flags: SHF_ALLOC | SHF_EXECINSTR,
        addr: base,
        off: shoff,
        size: span,
        align: 16,
        ..Shdr::default()
    });
    // Without CFI: an empty .eh_frame (gdb reads none), so that the indices stay fixed.
    shdr(Shdr {
        name: names[1],
        kind: SHT_PROGBITS,
        flags: SHF_ALLOC,
        addr: eh_addr,
        off: eh_off,
        size: eh_bytes.len() as u64,
        align: 8,
        ..Shdr::default()
    });
    // sh_link: the string table; sh_info: one past the last local symbol (all are local).
    shdr(Shdr {
        name: names[2],
        kind: SHT_SYMTAB,
        off: symtab_off,
        size: symtab.len() as u64,
        link: 4,
        info: nsyms as u32,
        align: 8,
        entsize: SYM_LEN as u64,
        ..Shdr::default()
    });
    shdr(Shdr {
        name: names[3],
        kind: SHT_STRTAB,
        off: strtab_off,
        size: strtab.len() as u64,
        align: 1,
        ..Shdr::default()
    });
    shdr(Shdr {
        name: names[4],
        kind: SHT_STRTAB,
        off: shstrtab_off,
        size: shstrtab.len() as u64,
        align: 1,
        ..Shdr::default()
    });
    Some(out)
}

/// An ELF64 section header's fields.
#[derive(Default)]
struct Shdr {
    name: u32,
    kind: u32,
    flags: u64,
    addr: u64,
    off: usize,
    size: u64,
    link: u32,
    info: u32,
    align: u64,
    entsize: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use goblin::elf::Elf;

    /// goblin (as any ELF reader) finds the section and each stub as a sized function symbol
    /// at its offset from the section's placement.
    #[test]
    fn the_object_holds_one_sized_function_symbol_per_stub() {
        let stubs = [
            StubSymbol {
                addr: 0x7f00_0000_1000,
                len: 13,
                name: "livepatch trampoline compute".into(),
            },
            StubSymbol {
                addr: 0x7f00_0000_1040,
                len: 18,
                name: "livepatch dispatch compute".into(),
            },
        ];
        let eh = [
            0x14, 0, 0, 0, 0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, 0x10, 1, 0x1b, 0x0c, 7, 8, 0x90,
            1, 0, 0,
        ];
        let bytes = build(&stubs, Some((0x7f00_0000_2000, &eh))).unwrap();
        let elf = Elf::parse(&bytes).unwrap();
        assert_eq!(elf.header.e_type, goblin::elf::header::ET_REL);
        let sect = elf
            .section_headers
            .iter()
            .position(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(SECTION))
            .expect(".livepatch");
        assert_eq!(elf.section_headers[sect].sh_type, SHT_NOBITS);
        assert_eq!(elf.section_headers[sect].sh_addr, 0x7f00_0000_1000);
        assert_eq!(elf.section_headers[sect].sh_size, 0x40 + 18);
        // The CFI, at its runtime address, byte for byte.
        let eh_frame = elf
            .section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".eh_frame"))
            .expect(".eh_frame");
        assert_eq!(eh_frame.sh_addr, 0x7f00_0000_2000);
        let off = eh_frame.sh_offset as usize;
        assert_eq!(&bytes[off..off + eh.len()], &eh);
        let syms: Vec<_> = elf
            .syms
            .iter()
            .filter(|s| s.is_function())
            .map(|s| {
                let name = elf.strtab.get_at(s.st_name).unwrap().to_string();
                (name, s.st_shndx, s.st_value, s.st_size)
            })
            .collect();
        assert_eq!(
            syms,
            [
                ("livepatch trampoline compute".to_string(), sect, 0, 13),
                ("livepatch dispatch compute".to_string(), sect, 0x40, 18),
            ]
        );
        assert!(build(&[], None).is_none());
        // Without CFI: an empty .eh_frame.
        let bytes = build(&stubs, None).unwrap();
        let elf = Elf::parse(&bytes).unwrap();
        assert!(elf
            .section_headers
            .iter()
            .any(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".eh_frame") && s.sh_size == 0));
    }

    #[test]
    fn the_command_places_each_section_at_its_runtime_address() {
        let stubs = [StubSymbol {
            addr: 0x7f00_0000_1040,
            len: 18,
            name: "livepatch dispatch compute".into(),
        }];
        let path = std::path::Path::new("/tmp/livepatch-42-abc-stubs.o");
        assert_eq!(
            gdb_command(path, &stubs, Some((0x7f00_0000_2000, &[]))).unwrap(),
            "add-symbol-file /tmp/livepatch-42-abc-stubs.o -s .livepatch 0x7f0000001040 -s .eh_frame 0x7f0000002000"
        );
        assert_eq!(
            gdb_command(path, &stubs, None).unwrap(),
            "add-symbol-file /tmp/livepatch-42-abc-stubs.o -s .livepatch 0x7f0000001040"
        );
        assert!(gdb_command(path, &[], None).is_none());
    }
}

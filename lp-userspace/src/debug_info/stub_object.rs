//! A symbol file for gdb naming the generated code of a patch ([`super::stub_names`]).
//!
//! gdb learns names from object files (`add-symbol-file`), not from a list of addresses. So
//! the names go into a small ELF relocatable of our own: one section, `.livepatch`, without
//! contents (`SHT_NOBITS`: gdb reads the code from the process), that `add-symbol-file FILE
//! -s .livepatch ADDR` places at the first stub; one local function symbol (with its size,
//! so gdb names no byte after it) per stub.

use super::stub_names::StubSymbol;

/// The section gdb is told to place.
pub const SECTION: &str = ".livepatch";

const EHDR_LEN: usize = 64;
const SHDR_LEN: usize = 64;
const SYM_LEN: usize = 24;
const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_NOBITS: u32 = 8;
const SHF_ALLOC: u64 = 2;
const SHF_EXECINSTR: u64 = 4;
const STB_LOCAL_STT_FUNC: u8 = 2;

/// The object naming `stubs` (none empty), and the address its [`SECTION`] must be placed at
/// (the lowest stub). None without stubs.
pub fn build(stubs: &[StubSymbol]) -> Option<(Vec<u8>, u64)> {
    let base = stubs.iter().map(|s| s.addr).min()?;
    let span = stubs.iter().map(|s| s.addr + s.len).max()? - base;

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
        shname(".symtab"),
        shname(".strtab"),
        shname(".shstrtab"),
    ];

    // Layout: header, .symtab (8-aligned), .strtab, .shstrtab, section headers (8-aligned).
    let symtab_off = EHDR_LEN;
    let strtab_off = symtab_off + symtab.len();
    let shstrtab_off = strtab_off + strtab.len();
    let shoff = (shstrtab_off + shstrtab.len()).next_multiple_of(8);
    let nsyms = symtab.len() / SYM_LEN;

    let mut out = Vec::with_capacity(shoff + 5 * SHDR_LEN);
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
    out.extend_from_slice(&5u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&4u16.to_le_bytes()); // e_shstrndx
    out.extend_from_slice(&symtab);
    out.extend_from_slice(&strtab);
    out.extend_from_slice(&shstrtab);
    out.resize(shoff, 0);

    let mut shdr = |name: u32,
                    kind: u32,
                    flags: u64,
                    off: usize,
                    size: u64,
                    link: u32,
                    info: u32,
                    align: u64,
                    entsize: u64| {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // sh_addr: placed by add-symbol-file
        out.extend_from_slice(&(off as u64).to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&link.to_le_bytes());
        out.extend_from_slice(&info.to_le_bytes());
        out.extend_from_slice(&align.to_le_bytes());
        out.extend_from_slice(&entsize.to_le_bytes());
    };
    shdr(0, 0, 0, 0, 0, 0, 0, 0, 0);
    let nobits = SHF_ALLOC | SHF_EXECINSTR;
    shdr(names[0], SHT_NOBITS, nobits, shoff, span, 0, 0, 16, 0);
    // sh_link: the string table; sh_info: one past the last local symbol (all are local).
    let symtab_len = symtab.len() as u64;
    shdr(
        names[1],
        SHT_SYMTAB,
        0,
        symtab_off,
        symtab_len,
        3,
        nsyms as u32,
        8,
        SYM_LEN as u64,
    );
    shdr(
        names[2],
        SHT_STRTAB,
        0,
        strtab_off,
        strtab.len() as u64,
        0,
        0,
        1,
        0,
    );
    shdr(
        names[3],
        SHT_STRTAB,
        0,
        shstrtab_off,
        shstrtab.len() as u64,
        0,
        0,
        1,
        0,
    );
    Some((out, base))
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
        let (bytes, base) = build(&stubs).unwrap();
        assert_eq!(base, 0x7f00_0000_1000);
        let elf = Elf::parse(&bytes).unwrap();
        assert_eq!(elf.header.e_type, goblin::elf::header::ET_REL);
        let sect = elf
            .section_headers
            .iter()
            .position(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(SECTION))
            .expect(".livepatch");
        assert_eq!(elf.section_headers[sect].sh_type, SHT_NOBITS);
        assert_eq!(elf.section_headers[sect].sh_size, 0x40 + 18);
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
        assert!(build(&[]).is_none());
    }
}

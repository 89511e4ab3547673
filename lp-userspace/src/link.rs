//! A small static linker for one x86-64 relocatable object (`gcc -c -fPIC -O2`, optionally
//! `-ffunction-sections`): the patch's new code, laid out into one image at an address chosen
//! inside the target process.
//!
//! Two phases, because the image size must be known before memory exists in the target:
//! [`Layout::of`] decides where every section, GOT slot and call stub goes (offsets only), then
//! [`Layout::link`] fixes the load address, resolves undefined symbols through a callback and
//! applies the relocations.
//!
//! Image, in order (each region starts on a page so it can get its own protection):
//! 1. **text** (r-x): every `SHF_EXECINSTR` section, then one 8-byte stub per undefined function
//!    called (`jmp *slot(%rip)`), used only when the callee is out of rel32 reach;
//! 2. **read-only** (r--): `.rodata*`, `.data.rel.ro*` (relocated here, never written after),
//!    the GOT (one slot per symbol referenced through `GOTPCREL*`, or by a stub), and `.eh_frame`
//!    followed by a 4-byte zero terminator (ready for `__register_frame`);
//! 3. **data** (rw-): `.data*` and `.bss*` of the object (new variables of the patch).
//!
//! Refused with a clear error: thread-local sections, constructors (`.init_array`, `.ctors`...),
//! `SHN_COMMON` symbols (build with `-fno-common`, gcc's default), `REL` (addend-less)
//! relocations, and any relocation type not in the list below.
//!
//! Relocations: `R_X86_64_64`, `PC32`, `PLT32`, `GOTPCREL`, `GOTPCRELX`, `REX_GOTPCRELX`,
//! `32`, `32S`, `PC64`, `GOTPC32`, `GOTOFF64`, `NONE`.
//!
//! `GOTPCRELX`/`REX_GOTPCRELX` loads whose target is in rel32 reach are relaxed as the psABI
//! allows (`mov foo@GOTPCREL(%rip)` → `lea foo(%rip)`, `call *foo@GOTPCREL(%rip)` →
//! `addr32 call foo`), so patched code pays no extra memory load for the GOT.
//!
//! Symbol resolution: a symbol the object defines (global or local) always binds to the
//! object's own definition — so calls between replaced functions go to the new versions; an
//! undefined one is asked to the resolver.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use goblin::elf::{header, section_header as sh, sym, Elf};
use thiserror::Error;

const PAGE: u64 = 0x1000;
const STUB_LEN: u64 = 8;
/// Largest image accepted (a patch is a handful of functions; this bounds hostile input).
pub const MAX_IMAGE: u64 = 256 << 20;

/// Relocation types (System V x86-64 psABI).
pub mod reloc {
    /// No relocation.
    pub const NONE: u32 = 0;
    /// S + A, 64 bits.
    pub const R64: u32 = 1;
    /// S + A - P, 32 bits signed.
    pub const PC32: u32 = 2;
    /// L + A - P (procedure linkage: we use S, or a stub when S is out of reach).
    pub const PLT32: u32 = 4;
    /// G + GOT + A - P.
    pub const GOTPCREL: u32 = 9;
    /// S + A, 32 bits zero-extended.
    pub const R32: u32 = 10;
    /// S + A, 32 bits sign-extended.
    pub const R32S: u32 = 11;
    /// S + A - P, 64 bits.
    pub const PC64: u32 = 24;
    /// S + A - GOT, 64 bits.
    pub const GOTOFF64: u32 = 25;
    /// GOT + A - P, 32 bits.
    pub const GOTPC32: u32 = 26;
    /// GOTPCREL, relaxable.
    pub const GOTPCRELX: u32 = 41;
    /// GOTPCREL with a REX prefix, relaxable.
    pub const REX_GOTPCRELX: u32 = 42;

    /// The psABI name of a relocation type.
    pub fn name(t: u32) -> String {
        goblin::elf::reloc::r_to_str(t, goblin::elf::header::EM_X86_64).to_string()
    }
}

/// Errors laying out or linking an object.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    /// The bytes are not an ELF object we handle.
    #[error("patch object: {0}")]
    BadObject(String),
    /// A section kind we refuse.
    #[error("patch object: section `{section}` is not supported: {reason}")]
    UnsupportedSection {
        /// The section.
        section: String,
        /// Why.
        reason: &'static str,
    },
    /// A relocation type we do not implement.
    #[error("patch object: unsupported relocation {kind} ({code}) in `{section}` at offset 0x{offset:x}")]
    UnsupportedRelocation {
        /// The psABI name.
        kind: String,
        /// The numeric type.
        code: u32,
        /// The section being relocated.
        section: String,
        /// Offset in that section.
        offset: u64,
    },
    /// An undefined symbol the resolver does not know.
    #[error("undefined symbol `{0}`: not in the patch object nor in the target")]
    Undefined(String),
    /// A symbol we cannot use (common, in a section we did not load...).
    #[error("patch object: symbol `{name}`: {reason}")]
    BadSymbol {
        /// The symbol.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A value does not fit the relocation's field.
    #[error("relocation {kind} against `{symbol}` in `{section}`+0x{offset:x}: value 0x{value:x} out of range (target too far from the patch?)")]
    OutOfRange {
        /// The psABI name.
        kind: String,
        /// The symbol referenced.
        symbol: String,
        /// The section.
        section: String,
        /// Offset in it.
        offset: u64,
        /// The computed value.
        value: i128,
    },
    /// The image would wrap around the end of the address space.
    #[error("an image at 0x{0:x} would wrap around the address space")]
    AddressOverflow(u64),
    /// The load address is not page aligned.
    #[error("load address 0x{0:x} is not page aligned")]
    Unaligned(u64),
}

/// Memory protection of a region of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// r-x.
    ReadExec,
    /// r--.
    Read,
    /// rw-.
    ReadWrite,
}

/// A page-aligned part of the image with one protection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Offset in the image.
    pub offset: u64,
    /// Length (page multiple).
    pub len: u64,
    /// What to mprotect it to once written.
    pub prot: Protection,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    ReadOnly,
    EhFrame,
    Data,
    Bss,
}

#[derive(Clone, Debug)]
struct Placed {
    shndx: usize,
    name: String,
    offset: u64,
    size: u64,
    kind: Kind,
}

/// Where everything of an object goes, relative to the image start. Owns a copy of the object.
#[derive(Clone, Debug)]
pub struct Layout {
    object: Vec<u8>,
    placed: Vec<Placed>,
    /// Section index → position in `placed`.
    by_shndx: HashMap<usize, usize>,
    /// Symbol index → GOT slot offset (in the image).
    got: HashMap<usize, u64>,
    /// Symbol index → stub offset.
    stubs: HashMap<usize, u64>,
    got_start: u64,
    eh_frame: Option<(u64, u64)>,
    regions: Vec<Region>,
    size: u64,
}

/// A defined symbol of the linked image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkedSymbol {
    /// Name.
    pub name: String,
    /// Runtime address.
    pub addr: u64,
    /// `st_size`.
    pub size: u64,
    /// A function (else data).
    pub function: bool,
    /// Global or weak (else file-local).
    pub global: bool,
}

/// The result of linking: bytes to copy to `load_addr` and what is where.
#[derive(Clone, Debug)]
pub struct LinkedImage {
    /// Where the image was linked to run.
    pub load_addr: u64,
    /// The image (`Layout::size` bytes; `.bss` included as zeros).
    pub bytes: Vec<u8>,
    /// Name → address of the defined functions and objects (a local name defined twice is
    /// left out; use `symbol_list`).
    pub symbols: HashMap<String, u64>,
    /// Every defined function and object symbol.
    pub symbol_list: Vec<LinkedSymbol>,
    /// Runtime ranges of the executable sections and stubs.
    pub text_ranges: Vec<Range<u64>>,
    /// Page-aligned regions with their final protection.
    pub regions: Vec<Region>,
    /// Runtime range of the relocated `.eh_frame` (terminator included), if the object has one.
    pub eh_frame: Option<Range<u64>>,
    /// How many GOT loads were rewritten into direct references (target in rel32 reach).
    pub relaxed: usize,
    /// Runtime address of every loaded section of the object, by name (for debuggers:
    /// `add-symbol-file OBJECT -s NAME ADDR ...`).
    pub sections: Vec<(String, u64)>,
}

impl LinkedImage {
    /// The relocated `.eh_frame` bytes (zero-terminated), if any.
    pub fn eh_frame_bytes(&self) -> Option<&[u8]> {
        let r = self.eh_frame.as_ref()?;
        let s = (r.start - self.load_addr) as usize;
        let e = (r.end - self.load_addr) as usize;
        self.bytes.get(s..e)
    }

    /// The address of function (or object) `name`.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).copied()
    }
}

fn parse_object(object: &[u8]) -> Result<Elf<'_>, LinkError> {
    if object.len() < 64 || &object[..4] != b"\x7fELF" {
        return Err(LinkError::BadObject("not an ELF file".into()));
    }
    if object[4] != 2 || object[5] != 1 {
        return Err(LinkError::BadObject(
            "not a 64-bit little-endian ELF".into(),
        ));
    }
    let elf =
        Elf::parse(object).map_err(|e| LinkError::BadObject(format!("malformed ELF: {e}")))?;
    if elf.header.e_type != header::ET_REL {
        return Err(LinkError::BadObject(
            "not a relocatable object (ET_REL); compile it with gcc -c -fPIC".into(),
        ));
    }
    if elf.header.e_machine != header::EM_X86_64 {
        return Err(LinkError::BadObject("not an x86-64 object".into()));
    }
    Ok(elf)
}

fn section_name(elf: &Elf, idx: usize) -> String {
    elf.section_headers
        .get(idx)
        .and_then(|s| elf.shdr_strtab.get_at(s.sh_name))
        .unwrap_or("?")
        .to_string()
}

fn symbol_name(elf: &Elf, s: &sym::Sym) -> String {
    if s.st_type() == sym::STT_SECTION {
        return section_name(elf, s.st_shndx);
    }
    elf.strtab.get_at(s.st_name).unwrap_or("?").to_string()
}

fn is_undefined(s: &sym::Sym) -> bool {
    s.st_shndx == sh::SHN_UNDEF as usize && s.st_type() != sym::STT_SECTION
}

fn align_up(x: u64, a: u64) -> u64 {
    let a = a.max(1);
    x.div_ceil(a) * a
}

fn classify(elf: &Elf, idx: usize) -> Result<Option<Kind>, LinkError> {
    let s = &elf.section_headers[idx];
    let name = section_name(elf, idx);
    let flags = s.sh_flags as u32;
    if flags & sh::SHF_ALLOC == 0 || matches!(s.sh_type, sh::SHT_NOTE | sh::SHT_GROUP) {
        return Ok(None);
    }
    let refuse = |reason| {
        Err(LinkError::UnsupportedSection {
            section: name.clone(),
            reason,
        })
    };
    if flags & sh::SHF_TLS != 0 {
        return refuse("thread-local storage");
    }
    if matches!(
        s.sh_type,
        sh::SHT_INIT_ARRAY | sh::SHT_FINI_ARRAY | sh::SHT_PREINIT_ARRAY
    ) || name.starts_with(".ctors")
        || name.starts_with(".dtors")
    {
        return refuse("constructors/destructors would never run in a patch");
    }
    if name == ".eh_frame" {
        return Ok(Some(Kind::EhFrame));
    }
    if flags & sh::SHF_EXECINSTR != 0 {
        return Ok(Some(Kind::Text));
    }
    if s.sh_type == sh::SHT_NOBITS {
        return Ok(Some(Kind::Bss));
    }
    if flags & sh::SHF_WRITE != 0 && !name.starts_with(".data.rel.ro") {
        return Ok(Some(Kind::Data));
    }
    Ok(Some(Kind::ReadOnly))
}

impl Layout {
    /// Decides the image layout of `object` (a copy is kept). Fails on anything [`Layout::link`]
    /// could not handle, so a patch can be checked when it is packed.
    pub fn of(object: &[u8]) -> Result<Layout, LinkError> {
        let elf = parse_object(object)?;
        let mut kinds: Vec<(usize, Kind)> = Vec::new();
        for idx in 0..elf.section_headers.len() {
            if let Some(k) = classify(&elf, idx)? {
                kinds.push((idx, k));
            }
        }
        // Which symbols need GOT slots and stubs; every relocation type checked here.
        // Sets, not lists: a hostile object may carry millions of relocations (no quadratic
        // scan); ordered by symbol index, so the layout is deterministic.
        let mut got_syms: BTreeSet<usize> = BTreeSet::new();
        let mut stub_syms: BTreeSet<usize> = BTreeSet::new();
        for (rel_idx, relocs) in &elf.shdr_relocs {
            let rsh = &elf.section_headers[*rel_idx];
            let target = rsh.sh_info as usize;
            if !kinds.iter().any(|(i, _)| *i == target) {
                continue; // relocations of debug info and other unloaded sections
            }
            if rsh.sh_type == sh::SHT_REL {
                return Err(LinkError::BadObject(format!(
                    "`{}` has REL relocations without addends (not x86-64 gcc output)",
                    section_name(&elf, *rel_idx)
                )));
            }
            for r in relocs.iter() {
                let symbol = elf.syms.get(r.r_sym);
                if r.r_sym != 0 && symbol.is_none() {
                    return Err(LinkError::BadObject(format!(
                        "relocation against bad symbol index {}",
                        r.r_sym
                    )));
                }
                match r.r_type {
                    reloc::NONE
                    | reloc::R64
                    | reloc::PC32
                    | reloc::R32
                    | reloc::R32S
                    | reloc::PC64
                    | reloc::GOTOFF64
                    | reloc::GOTPC32 => {}
                    reloc::PLT32 => {
                        if symbol.as_ref().is_some_and(is_undefined) {
                            stub_syms.insert(r.r_sym);
                            got_syms.insert(r.r_sym);
                        }
                    }
                    reloc::GOTPCREL | reloc::GOTPCRELX | reloc::REX_GOTPCRELX => {
                        got_syms.insert(r.r_sym);
                    }
                    other => {
                        return Err(LinkError::UnsupportedRelocation {
                            kind: reloc::name(other),
                            code: other,
                            section: section_name(&elf, target),
                            offset: r.r_offset,
                        })
                    }
                }
            }
        }
        for s in elf.syms.iter() {
            if s.st_shndx == sh::SHN_COMMON as usize {
                return Err(LinkError::BadSymbol {
                    name: symbol_name(&elf, &s),
                    reason: "common symbol; compile with -fno-common",
                });
            }
        }

        // Bound everything before any arithmetic on offsets: a hostile object must not make the
        // layout overflow or the image allocation explode.
        let mut total: u64 = ((got_syms.len() + stub_syms.len()) as u64) * 16 + 4 * PAGE;
        for &(idx, _) in &kinds {
            let s = &elf.section_headers[idx];
            let name = section_name(&elf, idx);
            if s.sh_addralign > PAGE {
                return Err(LinkError::UnsupportedSection {
                    section: name,
                    reason: "alignment above 4096",
                });
            }
            if s.sh_type != sh::SHT_NOBITS
                && s.sh_offset
                    .checked_add(s.sh_size)
                    .is_none_or(|e| e > object.len() as u64)
            {
                return Err(LinkError::BadObject(format!(
                    "section `{name}` outside the file"
                )));
            }
            total = total
                .saturating_add(s.sh_size)
                .saturating_add(s.sh_addralign);
        }
        if total > MAX_IMAGE {
            return Err(LinkError::BadObject(format!(
                "image of {total} bytes is larger than the {MAX_IMAGE} accepted"
            )));
        }

        let mut placed: Vec<Placed> = Vec::new();
        let mut cursor = 0u64;
        let place = |cursor: &mut u64, kind: Kind, placed: &mut Vec<Placed>| {
            for &(idx, k) in kinds.iter().filter(|(_, k)| *k == kind) {
                let s = &elf.section_headers[idx];
                *cursor = align_up(*cursor, s.sh_addralign);
                placed.push(Placed {
                    shndx: idx,
                    name: section_name(&elf, idx),
                    offset: *cursor,
                    size: s.sh_size,
                    kind: k,
                });
                *cursor += s.sh_size;
            }
        };
        let mut regions = Vec::new();
        // 1. text + stubs
        place(&mut cursor, Kind::Text, &mut placed);
        cursor = align_up(cursor, 16);
        let mut stubs = HashMap::new();
        for &s in &stub_syms {
            stubs.insert(s, cursor);
            cursor += STUB_LEN;
        }
        let text_end = align_up(cursor, PAGE);
        if text_end > 0 {
            regions.push(Region {
                offset: 0,
                len: text_end,
                prot: Protection::ReadExec,
            });
        }
        // 2. read-only data, GOT, eh_frame
        cursor = text_end;
        place(&mut cursor, Kind::ReadOnly, &mut placed);
        cursor = align_up(cursor, 8);
        let got_start = cursor;
        let mut got = HashMap::new();
        for &s in &got_syms {
            got.insert(s, cursor);
            cursor += 8;
        }
        place(&mut cursor, Kind::EhFrame, &mut placed);
        let eh_frame = placed.iter().find(|p| p.kind == Kind::EhFrame).map(|p| {
            let start = p.offset;
            cursor += 4; // zero terminator: the end of the list for __register_frame
            (start, cursor - start)
        });
        let ro_end = align_up(cursor, PAGE);
        if ro_end > text_end {
            regions.push(Region {
                offset: text_end,
                len: ro_end - text_end,
                prot: Protection::Read,
            });
        }
        // 3. data + bss
        cursor = ro_end;
        place(&mut cursor, Kind::Data, &mut placed);
        place(&mut cursor, Kind::Bss, &mut placed);
        let rw_end = align_up(cursor, PAGE);
        if rw_end > ro_end {
            regions.push(Region {
                offset: ro_end,
                len: rw_end - ro_end,
                prot: Protection::ReadWrite,
            });
        }
        let by_shndx = placed
            .iter()
            .enumerate()
            .map(|(i, p)| (p.shndx, i))
            .collect();
        Ok(Layout {
            object: object.to_vec(),
            placed,
            by_shndx,
            got,
            stubs,
            got_start,
            eh_frame,
            regions,
            size: rw_end,
        })
    }

    /// Bytes of target memory the image needs (a page multiple).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Alignment the load address needs.
    pub fn align(&self) -> u64 {
        PAGE
    }

    /// The regions and their protections (offsets relative to the load address).
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The object this layout was computed for.
    pub fn object(&self) -> &[u8] {
        &self.object
    }

    /// Names of the symbols the object uses without defining them (what the resolver is
    /// going to be asked).
    pub fn undefined_symbols(&self) -> Vec<String> {
        let Ok(elf) = Elf::parse(&self.object) else {
            return Vec::new();
        };
        let mut out: Vec<String> = elf
            .syms
            .iter()
            .filter(|s| is_undefined(s) && s.st_name != 0)
            .map(|s| symbol_name(&elf, &s))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Names of the functions the object defines, global or local.
    pub fn defined_functions(&self) -> Vec<(String, bool)> {
        let Ok(elf) = Elf::parse(&self.object) else {
            return Vec::new();
        };
        elf.syms
            .iter()
            .filter(|s| s.st_type() == sym::STT_FUNC && !is_undefined(s))
            .map(|s| (symbol_name(&elf, &s), s.st_bind() != sym::STB_LOCAL))
            .collect()
    }

    /// Names of the data objects the object defines in writable memory (`.data`, `.bss`):
    /// new state that starts from its initial value, not from the running program's.
    pub fn defined_writable_objects(&self) -> Vec<String> {
        let Ok(elf) = Elf::parse(&self.object) else {
            return Vec::new();
        };
        elf.syms
            .iter()
            .filter(|s| s.st_type() == sym::STT_OBJECT && !is_undefined(s))
            .filter(|s| {
                self.by_shndx
                    .get(&s.st_shndx)
                    .is_some_and(|&i| matches!(self.placed[i].kind, Kind::Data | Kind::Bss))
            })
            .map(|s| symbol_name(&elf, &s))
            .collect()
    }

    /// Links the image to run at `load_addr` (page aligned). `resolver` gives the runtime
    /// address of each undefined symbol (called once per symbol).
    pub fn link(
        &self,
        load_addr: u64,
        resolver: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<LinkedImage, LinkError> {
        if !load_addr.is_multiple_of(PAGE) {
            return Err(LinkError::Unaligned(load_addr));
        }
        if load_addr.checked_add(self.size).is_none() {
            return Err(LinkError::AddressOverflow(load_addr));
        }
        let elf = parse_object(&self.object)?;
        let mut image = vec![0u8; self.size as usize];
        let mut relaxed = 0usize;
        for p in &self.placed {
            if p.kind == Kind::Bss || p.size == 0 {
                continue;
            }
            let s = &elf.section_headers[p.shndx];
            let data = self
                .object
                .get(s.sh_offset as usize..(s.sh_offset + s.sh_size) as usize)
                .ok_or_else(|| {
                    LinkError::BadObject(format!("section `{}` outside the file", p.name))
                })?;
            image[p.offset as usize..(p.offset + p.size) as usize].copy_from_slice(data);
        }

        // Symbol values.
        let nsyms = elf.syms.len();
        let mut values: Vec<Option<u64>> = vec![None; nsyms];
        let mut symbol_list = Vec::new();
        for (i, s) in elf.syms.iter().enumerate() {
            if i == 0 {
                values[0] = Some(0);
                continue;
            }
            let name = symbol_name(&elf, &s);
            let value = if s.st_shndx == sh::SHN_ABS as usize {
                Some(s.st_value)
            } else if is_undefined(&s) {
                match resolver(&name) {
                    Some(v) => Some(v),
                    None if s.st_bind() == sym::STB_WEAK => Some(0),
                    None => None, // reported only if a relocation uses it
                }
            } else {
                self.by_shndx
                    .get(&s.st_shndx)
                    .map(|&pi| (load_addr + self.placed[pi].offset).wrapping_add(s.st_value))
            };
            values[i] = value;
            let ty = s.st_type();
            if let (Some(addr), false, true) = (
                value,
                is_undefined(&s),
                matches!(ty, sym::STT_FUNC | sym::STT_OBJECT) && s.st_name != 0,
            ) {
                symbol_list.push(LinkedSymbol {
                    name,
                    addr,
                    size: s.st_size,
                    function: ty == sym::STT_FUNC,
                    global: s.st_bind() != sym::STB_LOCAL,
                });
            }
        }
        let sym_value = |idx: usize| -> Result<u64, LinkError> {
            let Some(s) = elf.syms.get(idx) else {
                return Err(LinkError::BadObject(format!("bad symbol index {idx}")));
            };
            values[idx].ok_or_else(|| {
                if is_undefined(&s) {
                    LinkError::Undefined(symbol_name(&elf, &s))
                } else {
                    LinkError::BadSymbol {
                        name: symbol_name(&elf, &s),
                        reason: "defined in a section that is not loaded",
                    }
                }
            })
        };

        // GOT and stubs.
        for (&si, &off) in &self.got {
            let v = sym_value(si)?;
            image[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        for (&si, &off) in &self.stubs {
            let slot = load_addr + self.got[&si];
            let next = load_addr + off + 6;
            let rel = (slot as i64 - next as i64) as i32; // both inside the image: fits
            let o = off as usize;
            image[o..o + 2].copy_from_slice(&[0xff, 0x25]);
            image[o + 2..o + 6].copy_from_slice(&rel.to_le_bytes());
            image[o + 6..o + 8].copy_from_slice(&[0xcc, 0xcc]);
        }

        // Relocations.
        let got_base = load_addr + self.got_start;
        for (rel_idx, relocs) in &elf.shdr_relocs {
            let target = elf.section_headers[*rel_idx].sh_info as usize;
            let Some(&pi) = self.by_shndx.get(&target) else {
                continue;
            };
            let placed = &self.placed[pi];
            if placed.kind == Kind::Bss {
                continue;
            }
            for r in relocs.iter() {
                let len: u64 = match r.r_type {
                    reloc::NONE => continue,
                    reloc::R64 | reloc::PC64 | reloc::GOTOFF64 => 8,
                    _ => 4,
                };
                if r.r_offset.checked_add(len).is_none_or(|e| e > placed.size) {
                    return Err(LinkError::BadObject(format!(
                        "relocation at 0x{:x} outside section `{}`",
                        r.r_offset, placed.name
                    )));
                }
                let a = r.r_addend.unwrap_or(0) as i128;
                let p = (load_addr + placed.offset + r.r_offset) as i128;
                let field_at = placed.offset + r.r_offset;
                let out_of_range = |value: i128| LinkError::OutOfRange {
                    kind: reloc::name(r.r_type),
                    symbol: elf
                        .syms
                        .get(r.r_sym)
                        .map(|s| symbol_name(&elf, &s))
                        .unwrap_or_default(),
                    section: placed.name.clone(),
                    offset: r.r_offset,
                    value,
                };
                let got_slot = |si: usize| (load_addr + self.got[&si]) as i128;
                let (value, width): (i128, u8) = match r.r_type {
                    reloc::NONE => continue,
                    reloc::R64 => (sym_value(r.r_sym)? as i128 + a, 64),
                    reloc::PC64 => (sym_value(r.r_sym)? as i128 + a - p, 64),
                    reloc::PC32 => (sym_value(r.r_sym)? as i128 + a - p, 31),
                    reloc::PLT32 => {
                        let direct = sym_value(r.r_sym)? as i128 + a - p;
                        match self.stubs.get(&r.r_sym) {
                            Some(&stub) if i32::try_from(direct).is_err() => {
                                ((load_addr + stub) as i128 + a - p, 31)
                            }
                            _ => (direct, 31),
                        }
                    }
                    reloc::GOTPCRELX | reloc::REX_GOTPCRELX => {
                        // The psABI lets a linker rewrite a GOT load into a direct reference
                        // when the target is in reach: one memory load less per access.
                        let o = field_at as usize;
                        let s = sym_value(r.r_sym)?;
                        let direct = s as i128 + a - p;
                        let relaxable = r.r_offset >= 2 && s != 0 && i32::try_from(direct).is_ok();
                        match (
                            relaxable,
                            image[o.saturating_sub(2)],
                            image[o.saturating_sub(1)],
                        ) {
                            // mov foo@GOTPCREL(%rip), %reg  →  lea foo(%rip), %reg
                            (true, 0x8b, _) => {
                                image[o - 2] = 0x8d;
                                relaxed += 1;
                                (direct, 31)
                            }
                            // call *foo@GOTPCREL(%rip)  →  addr32 call foo
                            (true, 0xff, 0x15) => {
                                image[o - 2] = 0x67;
                                image[o - 1] = 0xe8;
                                relaxed += 1;
                                (direct, 31)
                            }
                            _ => (got_slot(r.r_sym) + a - p, 31),
                        }
                    }
                    reloc::GOTPCREL => (got_slot(r.r_sym) + a - p, 31),
                    reloc::GOTPC32 => (got_base as i128 + a - p, 31),
                    reloc::GOTOFF64 => (sym_value(r.r_sym)? as i128 + a - got_base as i128, 64),
                    reloc::R32 => (sym_value(r.r_sym)? as i128 + a, 32),
                    reloc::R32S => (sym_value(r.r_sym)? as i128 + a, 31),
                    other => {
                        return Err(LinkError::UnsupportedRelocation {
                            kind: reloc::name(other),
                            code: other,
                            section: placed.name.clone(),
                            offset: r.r_offset,
                        })
                    }
                };
                let o = field_at as usize;
                match width {
                    64 => image[o..o + 8].copy_from_slice(&(value as u64).to_le_bytes()),
                    32 => {
                        let v = u32::try_from(value).map_err(|_| out_of_range(value))?;
                        image[o..o + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    _ => {
                        let v = i32::try_from(value).map_err(|_| out_of_range(value))?;
                        image[o..o + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }

        let mut symbols = HashMap::new();
        let mut dup: Vec<String> = Vec::new();
        for s in &symbol_list {
            match symbols.insert(s.name.clone(), s.addr) {
                Some(prev) if prev != s.addr => dup.push(s.name.clone()),
                _ => {}
            }
        }
        for d in dup {
            // Prefer the global definition of a name that is also a local elsewhere.
            let globals: Vec<u64> = symbol_list
                .iter()
                .filter(|s| s.name == d && s.global)
                .map(|s| s.addr)
                .collect();
            match globals.as_slice() {
                [g] => {
                    symbols.insert(d, *g);
                }
                _ => {
                    symbols.remove(&d);
                }
            }
        }
        let mut text_ranges: Vec<Range<u64>> = self
            .placed
            .iter()
            .filter(|p| p.kind == Kind::Text && p.size > 0)
            .map(|p| load_addr + p.offset..load_addr + p.offset + p.size)
            .collect();
        if let Some(first) = self.stubs.values().min() {
            let last = self.stubs.values().max().copied().unwrap_or(*first);
            text_ranges.push(load_addr + first..load_addr + last + STUB_LEN);
        }
        Ok(LinkedImage {
            load_addr,
            bytes: image,
            symbols,
            symbol_list,
            text_ranges,
            regions: self.regions.clone(),
            eh_frame: self.eh_frame.map(|(o, l)| load_addr + o..load_addr + o + l),
            relaxed,
            sections: self
                .placed
                .iter()
                .map(|p| (p.name.clone(), load_addr + p.offset))
                .collect(),
        })
    }
}

/// [`Layout::of`] then [`Layout::link`].
pub fn link(
    object: &[u8],
    load_addr: u64,
    resolver: &dyn Fn(&str) -> Option<u64>,
) -> Result<LinkedImage, LinkError> {
    Layout::of(object)?.link(load_addr, resolver)
}

//! ELF files of a target: symbols (`.symtab` and `.dynsym`, file-local ones with the source file
//! they come from), build-id, load segments and unwind sections.
//!
//! A [`Module`] owns the file's bytes; everything else is an index into them, so a module can be
//! kept around (the unwinder caches one per mapped file) without re-reading the file.
//!
//! Symbol specifications, as users write them on the command line and as patch files store them:
//! - `name` — the only symbol of that name (several symbols at one address count as one);
//! - `name@file.c` — the symbol defined in source file `file.c` (from the `STT_FILE` entries that
//!   precede local symbols in `.symtab`; a bare basename matches a full path too);
//! - `name,N` — the N-th symbol of that name in `.symtab` order, 1-based (the kernel's
//!   `name,position`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use goblin::elf::{header, program_header, section_header, sym, Elf};
use thiserror::Error;

mod dynamic;
mod file_bytes;
mod symbol_spec;
use dynamic::DynTables;
use file_bytes::FileBytes;

/// `start` is the start of a mapping this process made to read an ELF file (not a module it
/// loaded): `maps::read` of our own process leaves those out.
pub(crate) fn is_own_file_mapping(start: u64) -> bool {
    file_bytes::is_own(start)
}
use symbol_spec::file_matches;
pub use symbol_spec::SymbolSpec;

/// Errors reading an ELF file.
#[derive(Debug, Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file does not start with the ELF magic.
    #[error("{0}: not an ELF file")]
    NotElf(String),
    /// The file is ELF but not something we handle (32-bit, big-endian, another machine).
    #[error("{path}: unsupported ELF: {reason}")]
    Unsupported {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The ELF structures are broken.
    #[error("{path}: malformed ELF: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// What goblin said.
        reason: String,
    },
}

/// Errors looking a symbol up by a specification (`name`, `name@file.c`, `name,N`).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LookupError {
    /// No symbol matches.
    #[error("symbol `{spec}` not found in {module}{}", clones_hint(.clones))]
    NotFound {
        /// What was asked for.
        spec: String,
        /// The module searched.
        module: String,
        /// gcc clones of that name (`name.isra.0`, `name.constprop.0`...), if any: the function
        /// exists only in specialised copies.
        clones: Vec<String>,
    },
    /// Several different symbols match a bare name.
    #[error("symbol `{name}` is ambiguous in {module}: candidates {}", .candidates.join(", "))]
    Ambiguous {
        /// The bare name.
        name: String,
        /// The module searched.
        module: String,
        /// Each candidate as an unambiguous spec, with its address.
        candidates: Vec<String>,
    },
    /// The specification itself is malformed (e.g. `name,0`).
    #[error("bad symbol specification `{0}` (expected name, name@file.c or name,N with N >= 1)")]
    BadSpec(String),
}

fn clones_hint(clones: &[String]) -> String {
    if clones.is_empty() {
        String::new()
    } else {
        format!(
            " (gcc made specialised copies of it: {})",
            clones.join(", ")
        )
    }
}

/// What a symbol names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SymbolKind {
    /// `STT_FUNC` (and `STT_GNU_IFUNC`).
    Function,
    /// `STT_OBJECT` / `STT_COMMON` / `STT_TLS`.
    Object,
    /// Anything else (`STT_NOTYPE`, sections, ...).
    Other,
}

/// A defined symbol of a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// The symbol name (no version suffix).
    pub name: String,
    /// Its address in the file (vaddr; add the load bias for the runtime address).
    pub value: u64,
    /// `st_size`.
    pub size: u64,
    /// Function, object, other.
    pub kind: SymbolKind,
    /// `STB_LOCAL` (a `static` in C).
    pub local: bool,
    /// `STT_GNU_IFUNC`: the value is a resolver, not the function.
    pub ifunc: bool,
    /// The source file a local symbol comes from (the preceding `STT_FILE` in `.symtab`).
    pub file: Option<String>,
    /// 1-based position among the `.symtab`/`.dynsym` symbols of the same name (`name,N`).
    pub position: usize,
    /// Found only in `.dynsym` (stripped file).
    pub dynamic_only: bool,
}

impl Symbol {
    /// `[value, value + size)`.
    pub fn contains(&self, vaddr: u64) -> bool {
        vaddr >= self.value && vaddr < self.value.saturating_add(self.size.max(1))
    }

    /// An unambiguous specification for this symbol: `name@file` for a local with a file,
    /// else `name,position` when there are several, else `name`.
    pub fn spec(&self, ambiguous: bool) -> String {
        match (&self.file, ambiguous) {
            (_, false) => self.name.clone(),
            (Some(f), true) if self.local => format!("{}@{}", self.name, f),
            _ => format!("{},{}", self.name, self.position),
        }
    }
}

/// A `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_memsz`.
    pub memsz: u64,
    /// `p_offset`.
    pub offset: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_align`.
    pub align: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
}

/// Where a section lives in the file and in the address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionRef {
    /// `sh_addr` (file vaddr; 0 in relocatable objects).
    pub vaddr: u64,
    /// `sh_offset`.
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
}

/// A parsed ELF file: an executable, a shared library or a relocatable object.
///
/// Opening one reads only its headers (segments, the sections the unwinder needs, the build-id);
/// the full symbol table (`.symtab` + `.dynsym`, file-local symbols with their source file,
/// positions) is built the first time something asks for it, and [`Module::exported`] answers
/// from `.dynsym` through `.gnu.hash` without building it at all. A fresh `livepatch apply` so
/// decodes only what it uses of the libraries a target maps.
#[derive(Clone, Debug)]
pub struct Module {
    name: String,
    data: Arc<FileBytes>,
    /// ET_EXEC, ET_DYN or ET_REL.
    elf_type: u16,
    build_id: Option<Vec<u8>>,
    segments: Vec<Segment>,
    eh_frame: Option<SectionRef>,
    eh_frame_hdr: Option<SectionRef>,
    text: Option<SectionRef>,
    dynamic: DynTables,
    /// Where a stripped file's separate debug file is looked for (captured when opened from a
    /// path; empty for bytes parsed from memory).
    debug_dirs: Vec<PathBuf>,
    /// Built on first use.
    full: OnceLock<Result<FullSymbols, String>>,
}

/// The symbol tables decoded: everything that needs a full parse of the file.
#[derive(Clone, Debug, Default)]
struct FullSymbols {
    symbols: Vec<Symbol>,
    /// Indices of `symbols` sorted by name (stable: table order among equal names), so that
    /// looking a name up in a large executable is a binary search, not a scan.
    by_name: Vec<u32>,
    /// (symbol name, vaddr of the GOT slot the dynamic linker fills for it).
    imports: Vec<(String, u64)>,
    /// Separate debug file the symbols came from.
    debug_file: Option<PathBuf>,
}

impl FullSymbols {
    fn index(mut self) -> FullSymbols {
        let symbols = &self.symbols;
        let mut order: Vec<u32> = (0..symbols.len() as u32).collect();
        order.sort_by(|&a, &b| symbols[a as usize].name.cmp(&symbols[b as usize].name));
        self.by_name = order;
        self
    }
}

impl Module {
    /// Reads and parses the file at `path`, symbol tables included (a malformed one is an
    /// error here). [`Module::open_lazy`] defers them.
    ///
    /// A stripped file (no `.symtab`, so no `static` symbols) gets the symbols of its separate
    /// debug file when one is installed: `<dir>/.build-id/xx/yyyy.debug` for each directory of
    /// `LIVEPATCH_DEBUG_DIRS` (colon-separated) or `/usr/lib/debug` (Debian's `-dbgsym` packages),
    /// checked to carry the same build-id.
    pub fn open(path: &Path) -> Result<Module, ElfError> {
        let module = Module::open_lazy(path)?;
        module.full()?;
        Ok(module)
    }

    /// Maps the file at `path` and reads its headers only: segments, build-id, the unwind
    /// sections, where the dynamic symbol table is. The symbol tables are decoded when first
    /// needed (a malformed one then reads as empty: lookups find nothing).
    pub fn open_lazy(path: &Path) -> Result<Module, ElfError> {
        let data = FileBytes::open(path).map_err(|source| ElfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut module = Module::from_bytes(&path.display().to_string(), data)?;
        module.debug_dirs = Self::debug_dirs();
        Ok(module)
    }

    /// Where separate debug files are looked for.
    pub fn debug_dirs() -> Vec<PathBuf> {
        match std::env::var_os("LIVEPATCH_DEBUG_DIRS") {
            Some(v) => std::env::split_paths(&v).collect(),
            None => vec![PathBuf::from("/usr/lib/debug")],
        }
    }

    /// The separate debug file whose symbols were merged, if any.
    pub fn debug_file(&self) -> Option<&Path> {
        self.full_or_empty().debug_file.as_deref()
    }

    /// A stripped file's symbols merged with those of its separate debug file, if one with the
    /// same build-id is installed.
    fn merge_debug_file(&self, full: &mut FullSymbols) {
        let Some(id) = self.build_id_hex().filter(|id| id.len() > 2) else {
            return;
        };
        for dir in &self.debug_dirs {
            let candidate = dir
                .join(".build-id")
                .join(&id[..2])
                .join(format!("{}.debug", &id[2..]));
            if !candidate.exists() {
                continue;
            }
            let Ok(debug) = Module::open_lazy(&candidate) else {
                continue;
            };
            if debug.build_id() != self.build_id() {
                continue;
            }
            let Ok((debug_full, true)) = debug.decode_symbols() else {
                continue;
            };
            let mut merged: Vec<Symbol> = debug_full
                .symbols
                .into_iter()
                .filter(|s| !s.dynamic_only)
                .collect();
            let seen: HashSet<(String, u64)> =
                merged.iter().map(|m| (m.name.clone(), m.value)).collect();
            for s in full.symbols.drain(..) {
                if !seen.contains(&(s.name.clone(), s.value)) {
                    merged.push(s);
                }
            }
            number_positions(&mut merged);
            full.symbols = merged;
            full.debug_file = Some(candidate);
            return;
        }
    }

    /// Parses ELF bytes, symbol tables included; `name` is used in error messages and as
    /// [`Module::name`].
    pub fn parse(name: &str, data: Vec<u8>) -> Result<Module, ElfError> {
        let module = Module::from_bytes(name, FileBytes::Owned(data))?;
        module.full()?;
        Ok(module)
    }

    /// The header-level parse shared by every constructor.
    fn from_bytes(name: &str, bytes: FileBytes) -> Result<Module, ElfError> {
        let data = bytes.bytes();
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            return Err(ElfError::NotElf(name.to_string()));
        }
        let unsupported = |reason: &str| ElfError::Unsupported {
            path: name.to_string(),
            reason: reason.to_string(),
        };
        if data.len() < 64 || data[4] != 2 {
            return Err(unsupported("not a 64-bit ELF"));
        }
        if data[5] != 1 {
            return Err(unsupported("not little-endian"));
        }
        let malformed = |e: goblin::error::Error| ElfError::Malformed {
            path: name.to_string(),
            reason: e.to_string(),
        };
        let header = Elf::parse_header(data).map_err(malformed)?;
        if header.e_machine != header::EM_X86_64 {
            return Err(unsupported("not an x86-64 file"));
        }
        let elf_type = header.e_type;
        if !matches!(elf_type, header::ET_EXEC | header::ET_DYN | header::ET_REL) {
            return Err(unsupported("not an executable, shared library or object"));
        }
        // Headers only: goblin's full parse would decode every symbol, string and relocation.
        let mut elf = Elf::lazy_parse(header).map_err(malformed)?;
        // 64-bit little-endian, checked above.
        let ctx = goblin::container::Ctx::new(
            goblin::container::Container::Big,
            goblin::container::Endian::Little,
        );
        elf.program_headers = program_header::ProgramHeader::parse(
            data,
            header.e_phoff as usize,
            header.e_phnum as usize,
            ctx,
        )
        .map_err(malformed)?;
        elf.section_headers = section_header::SectionHeader::parse(
            data,
            header.e_shoff as usize,
            header.e_shnum as usize,
            ctx,
        )
        .map_err(malformed)?;
        // Section names, read in place (goblin's string table would decode all of them).
        let shstrtab: &[u8] = elf
            .section_headers
            .get(header.e_shstrndx as usize)
            .and_then(|t| {
                let end = t.sh_offset.checked_add(t.sh_size)?;
                data.get(usize::try_from(t.sh_offset).ok()?..usize::try_from(end).ok()?)
            })
            .unwrap_or(&[]);
        let section_name = |off: usize| -> Option<&[u8]> {
            let s = shstrtab.get(off..)?;
            Some(&s[..s.iter().position(|&b| b == 0)?])
        };

        let segments = elf
            .program_headers
            .iter()
            .filter(|p| p.p_type == program_header::PT_LOAD)
            .map(|p| Segment {
                vaddr: p.p_vaddr,
                memsz: p.p_memsz,
                offset: p.p_offset,
                filesz: p.p_filesz,
                align: p.p_align,
                read: p.p_flags & program_header::PF_R != 0,
                write: p.p_flags & program_header::PF_W != 0,
                exec: p.p_flags & program_header::PF_X != 0,
            })
            .collect();

        let section = |wanted: &str| {
            elf.section_headers.iter().find_map(|sh| {
                let n = section_name(sh.sh_name)?;
                (n == wanted.as_bytes() && sh.sh_type != section_header::SHT_NOBITS).then_some(
                    SectionRef {
                        vaddr: sh.sh_addr,
                        offset: sh.sh_offset,
                        size: sh.sh_size,
                    },
                )
            })
        };
        let in_file = |s: &SectionRef| {
            s.offset
                .checked_add(s.size)
                .is_some_and(|e| e <= data.len() as u64)
        };
        let eh_frame = section(".eh_frame").filter(in_file);
        let eh_frame_hdr = section(".eh_frame_hdr").filter(in_file);
        let text = section(".text").filter(in_file);
        let dynamic = DynTables::find(&elf.section_headers, data.len() as u64);
        let build_id = Self::find_build_id(&elf, data);
        Ok(Module {
            name: name.to_string(),
            elf_type,
            build_id,
            segments,
            eh_frame,
            eh_frame_hdr,
            text,
            dynamic,
            debug_dirs: Vec::new(),
            full: OnceLock::new(),
            data: Arc::new(bytes),
        })
    }

    /// The symbol tables, decoded on first use.
    fn full(&self) -> Result<&FullSymbols, ElfError> {
        self.full
            .get_or_init(|| {
                let (mut full, has_symtab) = self.decode_symbols()?;
                if !has_symtab {
                    self.merge_debug_file(&mut full);
                }
                Ok(full.index())
            })
            .as_ref()
            .map_err(|reason| ElfError::Malformed {
                path: self.name.clone(),
                reason: reason.clone(),
            })
    }

    fn full_or_empty(&self) -> &FullSymbols {
        static EMPTY: OnceLock<FullSymbols> = OnceLock::new();
        self.full()
            .unwrap_or_else(|_| EMPTY.get_or_init(FullSymbols::default))
    }

    /// goblin's full parse: every symbol of `.symtab` and `.dynsym`, the imports. Also whether
    /// there is a `.symtab`.
    fn decode_symbols(&self) -> Result<(FullSymbols, bool), String> {
        let elf = Elf::parse(self.data()).map_err(|e| e.to_string())?;
        Ok((
            FullSymbols {
                symbols: Self::collect_symbols(&elf),
                by_name: Vec::new(),
                imports: Self::collect_imports(&elf),
                debug_file: None,
            },
            !elf.syms.is_empty(),
        ))
    }

    fn find_build_id(elf: &Elf, data: &[u8]) -> Option<Vec<u8>> {
        let from = |it: Option<goblin::elf::note::NoteIterator>| -> Option<Vec<u8>> {
            // goblin's note iterator keeps yielding the same error on a malformed note: stop
            // at the first one (found by fuzzing), and bound the walk.
            for note in it?.take(4096) {
                let Ok(note) = note else {
                    break;
                };
                if note.n_type == goblin::elf::note::NT_GNU_BUILD_ID && note.name == "GNU" {
                    return Some(note.desc.to_vec());
                }
            }
            None
        };
        from(elf.iter_note_headers(data)).or_else(|| from(elf.iter_note_sections(data, None)))
    }

    fn collect_imports(elf: &Elf) -> Vec<(String, u64)> {
        const R_X86_64_GLOB_DAT: u32 = 6;
        const R_X86_64_JUMP_SLOT: u32 = 7;
        let mut out = Vec::new();
        for r in elf.pltrelocs.iter().chain(elf.dynrelas.iter()) {
            if !matches!(r.r_type, R_X86_64_GLOB_DAT | R_X86_64_JUMP_SLOT) || r.r_sym == 0 {
                continue;
            }
            let Some(s) = elf.dynsyms.get(r.r_sym) else {
                continue;
            };
            if let Some(name) = elf.dynstrtab.get_at(s.st_name) {
                out.push((name.to_string(), r.r_offset));
            }
        }
        out
    }

    fn collect_symbols(elf: &Elf) -> Vec<Symbol> {
        let mut out: Vec<Symbol> = Vec::new();
        // .symtab first: it has the locals and the STT_FILE markers.
        let mut current_file: Option<String> = None;
        for s in elf.syms.iter() {
            let ty = s.st_type();
            if ty == sym::STT_FILE {
                current_file = elf
                    .strtab
                    .get_at(s.st_name)
                    .filter(|f| !f.is_empty())
                    .map(str::to_string);
                continue;
            }
            let bind = s.st_bind();
            let local = bind == sym::STB_LOCAL;
            if !local {
                // Globals come after all locals; STT_FILE scope ends there.
                current_file = None;
            }
            if let Some(symbol) = Self::make_symbol(&elf.strtab, &s, current_file.clone(), false) {
                out.push(symbol);
            }
        }
        // A `.dynsym` entry repeating a global already listed (same name and address) is the
        // same symbol. A set, not a scan of `out`: libc has thousands of them.
        let mut globals: HashSet<(String, u64)> = out
            .iter()
            .filter(|o| !o.local)
            .map(|o| (o.name.clone(), o.value))
            .collect();
        for s in elf.dynsyms.iter() {
            let Some(symbol) = Self::make_symbol(&elf.dynstrtab, &s, None, true) else {
                continue;
            };
            let key = (symbol.name.clone(), symbol.value);
            if globals.contains(&key) {
                continue;
            }
            if !symbol.local {
                globals.insert(key);
            }
            out.push(symbol);
        }
        number_positions(&mut out);
        out
    }

    fn make_symbol(
        strtab: &goblin::strtab::Strtab,
        s: &sym::Sym,
        file: Option<String>,
        dynamic: bool,
    ) -> Option<Symbol> {
        let ty = s.st_type();
        if s.st_shndx == section_header::SHN_UNDEF as usize
            || ty == sym::STT_SECTION
            || ty == sym::STT_FILE
        {
            return None;
        }
        let name = strtab.get_at(s.st_name)?;
        if name.is_empty() {
            return None;
        }
        let kind = match ty {
            sym::STT_FUNC | sym::STT_GNU_IFUNC => SymbolKind::Function,
            sym::STT_OBJECT | sym::STT_COMMON | sym::STT_TLS => SymbolKind::Object,
            _ => SymbolKind::Other,
        };
        let local = s.st_bind() == sym::STB_LOCAL;
        Some(Symbol {
            name: name.to_string(),
            value: s.st_value,
            size: s.st_size,
            kind,
            local,
            ifunc: ty == sym::STT_GNU_IFUNC,
            file: if local { file } else { None },
            position: 0,
            dynamic_only: dynamic,
        })
    }

    /// The name given at open/parse time (usually the path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw file bytes.
    pub fn data(&self) -> &[u8] {
        self.data.bytes()
    }

    /// All defined symbols (`.symtab` then the `.dynsym` ones not already seen). Decoded on
    /// first use; empty when the tables are malformed (only [`Module::open_lazy`] defers that
    /// error).
    pub fn symbols(&self) -> &[Symbol] {
        &self.full_or_empty().symbols
    }

    /// The `NT_GNU_BUILD_ID` note's bytes.
    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    /// The build-id as lowercase hex.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.as_deref().map(hex)
    }

    /// `ET_DYN` (a PIE executable or a shared library: loaded at a bias).
    pub fn is_position_independent(&self) -> bool {
        self.elf_type == header::ET_DYN
    }

    /// `ET_EXEC` (loaded at its link addresses).
    pub fn is_fixed_executable(&self) -> bool {
        self.elf_type == header::ET_EXEC
    }

    /// `ET_REL` (a `.o`).
    pub fn is_relocatable(&self) -> bool {
        self.elf_type == header::ET_REL
    }

    /// The `PT_LOAD` segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// `.eh_frame`, if present.
    pub fn eh_frame(&self) -> Option<SectionRef> {
        self.eh_frame
    }

    /// `.eh_frame_hdr`, if present.
    pub fn eh_frame_hdr(&self) -> Option<SectionRef> {
        self.eh_frame_hdr
    }

    /// `.text`, if present.
    pub fn text(&self) -> Option<SectionRef> {
        self.text
    }

    /// The bytes of a section found by [`Module::eh_frame`] etc.
    pub fn section_data(&self, s: SectionRef) -> &[u8] {
        // Bounds were checked at parse time.
        self.data()
            .get(s.offset as usize..s.offset.saturating_add(s.size) as usize)
            .unwrap_or(&[])
    }

    /// File offset of a file vaddr, through the `PT_LOAD` segment holding it (file-backed part).
    pub fn vaddr_to_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments.iter().find_map(|s| {
            (vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
                .then(|| s.offset.wrapping_add(vaddr - s.vaddr))
        })
    }

    /// `len` bytes of the file image at `vaddr` (as they are loaded, before relocation).
    pub fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let off = self.vaddr_to_offset(vaddr)?;
        let seg = self
            .segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)?;
        if vaddr - seg.vaddr > seg.filesz || len > seg.filesz - (vaddr - seg.vaddr) {
            return None;
        }
        let end = off.checked_add(len)?;
        self.data()
            .get(usize::try_from(off).ok()?..usize::try_from(end).ok()?)
    }

    /// The lowest `PT_LOAD` vaddr, rounded down to a page (where the image starts).
    pub fn min_vaddr(&self) -> u64 {
        self.segments.iter().map(|s| s.vaddr).min().unwrap_or(0) & !0xfff
    }

    /// The load bias given where file offset `offset` (page aligned) is mapped at runtime
    /// address `start` (a line of `/proc/PID/maps`): runtime = file vaddr + bias.
    pub fn load_bias(&self, start: u64, offset: u64) -> Option<u64> {
        let seg = self.segments.iter().find(|s| {
            let o = s.offset & !0xfff;
            offset >= o && offset < s.offset.saturating_add(s.filesz.max(1))
        })?;
        let vaddr_of_offset = (seg.vaddr & !0xfff).wrapping_add(offset - (seg.offset & !0xfff));
        Some(start.wrapping_sub(vaddr_of_offset))
    }

    /// Every symbol named `name`.
    pub fn by_name(&self, name: &str) -> Vec<&Symbol> {
        let full = self.full_or_empty();
        let (symbols, order) = (&full.symbols, &full.by_name);
        // `order` sorts indices by name, then by position in the table.
        let first = order.partition_point(|&i| symbols[i as usize].name.as_str() < name);
        order[first..]
            .iter()
            .map(|&i| &symbols[i as usize])
            .take_while(|s| s.name == name)
            .collect()
    }

    /// The symbol containing file vaddr `vaddr` (functions first).
    pub fn symbol_at(&self, vaddr: u64) -> Option<&Symbol> {
        self.symbols()
            .iter()
            .filter(|s| s.kind == SymbolKind::Function && s.contains(vaddr))
            .chain(
                self.symbols()
                    .iter()
                    .filter(|s| s.kind != SymbolKind::Function && s.contains(vaddr)),
            )
            .next()
    }

    /// Looks a symbol up by specification (`name`, `name@file.c`, `name,N`). A bare name that
    /// matches several symbols at different addresses is [`LookupError::Ambiguous`].
    pub fn lookup(&self, spec: &str) -> Result<&Symbol, LookupError> {
        let parsed = SymbolSpec::parse(spec)?;
        let not_found = || LookupError::NotFound {
            spec: spec.to_string(),
            module: self.name.clone(),
            clones: self.clones_of(parsed.name()),
        };
        match parsed {
            SymbolSpec::Position(name, n) => {
                self.by_name(name).get(n - 1).copied().ok_or_else(not_found)
            }
            SymbolSpec::InFile(name, file) => {
                let found: Vec<&Symbol> = self
                    .by_name(name)
                    .into_iter()
                    .filter(|s| s.file.as_deref().is_some_and(|f| file_matches(f, file)))
                    .collect();
                match found.as_slice() {
                    [] => Err(not_found()),
                    [one] => Ok(one),
                    many => Err(self.ambiguous(name, many)),
                }
            }
            SymbolSpec::Name(name) => {
                let found: Vec<&Symbol> = self.by_name(name);
                let Some(first) = found.first() else {
                    return Err(not_found());
                };
                if found.iter().all(|s| s.value == first.value) {
                    // Aliases of one address: prefer the sized, global one.
                    return Ok(found
                        .iter()
                        .max_by_key(|s| (s.size > 0, !s.local))
                        .copied()
                        .unwrap_or(first));
                }
                Err(self.ambiguous(name, &found))
            }
        }
    }

    /// The file vaddr of the GOT slot through which this module calls or reads the imported
    /// symbol `name` (a `JUMP_SLOT` or `GLOB_DAT` dynamic relocation). Reading the slot in the
    /// running process gives the address the dynamic linker bound — for an `STT_GNU_IFUNC`
    /// such as libc's `strlen`, the implementation chosen for this CPU (with lazy binding, a
    /// not-yet-bound slot holds the PLT path, which also works as a call target).
    pub fn import_slot(&self, name: &str) -> Option<u64> {
        if self.dynamic.usable() {
            return self.dynamic.import_slot(self.data(), name);
        }
        self.full_or_empty()
            .imports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// The definition of `name` this module exports to others, as the dynamic linker would
    /// bind it (`.dynsym`, the default version): looked up through `.gnu.hash` in place,
    /// without decoding the symbol tables. Files without section headers fall back to
    /// [`Module::global`].
    pub fn exported(&self, name: &str) -> Option<Symbol> {
        if self.dynamic.usable() {
            return self.dynamic.lookup(self.data(), name);
        }
        self.global(name).cloned()
    }

    /// gcc's specialised copies of function `name` (`name.isra.0`, `name.constprop.1`,
    /// `name.part.0`, `name.lto_priv.0`...), excluding `.cold` parts.
    pub fn clones_of(&self, name: &str) -> Vec<String> {
        let prefix = format!("{name}.");
        let mut out: Vec<String> = self
            .symbols()
            .iter()
            .filter(|s| s.kind == SymbolKind::Function && s.name.starts_with(&prefix))
            .filter(|s| !s.name.ends_with(".cold") && !s.name.contains(".cold."))
            .map(|s| s.name.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The `.cold` part of function `sym` (`name.cold`, code gcc moved out of line for unlikely
    /// paths). It is reached by a jump, not a call: a thread running it has no return address
    /// in `sym`, so a consistency check must treat `[cold.value, cold.value + cold.size)` as part
    /// of the function.
    pub fn cold_parts(&self, sym: &Symbol) -> Vec<&Symbol> {
        let cold = format!("{}.cold", sym.name);
        let numbered = format!("{cold}.");
        self.symbols()
            .iter()
            .filter(|s| {
                s.kind == SymbolKind::Function
                    && (s.name == cold || s.name.starts_with(&numbered))
                    && (s.file == sym.file || !s.local || !sym.local)
            })
            .collect()
    }

    /// The global (or weak) definition of `name`, ignoring file-local symbols: what the
    /// dynamic linker would bind a reference to.
    pub fn global(&self, name: &str) -> Option<&Symbol> {
        self.by_name(name).into_iter().find(|s| !s.local)
    }

    fn ambiguous(&self, name: &str, found: &[&Symbol]) -> LookupError {
        let mut candidates: Vec<String> = Vec::new();
        for s in found {
            // `name@file` only when it singles this symbol out, else `name,N`.
            let same_file = found.iter().filter(|o| o.local && o.file == s.file).count();
            let spec = if s.local && s.file.is_some() && same_file == 1 {
                s.spec(true)
            } else {
                format!("{},{}", s.name, s.position)
            };
            let c = format!("{spec} (0x{:x})", s.value);
            if !candidates.contains(&c) {
                candidates.push(c);
            }
        }
        LookupError::Ambiguous {
            name: name.to_string(),
            module: self.name.clone(),
            candidates,
        }
    }
}

/// The address a running process uses for imported symbol `name`, read from the GOT slot of the
/// first module (with its load bias) that imports it. This is how an `STT_GNU_IFUNC` such as
/// libc's `strlen` resolves to the implementation the dynamic linker picked, instead of its
/// resolver function. `None` when no module imports it or the slot cannot be read.
pub fn resolve_import<'m>(
    modules: impl IntoIterator<Item = (u64, &'m Module)>,
    name: &str,
    mem: &dyn crate::unwind::MemoryReader,
) -> Option<u64> {
    for (bias, m) in modules {
        if let Some(slot) = m.import_slot(name) {
            let mut b = [0u8; 8];
            if mem.read(bias.wrapping_add(slot), &mut b).is_ok() {
                let v = u64::from_le_bytes(b);
                if v != 0 {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Positions (`name,N`): order of appearance among symbols of the same name.
fn number_positions(symbols: &mut [Symbol]) {
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for s in symbols {
        let c = counts.entry(s.name.clone()).or_insert(0);
        *c += 1;
        s.position = *c;
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

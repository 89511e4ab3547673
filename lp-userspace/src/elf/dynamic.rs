//! What the dynamic linker sees of a module, read in place: exported symbols through `.gnu.hash`
//! (libc's 3,000 `.dynsym` entries are never all decoded to resolve the few names a patch uses)
//! and the GOT slots of imported symbols (`.rela.plt` / `.rela.dyn`).
//!
//! Every read is bounds-checked: the bytes may be a hostile file. A malformed table gives "not
//! found", never a panic or a loop (chains are bounded by the symbol count).

use super::{SectionRef, Symbol, SymbolKind};
use goblin::elf::{section_header as sh, sym};

const SYM_SIZE: u64 = 24;
const RELA_SIZE: u64 = 24;
const SHT_GNU_HASH: u32 = 0x6fff_fff6;
const SHT_GNU_VERSYM: u32 = 0x6fff_ffff;
const STB_GNU_UNIQUE: u8 = 10;
/// `.gnu.version` bit: the version is hidden (`name@VER`, not the default `name@@VER`).
const VERSYM_HIDDEN: u16 = 0x8000;

/// The sections of the dynamic symbol table, found through the section headers.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DynTables {
    dynsym: Option<SectionRef>,
    dynstr: Option<SectionRef>,
    gnu_hash: Option<SectionRef>,
    versym: Option<SectionRef>,
    /// `SHT_RELA` sections relocating against `.dynsym` (at most two in practice).
    relas: [Option<SectionRef>; 4],
}

/// One `Elf64_Sym`, as stored.
struct RawSym {
    name: u32,
    info: u8,
    shndx: u16,
    value: u64,
    size: u64,
}

fn u16_at(data: &[u8], off: u64) -> Option<u16> {
    let o = usize::try_from(off).ok()?;
    Some(u16::from_le_bytes(
        data.get(o..o.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(data: &[u8], off: u64) -> Option<u32> {
    let o = usize::try_from(off).ok()?;
    Some(u32::from_le_bytes(
        data.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(data: &[u8], off: u64) -> Option<u64> {
    let o = usize::try_from(off).ok()?;
    Some(u64::from_le_bytes(
        data.get(o..o.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The symbol hash of `.gnu.hash` (Bernstein's, h * 33 + c).
fn gnu_hash(name: &[u8]) -> u32 {
    name.iter().fold(5381u32, |h, &c| {
        h.wrapping_mul(33).wrapping_add(u32::from(c))
    })
}

impl DynTables {
    /// Finds the tables among `sections` (the file's section headers).
    pub(crate) fn find(sections: &[goblin::elf::SectionHeader], file_len: u64) -> DynTables {
        let in_file = |s: &goblin::elf::SectionHeader| {
            (s.sh_type != sh::SHT_NOBITS
                && s.sh_offset
                    .checked_add(s.sh_size)
                    .is_some_and(|e| e <= file_len))
            .then_some(SectionRef {
                vaddr: s.sh_addr,
                offset: s.sh_offset,
                size: s.sh_size,
            })
        };
        let mut t = DynTables::default();
        let Some(dynsym_idx) = sections.iter().position(|s| s.sh_type == sh::SHT_DYNSYM) else {
            return t;
        };
        let dynsym = &sections[dynsym_idx];
        t.dynsym = in_file(dynsym);
        t.dynstr = sections.get(dynsym.sh_link as usize).and_then(in_file);
        for s in sections {
            match s.sh_type {
                SHT_GNU_HASH if s.sh_link as usize == dynsym_idx => t.gnu_hash = in_file(s),
                SHT_GNU_VERSYM => t.versym = in_file(s),
                sh::SHT_RELA if s.sh_link as usize == dynsym_idx => {
                    if let Some(slot) = t.relas.iter_mut().find(|r| r.is_none()) {
                        *slot = in_file(s);
                    }
                }
                _ => {}
            }
        }
        t
    }

    /// A `.dynsym` and its string table were found: lookups here are complete.
    pub(crate) fn usable(&self) -> bool {
        self.dynsym.is_some() && self.dynstr.is_some()
    }

    fn count(&self) -> u64 {
        self.dynsym.map_or(0, |s| s.size / SYM_SIZE)
    }

    fn sym(&self, data: &[u8], i: u64) -> Option<RawSym> {
        let t = self.dynsym?;
        if i >= self.count() {
            return None;
        }
        let o = t.offset + i * SYM_SIZE;
        Some(RawSym {
            name: u32_at(data, o)?,
            info: *data.get(usize::try_from(o + 4).ok()?)?,
            shndx: u16_at(data, o + 6)?,
            value: u64_at(data, o + 8)?,
            size: u64_at(data, o + 16)?,
        })
    }

    fn name<'d>(&self, data: &'d [u8], off: u32) -> Option<&'d [u8]> {
        let t = self.dynstr?;
        let start = usize::try_from(t.offset.checked_add(u64::from(off))?).ok()?;
        let end = usize::try_from(t.offset.checked_add(t.size)?).ok()?;
        let s = data.get(start..end)?;
        Some(&s[..s.iter().position(|&b| b == 0)?])
    }

    fn hidden_version(&self, data: &[u8], i: u64) -> bool {
        self.versym
            .and_then(|v| u16_at(data, v.offset.checked_add(i * 2)?))
            .is_some_and(|v| v & VERSYM_HIDDEN != 0)
    }

    /// An exported definition: defined, global / weak / unique, a function or an object.
    fn exported(s: &RawSym) -> bool {
        let bind = s.info >> 4;
        let ty = s.info & 0xf;
        s.shndx != sh::SHN_UNDEF as u16
            && matches!(bind, sym::STB_GLOBAL | sym::STB_WEAK | STB_GNU_UNIQUE)
            && !matches!(ty, sym::STT_SECTION | sym::STT_FILE)
    }

    /// The exported definition of `name` the dynamic linker would bind an unversioned
    /// reference to: the default version (`name@@V`) over hidden ones (`name@V`).
    pub(crate) fn lookup(&self, data: &[u8], name: &str) -> Option<Symbol> {
        let candidates = match self.gnu_hash {
            Some(h) => self.gnu_chain(data, h, name.as_bytes()),
            None => (1..self.count())
                .map_while(|i| Some((i, self.sym(data, i)?)))
                .filter(|(_, s)| self.name(data, s.name) == Some(name.as_bytes()))
                .collect(),
        };
        let mut best: Option<(u64, RawSym)> = None;
        for (i, s) in candidates {
            if !Self::exported(&s) {
                continue;
            }
            let default = !self.hidden_version(data, i);
            if best.is_none() || default {
                best = Some((i, s));
            }
            if default {
                break;
            }
        }
        let (_, s) = best?;
        let ty = s.info & 0xf;
        Some(Symbol {
            name: name.to_string(),
            value: s.value,
            size: s.size,
            kind: match ty {
                sym::STT_FUNC | sym::STT_GNU_IFUNC => SymbolKind::Function,
                sym::STT_OBJECT | sym::STT_COMMON | sym::STT_TLS => SymbolKind::Object,
                _ => SymbolKind::Other,
            },
            local: false,
            ifunc: ty == sym::STT_GNU_IFUNC,
            file: None,
            position: 1,
            dynamic_only: true,
        })
    }

    /// The symbols named `name` in `.gnu.hash`'s chain for it (index, entry).
    fn gnu_chain(&self, data: &[u8], h: SectionRef, name: &[u8]) -> Vec<(u64, RawSym)> {
        let mut out = Vec::new();
        let hash = gnu_hash(name);
        let (Some(nbuckets), Some(symoffset), Some(bloom_size), Some(shift)) = (
            u32_at(data, h.offset),
            u32_at(data, h.offset + 4),
            u32_at(data, h.offset + 8),
            u32_at(data, h.offset + 12),
        ) else {
            return out;
        };
        if nbuckets == 0 || bloom_size == 0 {
            return out;
        }
        let bloom_at = h.offset + 16;
        let word = u64::from((hash / 64) % bloom_size);
        let Some(bloom) = u64_at(data, bloom_at + word * 8) else {
            return out;
        };
        let mask = (1u64 << (hash % 64)) | (1u64 << ((hash >> (shift % 32)) % 64));
        if bloom & mask != mask {
            return out; // certainly not here
        }
        let buckets_at = bloom_at + u64::from(bloom_size) * 8;
        let chains_at = buckets_at + u64::from(nbuckets) * 4;
        let Some(mut i) = u32_at(data, buckets_at + u64::from(hash % nbuckets) * 4).map(u64::from)
        else {
            return out;
        };
        if i < u64::from(symoffset) {
            return out;
        }
        // A chain never has more entries than the table: bound it against hostile input.
        while i < self.count() {
            let Some(ch) = u32_at(data, chains_at + (i - u64::from(symoffset)) * 4) else {
                break;
            };
            if ch | 1 == hash | 1 {
                if let Some(s) = self.sym(data, i) {
                    if self.name(data, s.name) == Some(name) {
                        out.push((i, s));
                    }
                }
            }
            if ch & 1 == 1 {
                break;
            }
            i += 1;
        }
        out
    }

    /// The file vaddr of the GOT slot filled for imported `name` (`JUMP_SLOT` or `GLOB_DAT`).
    pub(crate) fn import_slot(&self, data: &[u8], name: &str) -> Option<u64> {
        const R_X86_64_GLOB_DAT: u64 = 6;
        const R_X86_64_JUMP_SLOT: u64 = 7;
        for r in self.relas.iter().flatten() {
            for k in 0..r.size / RELA_SIZE {
                let o = r.offset + k * RELA_SIZE;
                let (Some(offset), Some(info)) = (u64_at(data, o), u64_at(data, o + 8)) else {
                    break;
                };
                let (ty, si) = (info & 0xffff_ffff, info >> 32);
                if !matches!(ty, R_X86_64_GLOB_DAT | R_X86_64_JUMP_SLOT) || si == 0 {
                    continue;
                }
                let named = self
                    .sym(data, si)
                    .and_then(|s| self.name(data, s.name))
                    .is_some_and(|n| n == name.as_bytes());
                if named {
                    return Some(offset);
                }
            }
        }
        None
    }
}

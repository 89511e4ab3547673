//! `/proc/PID/maps`: what a process has mapped, which files (modules) they come from, and where
//! there is room for patch code within a rel32 jump of a module.

use std::path::PathBuf;

use thiserror::Error;

/// Errors reading or parsing a maps file.
#[derive(Debug, Error)]
pub enum MapsError {
    /// `/proc/PID/maps` could not be read (no such process, no permission).
    #[error("cannot read /proc/{pid}/maps: {source}")]
    Io {
        /// The process.
        pid: i32,
        /// The cause.
        source: std::io::Error,
    },
    /// The file asked about in [`processes_mapping`] cannot be examined.
    #[error("cannot stat {path}: {source}")]
    Stat {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line does not have the maps format.
    #[error("malformed maps line {line}: `{text}`")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `r`.
    pub read: bool,
    /// `w`.
    pub write: bool,
    /// `x`.
    pub exec: bool,
    /// `s` (shared) rather than `p`.
    pub shared: bool,
    /// File offset of `start`.
    pub offset: u64,
    /// `major:minor`.
    pub dev: String,
    /// Inode (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `/memfd:x`...), without ` (deleted)`.
    pub path: Option<String>,
    /// The file was deleted (or replaced) after it was mapped.
    pub deleted: bool,
}

impl Mapping {
    /// Anonymous memory or a pseudo-file like `[heap]`: not backed by an ELF file.
    pub fn is_anonymous(&self) -> bool {
        self.inode == 0 || self.path.as_deref().is_none_or(|p| !p.starts_with('/'))
    }

    /// `[start, end)` contains `addr`.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }

    /// The file name used in `/proc/PID/map_files/`.
    pub fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

/// All mappings of one file (one inode on one device), in address order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedModule {
    /// The path as shown in maps.
    pub path: String,
    /// Shown as ` (deleted)`: open through [`MappedModule::open_path`].
    pub deleted: bool,
    /// The mappings, lowest first.
    pub mappings: Vec<Mapping>,
}

impl MappedModule {
    /// Where file offset 0 would be mapped (first mapping's start minus its offset). For an ELF
    /// whose first `PT_LOAD` has vaddr `v` at offset 0 the load bias is `base - v`; use
    /// [`crate::elf::Module::load_bias`] to compute it exactly.
    pub fn base(&self) -> u64 {
        let m = &self.mappings[0];
        m.start.wrapping_sub(m.offset)
    }

    /// Lowest mapped address.
    pub fn start(&self) -> u64 {
        self.mappings[0].start
    }

    /// Highest mapped address (exclusive).
    pub fn end(&self) -> u64 {
        self.mappings.iter().map(|m| m.end).max().unwrap_or(0)
    }

    /// `[start, end)` contains `addr` (any of its mappings, including gaps in between).
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start() && addr < self.end()
    }

    /// The executable mappings.
    pub fn exec_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.mappings
            .iter()
            .filter(|m| m.exec)
            .map(|m| (m.start, m.end))
    }

    /// From the lowest start to the highest end of the executable mappings (`None` when none
    /// is executable): the code range an unwinder registers the module for.
    pub fn exec_span(&self) -> Option<(u64, u64)> {
        let start = self.exec_ranges().map(|r| r.0).min()?;
        Some((start, self.exec_ranges().map(|r| r.1).max()?))
    }

    /// Path to open the file from this process: the path itself, or for a deleted file
    /// `/proc/PID/map_files/<range of the first mapping>` (needs CAP_SYS_ADMIN, we are root).
    pub fn open_path(&self, pid: i32) -> PathBuf {
        if self.deleted || !std::path::Path::new(&self.path).exists() {
            PathBuf::from(format!(
                "/proc/{pid}/map_files/{}",
                self.mappings[0].map_files_name()
            ))
        } else {
            PathBuf::from(&self.path)
        }
    }

    /// The file name part of the path (`libc.so.6`).
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// The load bias for `module` (the parsed ELF of this file): runtime = file vaddr + bias.
    pub fn load_bias(&self, module: &crate::elf::Module) -> Option<u64> {
        let m = &self.mappings[0];
        module.load_bias(m.start, m.offset)
    }
}

/// Parses the text of a maps file.
pub fn parse(text: &str) -> Result<Vec<Mapping>, MapsError> {
    // One line per mapping: sized once (a growing vector copied itself ~6 times for a small
    // process).
    let mut out = Vec::with_capacity(text.bytes().filter(|&b| b == b'\n').count() + 1);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(line).ok_or_else(|| MapsError::Malformed {
            line: i + 1,
            text: line.to_string(),
        })?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Option<Mapping> {
    // "start-end perms offset dev inode          path"; the path may contain spaces.
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        (!f.is_empty()).then_some(f)
    };
    let range = field()?;
    let perms = field()?.as_bytes();
    let offset = u64::from_str_radix(field()?, 16).ok()?;
    let dev = field()?.to_string();
    let inode: u64 = field()?.parse().ok()?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if perms.len() != 4 || end < start {
        return None;
    }
    let mut path = rest.trim_start().to_string();
    let mut deleted = false;
    if let Some(p) = path.strip_suffix(" (deleted)") {
        path = p.to_string();
        deleted = true;
    }
    Some(Mapping {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        dev,
        inode,
        path: (!path.is_empty()).then_some(path),
        deleted,
    })
}

/// Reads and parses `/proc/PID/maps`.
///
/// For this very process, the read-only mappings through which the tool itself reads ELF files
/// ([`crate::elf::Module::open_lazy`]) are left out: they are not modules loaded by the
/// program, and counting them would make a library look mapped by us (`processes_mapping`) or
/// give it a second, wrong load address (`modules`).
pub fn read(pid: i32) -> Result<Vec<Mapping>, MapsError> {
    let text =
        crate::process::proc_dir::maps(pid).map_err(|source| MapsError::Io { pid, source })?;
    let mut mappings = parse(&text)?;
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        mappings.retain(|m| !crate::elf::is_own_file_mapping(m.start));
    }
    Ok(mappings)
}

/// Groups file-backed mappings by file (device + inode), in order of first appearance.
pub fn modules(mappings: &[Mapping]) -> Vec<MappedModule> {
    let mut out: Vec<MappedModule> = Vec::new();
    for m in mappings.iter().filter(|m| !m.is_anonymous()) {
        let path = m.path.clone().unwrap_or_default();
        if let Some(existing) = out.iter_mut().find(|x| {
            x.mappings[0].inode == m.inode && x.mappings[0].dev == m.dev && x.path == path
        }) {
            existing.mappings.push(m.clone());
        } else {
            out.push(MappedModule {
                path,
                deleted: m.deleted,
                mappings: vec![m.clone()],
            });
        }
    }
    out
}

/// The module whose path is `name` or ends with `/name`.
pub fn find_module<'a>(modules: &'a [MappedModule], name: &str) -> Option<&'a MappedModule> {
    modules
        .iter()
        .find(|m| m.path == name)
        .or_else(|| modules.iter().find(|m| m.file_name() == name))
}

/// Lowest address a process may map (vm.mmap_min_addr is 64 KiB by default).
const MIN_ADDR: u64 = 0x10000;
/// One past the highest user address on x86-64 with 4-level paging, minus a guard page.
const MAX_ADDR: u64 = 0x7fff_ffff_f000;
/// Reach of a rel32 displacement.
const REACH: u64 = 1 << 31;

/// A free, page-aligned range of `size` bytes (rounded up to pages) such that every byte in it is
/// within ±2 GiB of every byte of `[lo, hi)` (so a rel32 jump or call reaches both ways), as close
/// to the module as possible. One free page is kept on each side of existing mappings so that a
/// patch never extends a neighbouring mapping. `None` when there is no room.
pub fn find_free_near(mappings: &[Mapping], lo: u64, hi: u64, size: u64) -> Option<u64> {
    const PAGE: u64 = 0x1000;
    // A size within a page of u64::MAX cannot be rounded up (nor placed).
    let size = size.max(1).checked_next_multiple_of(PAGE)?;
    // The allowed window for the whole region [a, a + size).
    let win_lo = hi.saturating_sub(REACH).max(MIN_ADDR).div_ceil(PAGE) * PAGE;
    let win_hi = (lo.saturating_add(REACH)).min(MAX_ADDR) & !(PAGE - 1);
    if win_hi <= win_lo || win_hi - win_lo < size {
        return None;
    }
    let mut used: Vec<(u64, u64)> = mappings
        .iter()
        .map(|m| (m.start.saturating_sub(PAGE), m.end.saturating_add(PAGE)))
        .collect();
    used.sort_unstable();
    // Walk the gaps between used ranges, clipped to the window; keep the candidate closest to
    // the module.
    let mut best: Option<(u64, u64)> = None; // (distance, address)
    let mut consider = |gap_lo: u64, gap_hi: u64| {
        let g_lo = gap_lo.max(win_lo);
        let g_hi = gap_hi.min(win_hi);
        if g_hi <= g_lo || g_hi - g_lo < size {
            return;
        }
        // Closest placement inside the gap: right after it if the gap is above the module,
        // right before its end if below.
        let addr = if g_lo >= hi { g_lo } else { g_hi - size };
        let dist = if addr >= hi {
            addr - hi
        } else {
            lo.saturating_sub(addr + size)
        };
        if best.is_none_or(|(d, _)| dist < d) {
            best = Some((dist, addr));
        }
    };
    let mut cursor = 0u64;
    for (s, e) in used {
        if s > cursor {
            consider(cursor, s);
        }
        cursor = cursor.max(e);
    }
    consider(cursor, u64::MAX);
    best.map(|(_, a)| a)
}

/// `major:minor` as shown in maps (hex) → the numbers.
fn parse_dev(dev: &str) -> Option<(u64, u64)> {
    let (maj, min) = dev.split_once(':')?;
    Some((
        u64::from_str_radix(maj, 16).ok()?,
        u64::from_str_radix(min, 16).ok()?,
    ))
}

/// The processes that map `path` (compared by device and inode, so symlinks and other names of
/// the same file count). Processes that vanish or deny access meanwhile are skipped.
pub fn processes_mapping(path: &std::path::Path) -> Result<Vec<i32>, MapsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|source| MapsError::Stat {
        path: path.display().to_string(),
        source,
    })?;
    let want_dev = (
        libc::major(meta.dev()) as u64,
        libc::minor(meta.dev()) as u64,
    );
    let want_ino = meta.ino();
    let mut pids = Vec::new();
    let dir = std::fs::read_dir("/proc").map_err(|source| MapsError::Io { pid: 0, source })?;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(mappings) = read(pid) else {
            continue;
        };
        if mappings
            .iter()
            .any(|m| m.inode == want_ino && parse_dev(&m.dev) == Some(want_dev))
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

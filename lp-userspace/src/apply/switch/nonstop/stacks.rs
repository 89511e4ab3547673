//! Whether a thread's stack refers to the bytes behind an `int3` (settle's and the uninstall's
//! waits, review N3): a return address of a displaced `call`, or a signal frame's saved rip,
//! leading back into them. The stack is searched from the thread's stack pointer to the end
//! of the mapping it is in.

use super::th;
use crate::process::vma_query::{Covering, VmaQuery};
use crate::process::Memory;
use lp_core::consistency::CodeRange;

/// How far above a thread's stack pointer its stack is searched for an address inside the
/// displaced bytes (see [`stack_refers_to`]) at most: the search goes to the end of the
/// mapping the stack pointer is in — the thread's live frames, a signal handler's however
/// deep (its locals lie between the stack pointer and the signal frame above them: a fixed
/// 32 KiB missed a handler with 64 KiB of locals, review session 4 S11) — but not beyond 1 MiB.
const STACK_SCAN_MAX: u64 = 1024 * 1024;

/// How far the search goes when no mapping is known to hold the stack pointer.
const UNMAPPED_SCAN: u64 = 32 * 1024;

/// Pages read at once inside one mapping (a read that fails is made again page by page).
const CHUNK: u64 = 16 * th::PAGE;

/// Where the target's mappings end: asked of the kernel for each address (`PROCMAP_QUERY`, a
/// few µs, never stale), else read from the maps text once at the first need (~100 µs here)
/// and again when it has no mapping for an address (a thread created since). A thread's stack
/// mapping, and so its end, stays as it was for the thread's life (its frames all lie between
/// its stack pointer and that end): a text read after the thread was listed holds it however
/// long a wait lasts, so one `Mappings` serves a wait's checks and looks — the settle's
/// borrowed thread and the threads a `MovedOn` listed before it.
pub(super) struct Mappings {
    pid: i32,
    /// The kernel's answers: not opened yet (None), or opened, or not available (Some(None)).
    query: Option<Option<VmaQuery>>,
    read: Option<Vec<(u64, u64)>>,
}

impl Mappings {
    pub(super) fn new(pid: i32) -> Mappings {
        Mappings {
            pid,
            query: None,
            read: None,
        }
    }

    /// The end of the mapping holding `addr` (None when none does, or the process is gone).
    fn end_of(&mut self, addr: u64) -> Option<u64> {
        let pid = self.pid;
        if let Some(q) = self.query.get_or_insert_with(|| VmaQuery::open(pid)) {
            match q.covering(addr) {
                Covering::Mapping { end, .. } => return Some(end),
                Covering::Nothing => return None,
                // An older kernel, or the process is going: the text tells.
                Covering::Unknown => self.query = Some(None),
            }
        }
        self.find(addr).or_else(|| {
            self.read = None;
            self.find(addr)
        })
    }

    fn find(&mut self, addr: u64) -> Option<u64> {
        let pid = self.pid;
        let maps = self.read.get_or_insert_with(|| {
            crate::process::proc_dir::maps(pid)
                .map(|m| {
                    m.lines()
                        .filter_map(|l| {
                            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                            Some((
                                u64::from_str_radix(a, 16).ok()?,
                                u64::from_str_radix(b, 16).ok()?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        maps.iter()
            .find(|(a, b)| (*a..*b).contains(&addr))
            .map(|(_, b)| *b)
    }
}

/// Whether the stack above `sp` (to the end of its mapping, at most [`STACK_SCAN_MAX`]) holds
/// an 8-byte word that is an address inside `ranges`: a return address or a signal frame's
/// saved rip leading back into them.
pub(super) fn stack_refers_to(
    mem: &Memory,
    maps: &mut Mappings,
    sp: u64,
    ranges: &[CodeRange],
) -> bool {
    let mut addr = sp & !7;
    let end = maps
        .end_of(addr)
        .unwrap_or(addr.saturating_add(UNMAPPED_SCAN))
        .min(addr.saturating_add(STACK_SCAN_MAX));
    let mut buf = vec![0u8; CHUNK as usize];
    while addr < end {
        let len = (CHUNK - addr % th::PAGE).min(end - addr) as usize;
        let Some(read) = read_pages(mem, addr, &mut buf[..len]) else {
            return false;
        };
        let hit = buf[..read].chunks_exact(8).any(|w| {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            ranges.iter().any(|r| r.contains(v))
        });
        if hit {
            return true;
        }
        if read < len {
            return false; // the rest is not mapped
        }
        addr += len as u64;
    }
    false
}

/// Reads `buf.len()` bytes at `addr` in one read, or else page by page up to the first page
/// that cannot be read (a page is mapped whole or not at all): how many bytes were read,
/// `None` when not even the first page could be.
fn read_pages(mem: &Memory, addr: u64, buf: &mut [u8]) -> Option<usize> {
    use crate::unwind::MemoryReader;
    if MemoryReader::read(mem, addr, buf).is_ok() {
        return Some(buf.len());
    }
    let mut done = 0;
    while done < buf.len() {
        let at = addr + done as u64;
        let len = ((th::PAGE - at % th::PAGE) as usize).min(buf.len() - done);
        if MemoryReader::read(mem, at, &mut buf[done..done + len]).is_err() {
            break;
        }
        done += len;
    }
    (done > 0).then_some(done)
}

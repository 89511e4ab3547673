//! Whether a thread's stack refers to the bytes behind an `int3` (settle's and the uninstall's
//! waits, review N3): a return address of a displaced `call`, or a signal frame's saved rip,
//! leading back into them. The stack is searched from the thread's stack pointer to the end
//! of the mapping it is in — and, when a signal handler runs on an alternate stack
//! (`sigaltstack`, `SA_ONSTACK`), on from the stack pointer its signal frame saved: the
//! interrupted context's frames lie on the thread's own stack, not above the handler's
//! (review 11: a frame there with rip between a site's instructions was missed, and the
//! thread resumed in the middle of the new jump).

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
/// its stack pointer and that end, or below a signal frame on an alternate stack): a text read
/// after the thread was listed holds it however long a wait lasts, so one `Mappings` serves a
/// wait's checks and looks — the settle's borrowed thread and the threads a `MovedOn` listed
/// before it. (An alternate stack mapped after the read is not in the text: read again.)
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

/// Stacks searched for one thread at most: its alternate stack's, then those below the signal
/// frames found there (nested handlers: each alternate-stack frame whose interrupted context
/// was on another stack).
const MAX_STACKS: usize = 4;

/// Whether the stack above `sp` (to the end of its mapping, at most [`STACK_SCAN_MAX`]) holds
/// an 8-byte word that is an address inside `ranges`: a return address or a signal frame's
/// saved rip leading back into them. A signal frame found there that a handler on an
/// alternate stack left (see [`off_stack_contexts`]) has the search go on from the stack
/// pointer it saved, to the end of that one's mapping.
pub(super) fn stack_refers_to(
    mem: &Memory,
    maps: &mut Mappings,
    sp: u64,
    ranges: &[CodeRange],
) -> bool {
    search_stack(mem, maps, sp, ranges) == Search::Refers
}

/// What [`search_stack`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Search {
    /// A word inside the ranges.
    Refers,
    /// None, in the whole of each stack.
    Clear,
    /// None in what was searched, but not all was: a stack deeper than [`STACK_SCAN_MAX`], one
    /// in no mapping known, or more than [`MAX_STACKS`] of them.
    Partly,
}

/// [`stack_refers_to`], telling a search that covered every stack whole from one that did not.
pub(super) fn search_stack(
    mem: &Memory,
    maps: &mut Mappings,
    sp: u64,
    ranges: &[CodeRange],
) -> Search {
    let mut todo = vec![sp];
    let mut searched: Vec<std::ops::Range<u64>> = Vec::new();
    let mut whole = true;
    while let Some(sp) = todo.pop() {
        let start = sp & !7;
        if searched.iter().any(|r| r.contains(&start)) {
            continue;
        }
        let mapped = maps.end_of(start);
        // A word that only looked like a signal frame's saved stack pointer (the test of
        // `off_stack_contexts` is a heuristic): in no mapping, no frame lies there.
        if mapped.is_none() && !searched.is_empty() {
            continue;
        }
        if searched.len() == MAX_STACKS {
            whole = false;
            break;
        }
        let end = mapped
            .unwrap_or(start.saturating_add(UNMAPPED_SCAN))
            .min(start.saturating_add(STACK_SCAN_MAX));
        whole &= mapped == Some(end);
        let Some(stack) = read_stack(mem, start, end, ranges) else {
            return Search::Refers;
        };
        whole &= stack.len() as u64 == end - start; // a page that could not be read
        todo.extend(off_stack_contexts(start, &stack));
        searched.push(start..end);
    }
    if whole {
        Search::Clear
    } else {
        Search::Partly
    }
}

/// The bytes from `start` to `end` (8-aligned), read in chunks up to the first page that
/// cannot be read; None as soon as a word is an address inside `ranges`.
fn read_stack(mem: &Memory, start: u64, end: u64, ranges: &[CodeRange]) -> Option<Vec<u8>> {
    let mut stack = Vec::new();
    let mut addr = start;
    while addr < end {
        let len = (CHUNK - addr % th::PAGE).min(end - addr) as usize;
        let at = stack.len();
        stack.resize(at + len, 0);
        let Some(read) = read_pages(mem, addr, &mut stack[at..]) else {
            stack.truncate(at);
            break;
        };
        stack.truncate(at + read);
        let hit = stack[at..].chunks_exact(8).any(|w| {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            ranges.iter().any(|r| r.contains(v))
        });
        if hit {
            return None;
        }
        if read < len {
            break; // the rest is not mapped
        }
        addr += len as u64;
    }
    Some(stack)
}

// A signal frame as the kernel builds it on x86-64 (`struct rt_sigframe`: the restorer's
// address, then `struct ucontext`), offsets from its first word.
/// `uc_flags`: UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS at most.
const UC_FLAGS: usize = 8;
/// `uc_link`: always 0.
const UC_LINK: usize = 16;
/// `uc_stack`: the thread's alternate stack when the signal came (`ss_sp`, `ss_flags`, `ss_size`).
const SS_SP: usize = 24;
const SS_FLAGS: usize = 32;
const SS_SIZE: usize = 40;
/// `uc_mcontext.rsp`: the interrupted context's stack pointer.
const SAVED_RSP: usize = 48 + 15 * 8;

/// The stack pointers saved by the signal frames in `stack` (read at `at`) that were built on
/// an alternate stack — their `uc_stack` (the alternate stack the kernel recorded) holds the
/// frame itself — for a context that ran off it: the frames of that context lie there.
fn off_stack_contexts(at: u64, stack: &[u8]) -> Vec<u64> {
    let words: Vec<u64> = stack
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect();
    let w = |k: usize, off: usize| words[k + off / 8];
    (0..words.len().saturating_sub(SAVED_RSP / 8))
        .filter_map(|k| {
            let frame = at + 8 * k as u64;
            let (ss_sp, ss_size) = (w(k, SS_SP), w(k, SS_SIZE));
            // The alternate stack it names holds it (the cheap test first: few words pass).
            let on_alt = ss_sp <= frame && frame - ss_sp < ss_size;
            let plausible = on_alt
                && w(k, UC_FLAGS) <= 7
                && w(k, UC_LINK) == 0
                && w(k, SS_FLAGS) as u32
                    & !(libc::SS_ONSTACK | libc::SS_DISABLE) as u32
                    & !(1 << 31)
                    == 0;
            let rsp = w(k, SAVED_RSP);
            (plausible && rsp.wrapping_sub(ss_sp) >= ss_size).then_some(rsp)
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as the kernel writes it at `at + off`: on an alternate stack `alt` (0..0 when
    /// the thread has none), for a context whose stack pointer was `rsp`.
    fn frame(stack: &mut [u8], off: usize, alt: (u64, u64), rsp: u64) {
        let mut put =
            |i: usize, v: u64| stack[off + i..off + i + 8].copy_from_slice(&v.to_le_bytes());
        put(0, 0x40_1000); // the restorer
        put(UC_FLAGS, 7);
        put(UC_LINK, 0);
        put(SS_SP, alt.0);
        put(SS_FLAGS, if alt.1 == 0 { 2 } else { 0 });
        put(SS_SIZE, alt.1);
        put(SAVED_RSP, rsp);
    }

    #[test]
    fn a_frame_on_an_alternate_stack_leads_to_the_interrupted_stack() {
        let at = 0x7000_0000u64;
        let mut stack = vec![0u8; 4096];
        // Interrupted on its own stack: followed.
        frame(&mut stack, 1024, (at - 0x1000, 0x2000), 0x7ffd_0000);
        assert_eq!(off_stack_contexts(at, &stack), vec![0x7ffd_0000]);
        // Nested on the alternate stack itself: nothing more to search.
        frame(&mut stack, 1024, (at - 0x1000, 0x2000), at + 2048);
        assert!(off_stack_contexts(at, &stack).is_empty());
        // A frame on the thread's own stack (no alternate stack): its context is above it.
        frame(&mut stack, 1024, (0, 0), 0x7ffd_0000);
        assert!(off_stack_contexts(at, &stack).is_empty());
    }
}

//! The target side of an apply: which module the patch is for, where it is loaded, and whether
//! the running code is exactly what the patch was built against. Nothing here writes.

use super::error::Error;
use crate::elf::{Module, Symbol, SymbolSpec};
use crate::maps::{self, MappedModule, Mapping};
use crate::patchfile::Patch;
use crate::process::Memory;
use crate::state::State;
use std::sync::Arc;

/// The patch's target module as loaded in the process.
pub(crate) struct LoadedTarget {
    pub mappings: Vec<Mapping>,
    pub module: MappedModule,
    pub elf: Arc<Module>,
    pub bias: u64,
}

/// Finds the module the patch is for and checks its build-id.
pub(crate) fn locate(pid: i32, patch: &Patch) -> Result<LoadedTarget, Error> {
    let mappings = maps::read(pid)?;
    let modules = maps::modules(&mappings);
    let module = maps::find_module(&modules, &patch.target_name)
        .ok_or_else(|| {
            // A process that exited and is not reaped yet has no mappings left.
            if crate::process::is_gone_or_zombie(pid) {
                return crate::process::ProcessError::Exited(pid).into();
            }
            Error::Mismatch(format!(
                "process {pid} has no module {} mapped (the patch's target)",
                patch.target_name
            ))
        })?
        .clone();
    let elf = super::modules::open(&module.open_path(pid))?;
    let found = elf.build_id_hex().unwrap_or_else(|| "none".into());
    let want = patch.target_build_id_hex();
    if elf.build_id() != Some(&patch.target_build_id[..]) {
        return Err(Error::Mismatch(format!(
            "build-id mismatch: {} in process {pid} has build-id {found}, the patch was built for {want}",
            module.path
        )));
    }
    let bias = module.load_bias(&elf).ok_or_else(|| {
        Error::Other(format!(
            "cannot compute the load address of {}",
            module.path
        ))
    })?;
    Ok(LoadedTarget {
        mappings,
        module,
        elf,
        bias,
    })
}

/// Checks that every old function's bytes in memory are what the patch expects: the original
/// bytes, except where an earlier patch of ours wrote its redirect (recorded in the state).
pub(crate) fn verify_bytes(
    pid: i32,
    mem: &Memory,
    code: &CodeSnapshot,
    target: &LoadedTarget,
    patch: &Patch,
    state: &State,
) -> Result<(), Error> {
    for f in &patch.functions {
        let old = target.bias + f.old_vaddr;
        let current = code.read_vec(mem, old, f.old_bytes.len())?;
        let mut expected = f.old_bytes.clone();
        if let Some(top) = top_redirect(state, old) {
            let off = (top.patch_addr - old) as usize;
            expected[off..off + top.written.len()].copy_from_slice(&top.written);
        }
        // Callers inside this function that a patch of another function retargeted.
        overlay_call_sites(state, old, &mut expected);
        if let Some(i) = (0..current.len()).find(|&i| current[i] != expected[i]) {
            return Err(Error::Mismatch(format!(
                "function {} at {:#x} in process {pid} is not what the patch expects \
                 (byte {i}: found {:#04x}, expected {:#04x}): changed by someone else",
                f.old_name,
                old + i as u64,
                current[i],
                expected[i]
            )));
        }
    }
    Ok(())
}

/// The bytes of the target's code an apply reads before it writes — each old function, each
/// caller's branch — read in one read per cluster of nearby ranges instead of one per range:
/// every read of /proc/PID/mem is a system call that walks the target's page tables (a few
/// microseconds each, more on a busy machine), and a 10-function patch with a caller each
/// made 30 of them (the checks', then the plans' own). What is read here decides nothing
/// alone: the switch reads every site again and refuses to write one whose bytes are not its
/// plan's expected ones (`switch::read_verified`).
pub(crate) struct CodeSnapshot {
    chunks: Vec<(u64, Vec<u8>)>,
}

/// Ranges at most this far apart share a read (the bytes between cost less than a system
/// call), up to [`CLUSTER_MAX`] bytes per read.
const CLUSTER_GAP: u64 = 4096;
const CLUSTER_MAX: u64 = 64 * 1024;

impl CodeSnapshot {
    /// Reads `ranges` (address, length) now. A cluster that cannot be read as a whole (an
    /// unmapped page between two ranges) is left out: its ranges are read one by one when
    /// asked for, and fail as they would have.
    pub(crate) fn read(mem: &Memory, ranges: impl IntoIterator<Item = (u64, usize)>) -> Self {
        let mut ranges: Vec<(u64, u64)> = ranges
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(at, len)| (at, at.saturating_add(len as u64)))
            .collect();
        ranges.sort_unstable();
        let mut clusters: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ranges {
            match clusters.last_mut() {
                Some(c)
                    if start <= c.1.saturating_add(CLUSTER_GAP)
                        && end.max(c.1) - c.0 <= CLUSTER_MAX =>
                {
                    c.1 = c.1.max(end);
                }
                _ => clusters.push((start, end)),
            }
        }
        let chunks = clusters
            .into_iter()
            .filter_map(|(start, end)| {
                let len = usize::try_from(end - start).ok()?;
                Some((start, mem.read_vec(start, len).ok()?))
            })
            .collect();
        CodeSnapshot { chunks }
    }

    /// `len` bytes at `addr`: from the snapshot when it holds them, else read from `mem` now.
    pub(crate) fn read_vec(
        &self,
        mem: &Memory,
        addr: u64,
        len: usize,
    ) -> Result<Vec<u8>, crate::process::ProcessError> {
        let end = addr.saturating_add(len as u64);
        for (start, bytes) in &self.chunks {
            if addr >= *start && end <= start + bytes.len() as u64 {
                let off = (addr - start) as usize;
                return Ok(bytes[off..off + len].to_vec());
            }
        }
        mem.read_vec(addr, len)
    }
}

/// Writes into `expected` (the bytes of a function at `start`) what the applied patches wrote
/// over call sites inside it: the newest record of each site.
fn overlay_call_sites(state: &State, start: u64, expected: &mut [u8]) {
    let end = start + expected.len() as u64;
    for p in &state.patches {
        for c in p.functions.iter().flat_map(|f| &f.call_sites) {
            if c.addr >= start && c.addr + c.written.len() as u64 <= end {
                let off = (c.addr - start) as usize;
                expected[off..off + c.written.len()].copy_from_slice(&c.written);
            }
        }
    }
}

/// The newest applied redirect of function `old`, if any.
pub(crate) fn top_redirect(state: &State, old: u64) -> Option<&crate::state::AppliedFunction> {
    state
        .patches
        .iter()
        .rev()
        .flat_map(|p| p.functions.iter())
        .find(|f| f.old == old)
}

/// Resolves symbol names referenced by the patch object: the target module first (its static
/// functions and variables included), then the other modules' exported symbols (libc...), each
/// module opened only when a name gets that far.
///
/// A name is resolved to one symbol identity, never by bare name alone: `name@file.c` and
/// `name,N` (asm labels in the patch source) pick exactly that symbol; a bare `name` binds like
/// the static linker would bind it — the target's global definition, or its only symbol of that
/// name (a `static` the patch declared `extern`) — and is refused as ambiguous otherwise. A
/// replaced function resolves to its old entry, which jumps to the newest version: a reference
/// to `helper@b.c` reaches the new `helper` of b.c, a bare `helper` naming another symbol (a.c's
/// or a global one) reaches that one, whatever was replaced.
pub(crate) struct Resolver<'a> {
    pid: i32,
    loaded: &'a LoadedTarget,
    target_bias: u64,
    target: &'a Module,
    /// The other modules, listed when a name is first looked for beyond the target (a patch
    /// that calls nothing outside its module never needs them).
    others: std::sync::OnceLock<Vec<super::modules::LazyModule>>,
    mem: &'a crate::process::Memory,
}

impl<'a> Resolver<'a> {
    pub(crate) fn new(
        pid: i32,
        target: &'a LoadedTarget,
        mem: &'a crate::process::Memory,
    ) -> Result<Resolver<'a>, Error> {
        Ok(Resolver {
            pid,
            loaded: target,
            target_bias: target.bias,
            target: &target.elf,
            others: std::sync::OnceLock::new(),
            mem,
        })
    }

    fn others(&self) -> &[super::modules::LazyModule] {
        self.others.get_or_init(|| {
            super::modules::lazy(self.pid, &self.loaded.mappings)
                .into_iter()
                .filter(|m| m.module.path != self.loaded.module.path)
                .collect()
        })
    }

    /// The target's symbol that reference `name` means, if any.
    fn target_symbol(&self, name: &str) -> Option<&'a Symbol> {
        let target: &'a Module = self.target;
        match SymbolSpec::parse(name) {
            Ok(SymbolSpec::Name(bare)) => {
                let all = target.by_name(bare);
                let globals: Vec<&Symbol> = all.iter().copied().filter(|s| !s.local).collect();
                match globals.first() {
                    // Aliases of one address count as one definition.
                    Some(g) if globals.iter().all(|s| s.value == g.value) => globals
                        .iter()
                        .copied()
                        .max_by_key(|s| s.size > 0)
                        .or(Some(g)),
                    Some(_) => None,
                    None => target.lookup(bare).ok(),
                }
            }
            Ok(_) => target.lookup(name).ok(),
            Err(_) => None,
        }
    }

    /// The runtime address of `name`.
    pub(crate) fn resolve(&self, name: &str) -> Option<u64> {
        if let Some(s) = self.target_symbol(name) {
            if !s.ifunc {
                return Some(self.target_bias + s.value);
            }
        }
        // What the other modules export (.dynsym through .gnu.hash, no full parse), then,
        // rarely, a global only their .symtab knows.
        let exported = self.others().iter().find_map(|o| {
            o.get().and_then(|(m, bias)| {
                let s = m.exported(name).filter(|s| s.ifunc || s.value != 0)?;
                Some((s, bias))
            })
        });
        let found = exported.or_else(|| {
            self.others().iter().find_map(|o| {
                o.get()
                    .and_then(|(m, bias)| Some((m.global(name)?.clone(), bias)))
            })
        });
        let (s, bias) = found?;
        if !s.ifunc && s.value != 0 {
            return Some(bias + s.value);
        }
        if s.ifunc {
            // An IFUNC (libc's strlen...): take what the dynamic linker chose, from the GOT
            // slot of a module that imports it.
            let modules = std::iter::once((self.target_bias, self.target)).chain(
                self.others()
                    .iter()
                    .filter_map(|o| o.get().map(|(m, b)| (b, m))),
            );
            return crate::elf::resolve_import(modules, name, self.mem);
        }
        None
    }
}

//! The target side of an apply: which module the patch is for, where it is loaded, and whether
//! the running code is exactly what the patch was built against. Nothing here writes.

use super::error::Error;
use crate::elf::Module;
use crate::maps::{self, MappedModule, Mapping};
use crate::patchfile::Patch;
use crate::process::Memory;
use crate::state::State;
use std::collections::HashMap;
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
    target: &LoadedTarget,
    patch: &Patch,
    state: &State,
) -> Result<(), Error> {
    for f in &patch.functions {
        let old = target.bias + f.old_vaddr;
        let current = mem.read_vec(old, f.old_bytes.len())?;
        let mut expected = f.old_bytes.clone();
        if let Some(top) = top_redirect(state, old) {
            let off = (top.patch_addr - old) as usize;
            expected[off..off + top.written.len()].copy_from_slice(&top.written);
        }
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
/// functions and variables included), then every other module's exported symbols (libc...).
pub(crate) struct Resolver<'a> {
    target_bias: u64,
    target: &'a Module,
    others: Vec<(u64, Arc<Module>)>,
    /// Replaced function name → its old entry (which jumps to the newest version).
    replaced: HashMap<String, u64>,
    mem: &'a crate::process::Memory,
}

impl<'a> Resolver<'a> {
    pub(crate) fn new(
        pid: i32,
        target: &'a LoadedTarget,
        patch: &Patch,
        mem: &'a crate::process::Memory,
    ) -> Result<Resolver<'a>, Error> {
        let others = super::modules::loaded(pid, &target.mappings)
            .into_iter()
            .filter(|(m, _, _)| m.path != target.module.path)
            .map(|(_, elf, bias)| (bias, elf))
            .collect();
        let replaced = patch
            .functions
            .iter()
            .map(|f| {
                (
                    bare_name(&f.old_name).to_string(),
                    target.bias + f.old_vaddr,
                )
            })
            .collect();
        Ok(Resolver {
            target_bias: target.bias,
            target: &target.elf,
            others,
            replaced,
            mem,
        })
    }

    /// The runtime address of `name`.
    pub(crate) fn resolve(&self, name: &str) -> Option<u64> {
        if let Some(&a) = self.replaced.get(name) {
            return Some(a);
        }
        if let Ok(s) = self.target.lookup(name) {
            if !s.ifunc {
                return Some(self.target_bias + s.value);
            }
        }
        for (bias, m) in &self.others {
            if let Some(s) = m.global(name) {
                if !s.ifunc && s.value != 0 {
                    return Some(bias + s.value);
                }
                if s.ifunc {
                    // An IFUNC (libc's strlen...): take what the dynamic linker chose, from
                    // the GOT slot of a module that imports it.
                    let modules = std::iter::once((self.target_bias, self.target))
                        .chain(self.others.iter().map(|(b, m)| (*b, &**m)));
                    return crate::elf::resolve_import(modules, name, self.mem);
                }
            }
        }
        None
    }
}

/// `name@file.c` / `name,N` → `name`.
pub(crate) fn bare_name(spec: &str) -> &str {
    spec.split(['@', ',']).next().unwrap_or(spec)
}

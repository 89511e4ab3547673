//! `livepatch pack`: a patch made by hand from a target file and a relocatable object holding new
//! versions of some of its functions.
//!
//! Which functions are replaced:
//! - without `--replace`: every global function defined in the object whose name is the name of a
//!   function of the target (global or file-local; an ambiguous name is an error that lists the
//!   candidates and says how to pick one with `--replace`);
//! - with `--replace OLD[=NEW]` (repeatable): exactly the pairs given. `OLD` is a specification in
//!   the target (`name`, `name@file.c`, `name,N`); `NEW` defaults to OLD's bare name.
//!
//! Refused as well: writable data of the object named like data of the target (the new code
//! would get a fresh copy of state the running program keeps elsewhere).
//!
//! The patch also lists, per replaced function, the target's direct callers of it
//! ([`call_sites`]): apply points them straight at the new code.

mod call_sites;

use std::path::Path;
use std::str::FromStr;

use thiserror::Error;

use crate::elf::{LookupError, Module, SymbolKind, SymbolSpec};
use crate::link::{Layout, LinkError};
use crate::patchfile::{FunctionPatch, Patch};

/// One `--replace OLD[=NEW]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    /// The old function in the target (`name`, `name@file.c`, `name,N`).
    pub old: String,
    /// The new function in the object; `None` = OLD's bare name.
    pub new: Option<String>,
}

impl FromStr for Replacement {
    type Err = PackError;

    fn from_str(s: &str) -> Result<Self, PackError> {
        let (old, new) = match s.split_once('=') {
            Some((o, n)) => (o.trim(), Some(n.trim())),
            None => (s.trim(), None),
        };
        let bad = || PackError::BadReplacement(s.to_string());
        SymbolSpec::parse(old).map_err(|_| bad())?;
        if new.is_some_and(|n| n.is_empty() || n.contains(['@', ',', '='])) {
            return Err(bad());
        }
        Ok(Replacement {
            old: old.to_string(),
            new: new.map(str::to_string),
        })
    }
}

/// Errors of `pack`, one line each.
#[derive(Debug, Error)]
pub enum PackError {
    /// Reading or parsing the target failed (including "not an ELF file").
    #[error("target: {0}")]
    Target(crate::elf::ElfError),
    /// Reading or parsing the object failed.
    #[error("object: {0}")]
    Object(crate::elf::ElfError),
    /// The object is not `ET_REL`.
    #[error("object {0} is not a relocatable object (compile it with gcc -c -fPIC)")]
    NotRelocatable(String),
    /// The object could not be linked (unsupported section, relocation...).
    #[error("{0}")]
    Link(#[from] LinkError),
    /// The target has no GNU build-id.
    #[error("target {0} has no GNU build-id note (link it with -Wl,--build-id)")]
    NoBuildId(String),
    /// A `--replace` argument does not parse.
    #[error(
        "bad --replace `{0}` (expected OLD or OLD=NEW; OLD may be name, name@file.c or name,N)"
    )]
    BadReplacement(String),
    /// Nothing to replace.
    #[error("no function replaced: no global function of the object has the name of a function of the target (use --replace OLD=NEW)")]
    NothingReplaced,
    /// The old function is not found or ambiguous in the target.
    #[error("{0}")]
    OldFunction(LookupError),
    /// A default (same-name) replacement whose name is ambiguous in the target.
    #[error("{0}; pick one with --replace NAME@FILE.c=NEW or --replace NAME,N=NEW")]
    AmbiguousDefault(LookupError),
    /// The object defines writable data named like data of the target: the new code would
    /// silently get a fresh copy instead of the running program's state.
    #[error("the object defines writable data `{0}` like the target does: new code would get a fresh copy, not the running program's state (declare it extern; for a static of the target use an asm label, see docs/patch-format.md)")]
    ShadowedState(String),
    /// The old symbol is not a function with a size.
    #[error("`{0}` in the target is not a function with a known size")]
    NotAFunction(String),
    /// The new function is not defined in the object.
    #[error("function `{0}` is not defined in the object")]
    NewNotFound(String),
    /// The same old function replaced twice.
    #[error("function `{0}` is replaced twice")]
    Duplicate(String),
    /// The old function's bytes are not in the file.
    #[error("the bytes of `{0}` are not in the target file")]
    NoBytes(String),
}

/// Builds a patch for `target` from the new functions in `object`.
pub fn pack(target: &Path, object: &Path, replace: &[Replacement]) -> Result<Patch, PackError> {
    let target_mod = Module::open(target).map_err(PackError::Target)?;
    let object_mod = Module::open(object).map_err(PackError::Object)?;
    if !object_mod.is_relocatable() {
        return Err(PackError::NotRelocatable(object.display().to_string()));
    }
    let build_id = target_mod
        .build_id()
        .ok_or_else(|| PackError::NoBuildId(target.display().to_string()))?
        .to_vec();
    // Fail now, not at apply time, on objects the linker cannot handle.
    let layout = Layout::of(object_mod.data())?;
    let defined = layout.defined_functions();

    let mut pairs: Vec<(String, String)> = Vec::new(); // (old spec, new name)
    if replace.is_empty() {
        for (name, global) in &defined {
            if !global {
                continue;
            }
            let is_target_fn = target_mod
                .by_name(name)
                .iter()
                .any(|s| s.kind == SymbolKind::Function);
            if is_target_fn {
                pairs.push((name.clone(), name.clone()));
            }
        }
        if pairs.is_empty() {
            return Err(PackError::NothingReplaced);
        }
    } else {
        for r in replace {
            let spec =
                SymbolSpec::parse(&r.old).map_err(|_| PackError::BadReplacement(r.old.clone()))?;
            let new = r.new.clone().unwrap_or_else(|| spec.name().to_string());
            pairs.push((r.old.clone(), new));
        }
    }

    let explicit = !replace.is_empty();
    let mut functions: Vec<FunctionPatch> = Vec::new();
    for (old_spec, new_name) in pairs {
        if !defined.iter().any(|(n, _)| *n == new_name) {
            return Err(PackError::NewNotFound(new_name));
        }
        let old = target_mod.lookup(&old_spec).map_err(|e| match e {
            LookupError::Ambiguous { .. } if !explicit => PackError::AmbiguousDefault(e),
            e => PackError::OldFunction(e),
        })?;
        if old.kind != SymbolKind::Function || old.size == 0 || old.ifunc {
            return Err(PackError::NotAFunction(old_spec));
        }
        if functions.iter().any(|f| f.old_vaddr == old.value) {
            return Err(PackError::Duplicate(old_spec));
        }
        let bytes = target_mod
            .bytes_at(old.value, old.size)
            .ok_or_else(|| PackError::NoBytes(old_spec.clone()))?;
        // Record the spec that finds this very symbol in the target again.
        let ambiguous = target_mod
            .by_name(&old.name)
            .iter()
            .any(|s| s.value != old.value);
        let recorded = if ambiguous {
            unambiguous_spec(&target_mod, old)
        } else {
            old.name.clone()
        };
        functions.push(FunctionPatch {
            old_name: recorded,
            old_vaddr: old.value,
            old_size: old.size,
            old_bytes: bytes.to_vec(),
            new_name,
            call_sites: Vec::new(),
        });
    }
    let entries: Vec<u64> = functions.iter().map(|f| f.old_vaddr).collect();
    let replaced: Vec<(u64, u64)> = functions
        .iter()
        .map(|f| (f.old_vaddr, f.old_vaddr + f.old_size))
        .collect();
    for (f, sites) in functions
        .iter_mut()
        .zip(call_sites::find(&target_mod, &entries, &replaced))
    {
        f.call_sites = sites;
    }
    // A patch's own writable variable named like one of the target (`counter`, or a function's
    // `static` `calls.0` vs `calls.1`) is almost always a bug: the new code would count from
    // scratch while the old state lives on unseen (the classic "static locals" trap).
    let base = |n: &str| n.split('.').next().unwrap_or(n).to_string();
    for var in layout.defined_writable_objects() {
        let shadows = target_mod.symbols().iter().any(|s| {
            s.kind == SymbolKind::Object
                && (s.name == var || (var.contains('.') && base(&s.name) == base(&var)))
        });
        if shadows {
            return Err(PackError::ShadowedState(var));
        }
    }
    let target_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| target.display().to_string());
    Ok(Patch::new(
        target_name,
        build_id,
        functions,
        object_mod.data().to_vec(),
    ))
}

/// `name@file` if that picks exactly `sym`, else `name,N`.
fn unambiguous_spec(module: &Module, sym: &crate::elf::Symbol) -> String {
    if let (true, Some(file)) = (sym.local, &sym.file) {
        let spec = format!("{}@{}", sym.name, file);
        if module.lookup(&spec).is_ok_and(|s| s.value == sym.value) {
            return spec;
        }
    }
    format!("{},{}", sym.name, sym.position)
}

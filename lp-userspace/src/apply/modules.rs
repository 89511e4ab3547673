//! Parsed ELF modules, cached for the life of this process (keyed by device, inode, size and
//! modification time), so that repeated operations — the Python bindings, the stress test, the
//! benchmarks — parse libc and friends once instead of on every apply.

use super::error::Error;
use crate::elf::Module;
use crate::maps::{self, MappedModule, Mapping};
use crate::unwind::{CfiSource, Unwinder};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

type Key = (u64, u64, u64, i64, i64);

fn cache() -> &'static Mutex<HashMap<Key, Arc<Module>>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<Module>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Opens (or reuses) the parsed module at `path`.
pub(crate) fn open(path: &Path) -> Result<Arc<Module>, Error> {
    let key = std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
    if let Some(k) = key {
        if let Some(m) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&k) {
            return Ok(m.clone());
        }
    }
    let module = Arc::new(Module::open(path)?);
    if let Some(k) = key {
        cache()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k, module.clone());
    }
    Ok(module)
}

/// Every file-backed module of the process with its parsed ELF and load bias (modules that
/// cannot be read are left out).
pub(crate) fn loaded(pid: i32, mappings: &[Mapping]) -> Vec<(MappedModule, Arc<Module>, u64)> {
    let mut out = Vec::new();
    for m in maps::modules(mappings) {
        if m.path.starts_with("/memfd:") {
            continue;
        }
        let Ok(elf) = open(&m.open_path(pid)) else {
            continue;
        };
        if let Some(bias) = m.load_bias(&elf) {
            out.push((m, elf, bias));
        }
    }
    out
}

/// An unwinder over the CFI of every module of the process (built from the cache).
pub(crate) fn unwinder(pid: i32) -> Result<Unwinder, Error> {
    let mappings = maps::read(pid)?;
    let mut u = Unwinder::new();
    for (m, elf, bias) in loaded(pid, &mappings) {
        let (Some(start), Some(end)) = (
            m.exec_ranges().map(|r| r.0).min(),
            m.exec_ranges().map(|r| r.1).max(),
        ) else {
            continue;
        };
        if let Some(src) = CfiSource::from_module(&elf, bias, start, end) {
            u.add(src);
        }
    }
    crate::debug_info::add_patch_cfi(pid, &mut u);
    Ok(u)
}

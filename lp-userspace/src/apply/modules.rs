//! Parsed ELF modules, cached for the life of this process (keyed by device, inode, size and
//! modification time), so that repeated operations — the Python bindings, the stress test, the
//! benchmarks — parse libc and friends once instead of on every apply.
//!
//! Opening is lazy ([`Module::open_lazy`]: the file is mapped, only its headers read), and so
//! is everything built from the modules here: a fresh `livepatch apply` opens a library only
//! when the linker needs one of its symbols or an unwind reaches its code.

use super::error::Error;
use super::iced_tables::{self, Tables};
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
    let module = Arc::new(Module::open_lazy(path)?);
    if let Some(k) = key {
        cache()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k, module.clone());
    }
    Ok(module)
}

/// One file-backed module of a process, opened (through the cache) on first use.
pub(crate) struct LazyModule {
    pub module: MappedModule,
    path: std::path::PathBuf,
    opened: OnceLock<Option<(Arc<Module>, u64)>>,
}

impl LazyModule {
    fn new(pid: i32, module: MappedModule) -> LazyModule {
        LazyModule {
            path: module.open_path(pid),
            module,
            opened: OnceLock::new(),
        }
    }

    /// The parsed module and its load bias; `None` when it cannot be read.
    pub fn get(&self) -> Option<(&Module, u64)> {
        self.opened
            .get_or_init(|| {
                let elf = open(&self.path).ok()?;
                let bias = self.module.load_bias(&elf)?;
                Some((elf, bias))
            })
            .as_ref()
            .map(|(m, b)| (&**m, *b))
    }
}

/// Every file-backed module of the process, in address order, none opened yet.
pub(crate) fn lazy(pid: i32, mappings: &[Mapping]) -> Vec<LazyModule> {
    maps::modules(mappings)
        .into_iter()
        .filter(|m| !m.path.starts_with("/memfd:"))
        .map(|m| LazyModule::new(pid, m))
        .collect()
}

/// What an apply gives the stack check of its stop-mode switch ([`unwinder`]) so that it does
/// not read them again: the mappings and the state, read after attaching, and a handle on the
/// process's memory. (The unwinder is made once for the whole switch, retries included, so
/// it never used mappings newer than the switch's start anyway; a module mapped since is one
/// it has no CFI for: its frames end the unwind there, and the stack is scanned
/// conservatively instead, see `stacks::collect`. The state changes only by this process
/// until it detaches.)
struct Primed {
    mappings: Vec<Mapping>,
    state: crate::state::State,
    mem: crate::process::Memory,
}

static PRIMED: Mutex<std::collections::BTreeMap<i32, Primed>> =
    Mutex::new(std::collections::BTreeMap::new());

fn primed() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<i32, Primed>> {
    PRIMED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands the next [`unwinder`] of `pid` the mappings read after attaching (the text kept for
/// livepatch's own mappings, see `maps_text`), `state` and a handle on `mem`. Withdrawn when
/// the returned guard is dropped, if no unwinder took it. `None`: nothing handed over (the
/// unwinder reads what it needs itself).
pub(crate) fn prime_unwinder(
    pid: i32,
    mem: &crate::process::Memory,
    state: &crate::state::State,
) -> Option<PrimedUnwinder> {
    let text = crate::process::maps_text::ours(pid).ok()?;
    let mappings = maps::parse(&text).ok()?;
    let mem = mem.try_clone().ok()?;
    primed().insert(
        pid,
        Primed {
            mappings,
            state: state.clone(),
            mem,
        },
    );
    Some(PrimedUnwinder { pid })
}

/// Withdraws what [`prime_unwinder`] handed over when dropped.
pub(crate) struct PrimedUnwinder {
    pid: i32,
}

impl Drop for PrimedUnwinder {
    fn drop(&mut self) {
        primed().remove(&self.pid);
    }
}

/// An unwinder over the CFI of every module of the process, each module's read (through the
/// cache) when an unwind first reaches its code, and over the patches applied earlier.
pub(crate) fn unwinder(pid: i32) -> Result<Unwinder, Error> {
    let primed = primed().remove(&pid);
    let mappings = match &primed {
        Some(p) => p.mappings.clone(),
        None => maps::read(pid)?,
    };
    let mut u = Unwinder::new();
    for m in maps::modules(&mappings) {
        if m.path.starts_with("/memfd:") {
            continue;
        }
        let Some((start, end)) = m.exec_span() else {
            continue;
        };
        let path = m.open_path(pid);
        u.add_lazy(
            start,
            end,
            Box::new(move || {
                let elf = open(&path).ok()?;
                let bias = m.load_bias(&elf)?;
                CfiSource::from_shared_module(elf, bias, start, end)
            }),
        );
    }
    if let Some(v) = mappings
        .iter()
        .find(|m| m.path.as_deref() == Some("[vdso]"))
    {
        let v = v.clone();
        u.add_lazy(
            v.start,
            v.end,
            Box::new(move || Unwinder::vdso_source(pid, &v)),
        );
    }
    match primed {
        Some(p) => crate::debug_info::add_state_cfi(&p.state, &p.mem, &mut u),
        None => crate::debug_info::add_patch_cfi(pid, &mut u),
    }
    crate::cli::trace_point("unwinder made");
    Ok(u)
}

/// Work a fresh process would otherwise do on the critical path, started on a thread of its
/// own (or given to the command line's helper, see `super::helper`) so that it overlaps what the tracer thread does meanwhile (reading maps, attaching,
/// reading the state, remote system calls: mostly waiting on the kernel):
/// - lp-core's instruction decoder and encoder (iced-x86) build their tables on first use,
///   about 1.5 ms of CPU together (only a nonstop revert asks this thread for them, encoder
///   included; an apply builds the decoder's on its calling thread). The tracer waits for
///   them (asleep, see [`super::iced_tables`]) only when it reaches its first decode or
///   encode before they are done.
/// - the symbol tables of the module an apply patches (handed over with
///   [`WarmUp::mappings`]) are decoded, for the linker and the busy ranges;
/// - every executable module of `pid` is opened (mapped, headers read: no symbols, no CFI),
///   so that an unwind during the stop that reaches one finds it in the cache. The modules
///   are those of the mappings handed over with [`WarmUp::mappings`] (the tracer reads them
///   anyway: one read of /proc/PID/maps less), or read here when the handle is dropped
///   without.
/// - the CPU's vector state for thunks ([`crate::thunk::VectorState::of_system`]): each
///   `cpuid` traps to the hypervisor in a VM, ~20 µs, and std's first feature test makes
///   several;
/// - then the gdb files of processes that are gone are removed from /tmp.
pub(crate) fn warm_up(pid: i32) -> WarmUp {
    spawn_warm_up(pid, iced_tables::claim())
}

/// [`warm_up`] without the tables: for a caller that builds them on its own thread meanwhile
/// (apply, see there).
pub(crate) fn warm_up_modules(pid: i32) -> WarmUp {
    spawn_warm_up(pid, false)
}

/// The warm-up thread; `tables`: this thread has claimed the building of iced's tables.
fn spawn_warm_up(pid: i32, tables: bool) -> WarmUp {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<Mapping>, Option<Arc<Module>>)>(1);
    let spawned = super::helper::run_or_spawn("livepatch-warm", move || {
        // cpuid traps to the hypervisor in a VM: asked here, not in the tracer's prepare.
        crate::thunk::VectorState::warm();
        if tables {
            // Only a nonstop revert starts this thread with the tables: its code
            // assembler needs the encoder's too.
            iced_tables::build_claimed(Tables::Encoder);
        }
        let (mappings, target) = match rx.recv() {
            Ok((mappings, target)) => (Some(mappings), target),
            Err(_) => (maps::read(pid).ok(), None),
        };
        // The target's symbol tables: the linker and the busy ranges (`.cold` parts) need them,
        // on the tracer's path, a few hundred microseconds of decoding in a fresh process.
        if let Some(target) = target {
            let _ = target.symbols();
        }
        if let Some(mappings) = mappings {
            for m in maps::modules(&mappings) {
                if m.exec_ranges().next().is_some() && !m.path.starts_with("/memfd:") {
                    let _ = open(&m.open_path(pid));
                }
            }
        }
        // Housekeeping no apply waits for (the thread may be cut short by our exit).
        crate::debug_info::remove_stale_files();
    });
    if spawned.is_err() && tables {
        iced_tables::unclaim();
    }
    WarmUp { mappings: tx }
}

/// The warm-up thread started by [`warm_up`], waiting for the process's mappings.
pub(crate) struct WarmUp {
    mappings: std::sync::mpsc::SyncSender<(Vec<Mapping>, Option<Arc<Module>>)>,
}

impl WarmUp {
    /// Hands the warm-up thread the process's mappings, read by the caller, and the module
    /// being patched, whose symbols it decodes first.
    pub(crate) fn mappings(self, mappings: &[Mapping], target: &Arc<Module>) {
        let _ = self
            .mappings
            .send((mappings.to_vec(), Some(target.clone())));
    }
}

/// Every iced-x86 table lp-core and nonstop mode's code assembler use, the encoder's
/// included, built (or being built by the warm-up thread: then waited for, asleep) when this
/// returns.
pub(crate) fn warm_instruction_tables() {
    iced_tables::need(Tables::Encoder);
}

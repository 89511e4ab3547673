//! The patch state kept *inside* the target: a memfd mapping named `livepatch-state` holding
//! the list of applied patches (ids, times, target module, old → new addresses, the bytes each
//! redirect replaced, where the patch code lives). Any later invocation of the tool finds it
//! through `/proc/PID/maps` and reads it through `/proc/PID/mem`, so `status` and `revert` work
//! after the tool that applied the patch has exited or crashed; the state dies with the process.
//!
//! Layout: a 64-byte header (magic, version, active slot, lengths) followed by two slots. A new
//! state is written to the inactive slot and then published by rewriting the header, so a tool
//! killed in the middle of an update leaves the previous state readable.
//!
//! Write-ahead: before a switch writes its first byte, the state is stored with the patch it
//! puts in (or takes out) and the operation marked [`Unfinished`] (staged before the switch,
//! published once the threads are stopped and found not busy, so that a tool killed while it
//! waits for a busy thread leaves no mark); the switch's commit stores the final state without
//! the mark. A tool killed in between (review session 3, L5) leaves
//! the mark: the next invocation sees that the record may describe bytes only partly written
//! and takes the patch out (`revert::finish_unfinished`), whichever way it was going.

use crate::process::{Memory, ProcessError, Tracee};
use serde::{Deserialize, Serialize};

/// The memfd name; /proc/PID/maps shows it as `/memfd:livepatch-state (deleted)`.
pub const MEMFD_NAME: &str = "livepatch-state";
/// Size of the mapping.
pub const STATE_SIZE: u64 = 256 * 1024;
const HEADER: u64 = 64;
const SLOT: u64 = (STATE_SIZE - HEADER) / 2;
const MAGIC: &[u8; 8] = b"LPSTATE\0";
/// Version 2 records retargeted call sites. A state with none is still written as version 1,
/// which older tools read; one with call sites is version 2, which they refuse rather than
/// revert a patch without restoring its callers (they would then call freed memory).
const VERSION: u32 = 2;
const VERSION_WITHOUT_CALL_SITES: u32 = 1;
/// Version 3: an operation is marked unfinished. An older tool refuses it rather than take
/// the record for an applied patch (or miss that bytes are half restored).
const VERSION_UNFINISHED: u32 = 3;
/// Version 4: the unfinished operation is on a patch with dispatches (nonstop mode, see
/// apply/dispatch.rs). An older tool would finish a killed apply without setting the flag —
/// recorded as applied, the old code running for good (review session 5, #2) — so it must
/// refuse it. A state whose patches have dispatches but no unfinished operation keeps the
/// lower versions: an older tool's revert or stacking of such a patch works.
const VERSION_UNFINISHED_DISPATCH: u32 = 4;

/// One function redirected by an applied patch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppliedFunction {
    /// The old function's name (as in the patch).
    pub name: String,
    /// Entry address of the old function in the target.
    pub old: u64,
    /// Entry address of the new function in the target.
    pub new: u64,
    /// Size of the new function (for the consistency check when it is replaced or reverted).
    pub new_size: u64,
    /// Where control actually goes: `new`, or a register-preserving thunk calling it.
    pub via: u64,
    /// Address where the redirect was written.
    pub patch_addr: u64,
    /// Bytes at `patch_addr` before this patch (restored by revert).
    pub saved: Vec<u8>,
    /// Bytes this patch wrote at `patch_addr`.
    pub written: Vec<u8>,
    /// Trampoline running the original's displaced instructions (0: none).
    pub trampoline: u64,
    /// The direct callers retargeted at `via` (none in a state written before call sites).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub call_sites: Vec<AppliedCallSite>,
    /// Nonstop mode: the function's dispatch in the patch memory, where the entry's jump and
    /// the callers' branches lead; it runs `via` while the patch's flag is set, the trampoline
    /// otherwise (apply/dispatch.rs). None: they lead to `via` itself (stop mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<u64>,
}

impl AppliedFunction {
    /// The direct callers this patch points at `via` (not those it wrote the original call
    /// back to, when `via` was out of their reach).
    pub fn direct_callers(&self) -> usize {
        self.call_sites
            .iter()
            .filter(|c| {
                lp_core::call_site::decode(c.addr, &c.written)
                    .is_ok_and(|s| s.target == self.via || Some(s.target) == self.dispatch)
            })
            .count()
    }

    /// Where the entry's jump and the callers' branches lead: the dispatch, or `via`.
    pub fn reached(&self) -> u64 {
        self.dispatch.unwrap_or(self.via)
    }
}

/// A caller's direct branch to a replaced function, retargeted by an applied patch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppliedCallSite {
    /// Runtime address of the branch.
    pub addr: u64,
    /// `function+0xOFFSET`, for messages.
    pub caller: String,
    /// The branch as in the file (to the old entry): what its trampoline runs.
    #[serde(with = "hex_bytes")]
    pub original: Vec<u8>,
    /// Its bytes before this patch (the original, or a patch below's): restored by revert.
    #[serde(with = "hex_bytes")]
    pub saved: Vec<u8>,
    /// The bytes this patch wrote (the branch to this patch's `via`).
    #[serde(with = "hex_bytes")]
    pub written: Vec<u8>,
    /// Trampoline running the original branch relocated, then jumping back past the site:
    /// where a thread that hits the site's temporary `int3` goes (nonstop mode).
    pub trampoline: u64,
}

/// One patch applied to the process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppliedPatch {
    /// The patch id (content hash).
    pub id: String,
    /// Seconds since the epoch when the patch went live.
    pub applied_at: u64,
    /// The patched module's path.
    pub module: String,
    /// Its build-id (hex).
    pub build_id: String,
    /// Switch mode used ("stop" or "nonstop").
    pub mode: String,
    /// Patch memory: start address.
    pub code_addr: u64,
    /// Patch memory: length in bytes.
    pub code_len: u64,
    /// The redirected functions.
    pub functions: Vec<AppliedFunction>,
    /// Unwind info and symbols registered for the new code (C++ runtime, perf, gdb).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<crate::debug_info::DebugRecord>,
    /// Nonstop mode: the byte whose bit 0 sends the functions' dispatches to the new code
    /// (set: the commit of the apply; cleared: the first step of a nonstop revert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<u64>,
}

/// Everything applied to one process, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// Applied patches, oldest first (the last one is the top of every stack it touches).
    pub patches: Vec<AppliedPatch>,
    /// A switch that was under way when the state was stored (the write-ahead mark): while it
    /// is set, the bytes of that patch's sites may be the old ones, the new ones, or a mix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unfinished: Option<Unfinished>,
}

/// The operation a livepatch was in the middle of (see the module documentation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Unfinished {
    /// The patch being put in or taken out (its record is in `patches`).
    pub id: String,
    /// Which way.
    pub operation: Operation,
}

/// Which way an unfinished switch was going.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// An apply: the record was stored before its redirects were written.
    Applying,
    /// A revert: the record was kept while its original bytes were written back.
    Reverting,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Applying => "applying",
            Operation::Reverting => "reverting",
        })
    }
}

impl State {
    /// This state, marked as in the middle of `operation` on patch `id` (which it holds):
    /// stored before a switch writes anything.
    pub fn marked(&self, id: &str, operation: Operation) -> State {
        State {
            patches: self.patches.clone(),
            unfinished: Some(Unfinished {
                id: id.to_string(),
                operation,
            }),
        }
    }

    /// [`State::marked`] for an apply: `self` is the state with the new patch's record.
    pub fn marked_applying(&self, id: &str) -> State {
        self.marked(id, Operation::Applying)
    }

    /// The index of the patch an unfinished operation was switching, and the operation.
    pub fn unfinished_patch(&self) -> Option<(usize, Operation)> {
        let u = self.unfinished.as_ref()?;
        let i = self.patches.iter().position(|p| p.id == u.id)?;
        Some((i, u.operation))
    }
}

/// Errors of the in-target state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the target failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The mapping exists but does not hold a state we understand.
    #[error("livepatch state of process {pid} is corrupt: {why}")]
    Corrupt {
        /// The process.
        pid: i32,
        /// What is wrong.
        why: String,
    },
    /// The state does not fit in the mapping.
    #[error("livepatch state of process {0} is full")]
    Full(i32),
}

/// Where a process's state mapping is, if it has one.
pub fn locate(pid: i32) -> Option<u64> {
    // Read once while we trace `pid` (only a tracer maps or unmaps the state).
    let maps = crate::process::maps_text::ours(pid).ok()?;
    let needle = format!("/memfd:{MEMFD_NAME}");
    maps.lines()
        .find(|l| {
            l.contains(&needle)
                && l.split_whitespace()
                    .nth(1)
                    .is_some_and(|p| p.starts_with("rw"))
        })
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
}

/// Reads the state of `pid` (an empty state when the process has none).
pub fn read(pid: i32) -> Result<State, StateError> {
    read_located(pid, None)
}

/// [`read`] through `mem`, a handle on `pid`'s memory the caller holds already (a tracee's):
/// no second open of /proc/PID/mem.
pub fn read_with(pid: i32, mem: &Memory) -> Result<State, StateError> {
    read_located(pid, Some(mem))
}

fn read_located(pid: i32, mem: Option<&Memory>) -> Result<State, StateError> {
    let Some(addr) = locate(pid) else {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(ProcessError::NoSuchProcess(pid).into());
        }
        return Ok(State::default());
    };
    match mem {
        Some(mem) => read_at(pid, mem, addr),
        None => read_at(pid, &Memory::open(pid)?, addr),
    }
}

fn read_at(pid: i32, mem: &Memory, addr: u64) -> Result<State, StateError> {
    let corrupt = |why: &str| StateError::Corrupt {
        pid,
        why: why.to_string(),
    };
    let header = mem.read_vec(addr, HEADER as usize)?;
    if header.iter().all(|&b| b == 0) {
        return Ok(State::default());
    }
    if &header[..8] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if !(VERSION_WITHOUT_CALL_SITES..=VERSION_UNFINISHED_DISPATCH).contains(&version) {
        return Err(corrupt(&format!("unknown version {version}")));
    }
    let active = u32::from_le_bytes(header[12..16].try_into().unwrap()) as u64;
    let len = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if active > 1 || len > SLOT {
        return Err(corrupt("bad header"));
    }
    let body = mem.read_vec(addr + HEADER + active * SLOT, len as usize)?;
    serde_json::from_slice(&body).map_err(|e| corrupt(&e.to_string()))
}

/// The state mapping of a traced process, created on first use.
#[derive(Debug)]
pub struct StateMap {
    addr: u64,
    pid: i32,
    /// Created by this invocation (an apply that fails removes it again).
    pub created: bool,
}

impl StateMap {
    /// Finds the state mapping of the target, or creates it (remote memfd_create + mmap).
    pub fn open_or_create(t: &mut Tracee) -> Result<StateMap, StateError> {
        let (addr, created) = match locate(t.pid()) {
            Some(a) => (a, false),
            // Private: a child forked from the target keeps the state it was forked with and
            // has its own from then on (a shared one made a revert of the child erase the
            // parent's record: review session 4, S6).
            None => (t.map_memfd_private(MEMFD_NAME, STATE_SIZE)?, true),
        };
        Ok(StateMap {
            addr,
            pid: t.pid(),
            created,
        })
    }

    /// Finds an existing state mapping.
    pub fn open(pid: i32) -> Option<StateMap> {
        locate(pid).map(|addr| StateMap {
            addr,
            pid,
            created: false,
        })
    }

    /// Removes a mapping this invocation created (after a failed apply), and the remote
    /// calls' stub area if this invocation created that too: the process is left as it was.
    pub fn remove_if_created(&self, t: &mut Tracee) {
        if self.created {
            let _ = t.munmap(self.addr, STATE_SIZE);
        }
        t.remove_stub_if_created();
    }

    /// Reads the state.
    pub fn load(&self, mem: &Memory) -> Result<State, StateError> {
        read_at(self.pid, mem, self.addr)
    }

    /// Whether `state` fits in a slot: checked before a switch, so that a full state refuses
    /// the patch before anything is written rather than at the commit.
    pub fn check_fits(&self, state: &State) -> Result<(), StateError> {
        self.encode(state).map(drop)
    }

    /// `state` serialized for a slot ([`StateMap::store_encoded`]), or [`StateError::Full`]:
    /// done before a switch, the commit inside it then only writes (serializing a state with
    /// ten functions and their callers takes tens of microseconds, which in stop mode every
    /// thread would spend stopped).
    pub fn encode(&self, state: &State) -> Result<Encoded, StateError> {
        let body = serde_json::to_vec(state).expect("state serializes");
        if body.len() as u64 > SLOT {
            return Err(StateError::Full(self.pid));
        }
        let has_call_sites = state
            .patches
            .iter()
            .any(|p| p.functions.iter().any(|f| !f.call_sites.is_empty()));
        let unfinished_dispatch = state
            .unfinished_patch()
            .is_some_and(|(i, _)| state.patches[i].flag.is_some());
        let version = if unfinished_dispatch {
            VERSION_UNFINISHED_DISPATCH
        } else if state.unfinished.is_some() {
            VERSION_UNFINISHED
        } else if has_call_sites {
            VERSION
        } else {
            VERSION_WITHOUT_CALL_SITES
        };
        Ok(Encoded { body, version })
    }

    /// [`StateMap::encode`] of `state.marked(id, operation)`, from `encoded` (`state`'s own,
    /// which has no mark): the mark is the last field of the JSON object, so its body is
    /// `encoded`'s with the field added before the closing brace — one serialization (and no
    /// copy of every record) less for an apply, which needs both.
    pub fn encode_marked(
        &self,
        state: &State,
        encoded: &Encoded,
        id: &str,
        operation: Operation,
    ) -> Result<Encoded, StateError> {
        let mark = Unfinished {
            id: id.to_string(),
            operation,
        };
        let (Some((b'}', object)), None) = (encoded.body.split_last(), &state.unfinished) else {
            return self.encode(&state.marked(id, operation));
        };
        let mut body = Vec::with_capacity(encoded.body.len() + 64);
        body.extend_from_slice(object);
        body.extend_from_slice(b",\"unfinished\":");
        body.extend(serde_json::to_vec(&mark).expect("mark serializes"));
        body.push(b'}');
        if body.len() as u64 > SLOT {
            return Err(StateError::Full(self.pid));
        }
        let dispatch = state.patches.iter().any(|p| p.id == id && p.flag.is_some());
        let version = if dispatch {
            VERSION_UNFINISHED_DISPATCH
        } else {
            VERSION_UNFINISHED
        };
        Ok(Encoded { body, version })
    }

    /// Writes `state`: body into the inactive slot, then the header that publishes it.
    pub fn store(&self, mem: &Memory, state: &State) -> Result<(), StateError> {
        self.store_encoded(mem, &self.encode(state)?)
    }

    /// [`StateMap::store`] of a state [`StateMap::encode`]d beforehand.
    pub fn store_encoded(&self, mem: &Memory, state: &Encoded) -> Result<(), StateError> {
        let staged = self.stage_encoded(mem, state)?;
        self.publish(mem, &staged)
    }

    /// Writes `state`'s body into the inactive slot without publishing it: [`StateMap::publish`]
    /// then makes it the state with one small write (the write-ahead mark is published that
    /// way inside the stop window, where a whole body's write would lengthen it).
    pub fn stage(&self, mem: &Memory, state: &State) -> Result<Staged, StateError> {
        self.stage_encoded(mem, &self.encode(state)?)
    }

    /// [`StateMap::stage`] of a state [`StateMap::encode`]d beforehand.
    pub fn stage_encoded(&self, mem: &Memory, state: &Encoded) -> Result<Staged, StateError> {
        let header = mem.read_vec(self.addr, HEADER as usize)?;
        let active = if &header[..8] == MAGIC {
            u32::from_le_bytes(header[12..16].try_into().unwrap()) & 1
        } else {
            1
        };
        let next = 1 - active;
        mem.write(self.addr + HEADER + next as u64 * SLOT, &state.body)?;
        let mut h = [0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&state.version.to_le_bytes());
        h[12..16].copy_from_slice(&next.to_le_bytes());
        h[16..24].copy_from_slice(&(state.body.len() as u64).to_le_bytes());
        Ok(Staged { header: h })
    }

    /// Publishes a state [`StateMap::stage`]d (nothing else may be stored in between).
    pub fn publish(&self, mem: &Memory, staged: &Staged) -> Result<(), StateError> {
        mem.write(self.addr, &staged.header)?;
        Ok(())
    }
}

/// A state serialized for a slot, with the format version it needs (see [`StateMap::encode`]).
#[derive(Debug)]
pub struct Encoded {
    body: Vec<u8>,
    version: u32,
}

/// A state written but not yet published (see [`StateMap::stage`]).
#[derive(Debug)]
pub struct Staged {
    header: [u8; HEADER as usize],
}

/// Call-site bytes as hex strings (a third of a JSON array of numbers: the state is small).
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::elf::hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        crate::patchfile::unhex(&s).ok_or_else(|| serde::de::Error::custom("expected hex bytes"))
    }
}

/// Every process (pid) that has a livepatch state mapping.
pub fn processes_with_state() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| locate(pid).is_some())
        .collect();
    pids.sort();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(id: &str, flag: Option<u64>) -> AppliedPatch {
        AppliedPatch {
            id: id.into(),
            applied_at: 1_700_000_000,
            module: "/usr/bin/target \"quoted\"".into(),
            build_id: "ab12".into(),
            mode: "nonstop".into(),
            code_addr: 0x7f00_0000_0000,
            code_len: 0x3000,
            functions: vec![AppliedFunction {
                name: "compute".into(),
                old: 0x40_1000,
                new: 0x7f00_0000_1000,
                new_size: 32,
                via: 0x7f00_0000_1000,
                patch_addr: 0x40_1004,
                saved: vec![0x55, 0x48, 0x89, 0xe5, 0x90],
                written: vec![0xe9, 1, 2, 3, 4],
                trampoline: 0x7f00_0000_0040,
                call_sites: vec![AppliedCallSite {
                    addr: 0x40_2000,
                    caller: "main+0x10".into(),
                    original: vec![0xe8, 0, 0, 0, 0],
                    saved: vec![0xe8, 0, 0, 0, 0],
                    written: vec![0xe8, 9, 9, 9, 9],
                    trampoline: 0x7f00_0000_0080,
                }],
                dispatch: flag.map(|f| f + 64),
            }],
            debug: None,
            flag,
        }
    }

    /// The mark spliced into an encoded state is exactly what encoding the marked state
    /// gives: the same bytes, the same format version (with and without dispatches).
    #[test]
    fn a_marked_state_encodes_as_its_own_encoding_with_the_mark_spliced_in() {
        let map = StateMap {
            addr: 0,
            pid: 1,
            created: false,
        };
        for flag in [None, Some(0x7f00_0000_0000)] {
            let state = State {
                patches: vec![patch("older", None), patch("newest", flag)],
                unfinished: None,
            };
            let plain = map.encode(&state).unwrap();
            for op in [Operation::Applying, Operation::Reverting] {
                let spliced = map.encode_marked(&state, &plain, "newest", op).unwrap();
                let direct = map.encode(&state.marked("newest", op)).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&spliced.body),
                    String::from_utf8_lossy(&direct.body)
                );
                assert_eq!(spliced.version, direct.version);
            }
        }
        let empty = State::default();
        let plain = map.encode(&empty).unwrap();
        let spliced = map
            .encode_marked(&empty, &plain, "x", Operation::Applying)
            .unwrap();
        assert_eq!(
            spliced.body,
            map.encode(&empty.marked("x", Operation::Applying))
                .unwrap()
                .body
        );
    }
}

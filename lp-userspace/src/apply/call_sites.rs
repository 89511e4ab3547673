//! Call sites at apply time: the direct callers of each replaced function (found by `pack`,
//! and those an earlier patch of the same function retargeted) are pointed straight at the
//! function's effective destination — the address the old entry's redirect jumps to, the new
//! function or its register-saving thunk — so a direct call no longer pays the redirect's
//! jump. Everything else (function pointers, the PLT, other modules' GOT) keeps going through
//! the redirect at the old entry.
//!
//! - [`verify`] (read-only, before anything is written): every site's bytes in memory must be
//!   what the records say — the file's bytes, or what the patch on top of the function wrote
//!   there. A site is an optimisation: one that someone else changed (a uprobe's `int3`,
//!   another tool) is left alone with a warning — its calls still reach the redirect — unless
//!   leaving it would keep calls on an older version (a site a patch below retargeted) or its
//!   bytes branch into our own patch memory (a record lost): then the patch is refused, naming
//!   the caller.
//! - [`prepare`] (with the other trampolines): per site a trampoline running the *original*
//!   branch relocated — it still names the old entry, whose redirect leads to the right
//!   version in every phase of a switch — then a jump back past the site; its CFI (the
//!   caller's rows); and the site's [`SiteSwitch`], carried out with the entry sites.

use super::error::Error;
use super::switch::SiteSwitch;
use super::target::{top_redirect, CodeSnapshot, LoadedTarget};
use crate::debug_info::{trampoline_frame, ModuleCfi};
use crate::patchfile::Patch;
use crate::process::Memory;
use crate::state::{AppliedCallSite, State};
use crate::thunk_cfi::FrameCfi;
use lp_core::call_site::{self, BranchKind, CallSiteError};
use lp_core::jump::REL32_JUMP_LEN;
use lp_core::site::validate_site;

/// Bytes reserved per call site in the patch memory: its trampoline (the branch relocated,
/// at most a 6-byte `jcc` grown to a branch over a 14-byte absolute jump, then a 14-byte jump
/// back), padded to 16, and its share of the generated `.eh_frame`.
pub(crate) const PER_SITE_EXTRA: u64 = 48 + 64;

/// Call sites retargeted per function, at most: each is a write in the switch (in stop mode
/// while every thread is stopped), a record in the in-target state and, in nonstop mode, an
/// entry of the trap table. Call sites save a jump per call; the fix itself must never fail
/// or stall because a function has hundreds of callers.
pub(crate) const MAX_PER_FUNCTION: usize = 32;
/// Call sites retargeted per apply, at most (see [`MAX_PER_FUNCTION`]).
pub(crate) const MAX_PER_APPLY: usize = 64;

/// A verified call site of one replaced function, ready to be planned.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    /// Runtime address of the branch.
    pub addr: u64,
    /// `function+0xOFFSET`, for messages.
    pub caller: String,
    /// The branch as in the file (to the old entry).
    pub original: Vec<u8>,
    /// What is there now (the original, or the branch a patch below wrote).
    pub current: Vec<u8>,
}

/// The call sites of every function of `patch` (in its order), each checked in memory, within
/// the budget: sites a patch below retargeted always (they must follow this patch), then the
/// others in address order up to [`MAX_PER_FUNCTION`] and [`MAX_PER_APPLY`]; the rest keep
/// going through the redirect.
pub(crate) fn verify(
    pid: i32,
    mem: &Memory,
    code: &CodeSnapshot,
    target: &LoadedTarget,
    patch: &Patch,
    state: &State,
) -> Result<Vec<Vec<Verified>>, Error> {
    let mut all = Vec::with_capacity(patch.functions.len());
    let mut budget = MAX_PER_APPLY;
    for f in &patch.functions {
        let old = target.bias + f.old_vaddr;
        let below = top_redirect(state, old);
        let mut sites: Vec<Verified> = Vec::new();
        for c in &f.call_sites {
            let addr = target.bias + c.vaddr;
            let expected = below
                .and_then(|b| b.call_sites.iter().find(|s| s.addr == addr))
                .map_or(&c.bytes, |s| &s.written);
            sites.push(Verified {
                addr,
                caller: c.caller.clone(),
                original: c.bytes.clone(),
                current: expected.clone(),
            });
        }
        // Sites the patch below retargeted are retargeted again, even when this patch's file
        // does not list them (made by an older version): they must not keep calling the
        // version below.
        for s in below.map(|b| b.call_sites.as_slice()).unwrap_or_default() {
            if !sites.iter().any(|v| v.addr == s.addr) {
                sites.push(Verified {
                    addr: s.addr,
                    caller: s.caller.clone(),
                    original: s.original.clone(),
                    current: s.written.clone(),
                });
            }
        }
        let mut kept = Vec::with_capacity(sites.len());
        for mut s in sites {
            let now = code.read_vec(mem, s.addr, s.current.len())?;
            if now == s.current {
                kept.push(s);
                continue;
            }
            // A caller the patch below left at its dispatch (a nonstop apply rolled forward
            // after a kill, or one whose last step found the site changed meanwhile) runs that
            // patch's code all the same: it is retargeted from there (review session 6, 2).
            if let Some(d) = below.and_then(|b| b.dispatch) {
                let at_dispatch = call_site::plan_retarget(s.addr, &s.current, d)
                    .is_ok_and(|p| p.result() == now.as_slice());
                if at_dispatch && s.current != s.original {
                    s.current = now;
                    kept.push(s);
                    continue;
                }
            }
            let into_ours = call_site::decode(s.addr, &now).is_ok_and(|b| {
                state
                    .patches
                    .iter()
                    .any(|p| b.target >= p.code_addr && b.target < p.code_addr + p.code_len)
            });
            let what = format!(
                "call site {} at {:#x} (a call of {}) in process {pid} is not what the patch expects (found {}, expected {})",
                s.caller,
                s.addr,
                f.old_name,
                crate::elf::hex(&now),
                crate::elf::hex(&s.current),
            );
            if into_ours || s.current != s.original {
                return Err(Error::Mismatch(format!(
                    "{what}: changed by someone else; nothing written"
                )));
            }
            eprintln!(
                "livepatch: warning: {what}: changed by someone else, left alone (its calls go through the redirect)"
            );
        }
        // Budget: retargeted ones first (not optional), then the others in address order.
        let (mut must, optional): (Vec<Verified>, Vec<Verified>) =
            kept.into_iter().partition(|s| s.current != s.original);
        let room = MAX_PER_FUNCTION.min(budget).saturating_sub(must.len());
        must.extend(optional.into_iter().take(room));
        budget = budget.saturating_sub(must.len());
        all.push(must);
    }
    Ok(all)
}

/// What [`prepare`] makes of one call site.
pub(crate) struct Prepared {
    /// The switch retargeting it.
    pub switch: SiteSwitch,
    /// Its record for the in-target state.
    pub record: AppliedCallSite,
    /// Its trampoline's CFI, when the module has CFI.
    pub frame: Option<FrameCfi>,
}

/// Builds the trampoline of `site` at `at` (returned with the rest), its CFI and its switch
/// to `dest`. `None`: the site is left alone (its callers keep going through the redirect) —
/// the new destination is out of rel32 reach, or the trampoline of a `call`/`jcc`, which a
/// callee returns into or which continues in the caller, cannot get the caller's CFI. A site
/// that a patch below retargeted is never left pointing at that patch: it goes back to the
/// original branch (to the old entry, whose redirect leads to this patch) instead.
pub(crate) fn prepare(
    name: &str,
    site: &Verified,
    dest: u64,
    at: u64,
    cfi: Option<&ModuleCfi<'_>>,
) -> Result<Option<(Prepared, Vec<u8>)>, Error> {
    let unsupported =
        |e: String| Error::Unsupported(format!("call site {} of {name}: {e}", site.caller));
    let original = call_site::decode(site.addr, &site.original)
        .map_err(|e: CallSiteError| unsupported(e.to_string()))?;
    let retargeted = site.current != site.original;
    let back_to_original = || {
        lp_core::plan::plan_write(site.addr, &site.current, &site.original)
            .map_err(|e| unsupported(e.to_string()))
    };
    let plan = match call_site::plan_retarget(site.addr, &site.current, dest) {
        Ok(p) => p,
        Err(CallSiteError::OutOfReach { .. }) if retargeted => back_to_original()?,
        Err(CallSiteError::OutOfReach { .. }) => return Ok(None),
        Err(e) => return Err(unsupported(e.to_string())),
    };
    // The original branch as a one-instruction "function": lp-core relocates it like the
    // displaced entry instructions of a redirect, then jumps back past it.
    let as_site = validate_site(&site.original, site.addr, REL32_JUMP_LEN)
        .map_err(|e| unsupported(e.to_string()))?;
    let mut code = vec![0u8; lp_core::trampoline::MAX_TRAMPOLINE_LEN];
    let n = lp_core::trampoline::build_trampoline(&as_site, at, &mut code)
        .map_err(|e| unsupported(e.to_string()))?;
    code.truncate(n);
    let frame = match cfi.map(|c| trampoline_frame(c, &as_site, at, &code)) {
        Some(Ok(f)) => Some(f),
        // A tail call never comes back into its trampoline: without CFI there, only a thread
        // stopped on that one jmp is unwound conservatively.
        Some(Err(_)) if original.kind == BranchKind::Jump || retargeted => None,
        Some(Err(_)) => return Ok(None),
        None => None,
    };
    Ok(Some((
        Prepared {
            switch: SiteSwitch::call_site(format!("{name} (call site {})", site.caller), plan, at),
            record: AppliedCallSite {
                addr: site.addr,
                caller: site.caller.clone(),
                original: site.original.clone(),
                saved: plan.expected().to_vec(),
                written: plan.result().to_vec(),
                trampoline: at,
            },
            frame,
        },
        code,
    )))
}

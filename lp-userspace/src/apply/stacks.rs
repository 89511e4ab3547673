//! Every stopped thread's instruction pointer and return addresses, for lp-core's consistency
//! check.

use crate::process::{ProcessError, Tracee};
use crate::unwind::{Registers, Unwinder};
use lp_core::consistency::CodeRange;

/// One thread's stack as lp-core wants it (owned).
pub(crate) struct Stack {
    pub tid: u32,
    pub ip: u64,
    pub returns: Vec<u64>,
}

/// Largest stack depth scanned by the conservative fallback.
const SCAN_LIMIT: u64 = 256 * 1024;

/// Deepest stack unwound.
const MAX_DEPTH: usize = 512;

/// Collects the stacks of all (stopped) threads: unwound with `.eh_frame` CFI; where the CFI
/// walk cannot reach the outermost frame (code without CFI, e.g. patch code of an earlier
/// invocation), the rest of the stack is scanned conservatively as well.
pub(crate) fn collect(
    t: &Tracee,
    unwinder: &mut Unwinder,
    ranges: &[CodeRange],
) -> Result<Vec<Stack>, ProcessError> {
    // The mappings are read only when an unwind is incomplete: this runs while every thread is
    // stopped, and one read of /proc/PID/maps costs tens of microseconds.
    crate::cli::trace_point("threads stopped, stacks next");
    let mut maps: Option<String> = None;
    let mut out = Vec::new();
    for tid in t.threads() {
        let regs = t.regs(tid)?;
        let bt = unwinder.unwind(&Registers::from_user_regs(&regs), t.mem(), MAX_DEPTH);
        let complete = bt.complete();
        let mut returns = bt.return_addresses;
        if !complete {
            if maps.is_none() {
                maps = Some(
                    crate::process::proc_dir::maps(t.pid())
                        .map_err(|_| ProcessError::Exited(t.pid()))?,
                );
            }
            let maps = maps.as_deref().unwrap_or_default();
            returns.extend(scan(t, maps, regs.rsp, ranges));
        }
        out.push(Stack {
            tid: tid as u32,
            ip: regs.rip,
            returns,
        });
    }
    crate::cli::trace_point("stacks collected");
    Ok(out)
}

/// Conservative scan: every word on the stack that points into a switched range counts as a
/// return address. It may see a stale value (and report busy) but never misses a real frame.
fn scan(t: &Tracee, maps: &str, rsp: u64, ranges: &[CodeRange]) -> Vec<u64> {
    let end = maps
        .lines()
        .filter_map(|l| {
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .find(|&(s, e)| s <= rsp && rsp < e)
        .map(|(_, e)| e);
    let Some(end) = end else {
        return Vec::new();
    };
    let len = (end - rsp).min(SCAN_LIMIT) as usize & !7;
    let Ok(bytes) = t.mem().read_vec(rsp, len) else {
        return Vec::new();
    };
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .filter(|v| ranges.iter().any(|r| r.contains(*v)))
        .collect()
}

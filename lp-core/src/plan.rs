//! The ordered write plan that turns the bytes at a patch address into new bytes without ever
//! letting a CPU decode a torn instruction (the kernel's `text_poke_bp` protocol).
//!
//! ```text
//! 1. write int3 (0xcc) over the first byte      -> Sync
//! 2. write the tail (bytes 1..n)                -> Sync
//! 3. write the new first byte                   -> Sync
//! ```
//! A single-byte store is atomic, so after step 1 any CPU fetching the site sees either the old
//! instruction or `int3`; while the tail changes, every CPU that reaches the site traps on the
//! `int3` (the adapter's handler sends it on, see [`crate::trap`]); step 3 exposes the complete new
//! instruction at once. `Sync` is the adapter's serialising point (kernel: IPI all CPUs /
//! `text_poke_sync`; process: every thread stopped, or `membarrier(SYNC_CORE)`).
//!
//! Steps that change nothing are left out: if only the first byte differs there is no tail
//! write; if the first byte already is `int3` there is no step 1; if the new first byte is `int3`
//! there is no step 3; identical bytes give an empty plan. The first byte always goes through
//! `int3` (Intel only guarantees cross-modifying code for that byte), so no intermediate state
//! is ever anything but the old bytes, `int3` followed by anything, or the new bytes.
//!
//! Plans are fixed-size values: no allocation, usable from a kernel.

use crate::jump::Jump;
use crate::site::{Site, INT3};

/// The longest byte run a plan can rewrite.
///
/// ```
/// use lp_core::plan::{plan_write, MAX_WRITE_LEN};
/// assert!(plan_write(0, &[0; MAX_WRITE_LEN], &[1; MAX_WRITE_LEN]).is_ok());
/// assert!(plan_write(0, &[0; MAX_WRITE_LEN + 1], &[1; MAX_WRITE_LEN + 1]).is_err());
/// ```
pub const MAX_WRITE_LEN: usize = 16;
/// The most steps a plan has (three writes, each followed by a sync).
///
/// ```
/// use lp_core::plan::{plan_write, MAX_STEPS};
/// assert_eq!(plan_write(0, &[0x90, 0x90], &[0xc3, 0xc3]).unwrap().steps().len(), MAX_STEPS);
/// ```
pub const MAX_STEPS: usize = 6;

/// One step of a [`WritePlan`].
///
/// ```
/// use lp_core::plan::{plan_write, Step};
/// let plan = plan_write(0x1000, &[0x55, 0x48], &[0xe9, 0x00]).unwrap();
/// match plan.steps()[0] {
///     Step::Write { addr, .. } => assert_eq!(addr, 0x1000),
///     Step::Sync => unreachable!(),
/// }
/// assert_eq!(plan.steps()[1], Step::Sync);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Store `bytes[..len]` at `addr`.
    Write {
        /// First byte written.
        addr: u64,
        /// The data (only the first `len` bytes count).
        bytes: [u8; MAX_WRITE_LEN],
        /// Number of bytes to write.
        len: u8,
    },
    /// Serialise every CPU/thread that may execute the site before going on.
    Sync,
}

impl Step {
    fn write(addr: u64, data: &[u8]) -> Step {
        let mut bytes = [0u8; MAX_WRITE_LEN];
        bytes[..data.len()].copy_from_slice(data);
        Step::Write {
            addr,
            bytes,
            len: data.len() as u8,
        }
    }

    /// For a write, its address and data; `None` for a sync.
    ///
    /// ```
    /// use lp_core::plan::{plan_write, Step};
    /// let plan = plan_write(0x1000, &[0x90, 0x90], &[0xcc, 0x90]).unwrap();
    /// assert_eq!(plan.steps()[0].data(), Some((0x1000, &[0xcc][..])));
    /// assert_eq!(Step::Sync.data(), None);
    /// ```
    pub fn data(&self) -> Option<(u64, &[u8])> {
        match self {
            Step::Write { addr, bytes, len } => Some((*addr, &bytes[..*len as usize])),
            Step::Sync => None,
        }
    }

    /// Perform a write step on `mem`, a local copy of memory whose first byte is at address
    /// `base` (a sync does nothing). Returns `false`, changing nothing, if the write does not fall
    /// entirely inside `mem`.
    ///
    /// ```
    /// use lp_core::plan::plan_write;
    /// let old = [0x55, 0x48, 0x89, 0xe5, 0x90];
    /// let new = [0xe9, 1, 2, 3, 4];
    /// let plan = plan_write(0x1000, &old, &new).unwrap();
    /// let mut mem = old;
    /// for step in plan.steps() {
    ///     assert!(step.apply(0x1000, &mut mem));
    /// }
    /// assert_eq!(mem, new);
    /// ```
    pub fn apply(&self, base: u64, mem: &mut [u8]) -> bool {
        let Some((addr, data)) = self.data() else {
            return true;
        };
        let Some(off) = addr.checked_sub(base) else {
            return false;
        };
        let Ok(off) = usize::try_from(off) else {
            return false;
        };
        match off
            .checked_add(data.len())
            .and_then(|end| mem.get_mut(off..end))
        {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
}

/// The ordered steps that rewrite `expected` into `result` at `addr`.
///
/// The adapter must check that memory at [`WritePlan::addr`] holds [`WritePlan::expected`]
/// right before the first step (with the target stopped or serialised) and refuse otherwise.
///
/// ```
/// use lp_core::plan::{plan_write, Step};
/// let plan = plan_write(0x1000, &[0x55, 0x48, 0x89, 0xe5, 0x90], &[0xe9, 0xfb, 0x0f, 0, 0]).unwrap();
/// assert_eq!(plan.steps().len(), 6);
/// assert_eq!(plan.steps()[0].data(), Some((0x1000, &[0xcc][..])));
/// assert_eq!(plan.steps()[2].data(), Some((0x1001, &[0xfb, 0x0f, 0, 0][..])));
/// assert_eq!(plan.steps()[4].data(), Some((0x1000, &[0xe9][..])));
/// assert!(plan.steps().iter().skip(1).step_by(2).all(|s| *s == Step::Sync));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WritePlan {
    addr: u64,
    len: u8,
    expected: [u8; MAX_WRITE_LEN],
    result: [u8; MAX_WRITE_LEN],
    steps: [Step; MAX_STEPS],
    step_count: u8,
}

impl WritePlan {
    /// The steps in order.
    ///
    /// ```
    /// use lp_core::plan::plan_write;
    /// assert!(plan_write(0, &[1, 2], &[1, 2]).unwrap().steps().is_empty());
    /// ```
    pub fn steps(&self) -> &[Step] {
        &self.steps[..self.step_count as usize]
    }

    /// Address of the first byte the plan covers.
    ///
    /// ```
    /// use lp_core::plan::plan_write;
    /// assert_eq!(plan_write(0x42, &[1], &[2]).unwrap().addr(), 0x42);
    /// ```
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Number of bytes the plan covers.
    ///
    /// ```
    /// use lp_core::plan::plan_write;
    /// assert_eq!(plan_write(0x42, &[1, 2, 3], &[2, 2, 3]).unwrap().len(), 3);
    /// ```
    #[allow(clippy::len_without_is_empty)] // plans are never empty (see `is_noop`)
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// What must be at [`WritePlan::addr`] before the first step (refuse to start otherwise).
    ///
    /// ```
    /// use lp_core::plan::plan_write;
    /// assert_eq!(plan_write(0, &[1, 2], &[3, 4]).unwrap().expected(), &[1, 2]);
    /// ```
    pub fn expected(&self) -> &[u8] {
        &self.expected[..self.len as usize]
    }

    /// What is at [`WritePlan::addr`] after the last step.
    ///
    /// ```
    /// use lp_core::plan::plan_write;
    /// assert_eq!(plan_write(0, &[1, 2], &[3, 4]).unwrap().result(), &[3, 4]);
    /// ```
    pub fn result(&self) -> &[u8] {
        &self.result[..self.len as usize]
    }

    /// Whether the plan has nothing to do (the bytes are already the result).
    ///
    /// ```
    /// use lp_core::plan::plan_write;
    /// assert!(plan_write(0, &[1, 2], &[1, 2]).unwrap().is_noop());
    /// ```
    pub fn is_noop(&self) -> bool {
        self.step_count == 0
    }
}

/// Why a plan cannot be made. `Display` is one line naming the problem.
///
/// ```
/// use lp_core::{plan::{plan_apply, PlanError}, site::validate_site};
/// let code = [0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3];
/// let site = validate_site(&code, 0x1000, 5).unwrap();
/// let mut now = code;
/// now[0] = 0xcc; // someone's breakpoint
/// let err = plan_apply(&site, &now, 0x2000).unwrap_err();
/// assert_eq!(err, PlanError::UnexpectedBytes { addr: 0x1000, found: 0xcc, expected: 0x55 });
/// assert!(err.to_string().starts_with("unexpected byte 0xcc at 0x1000"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PlanError {
    /// `current` and `new` differ in length.
    #[error("current bytes ({current}) and new bytes ({new}) differ in length")]
    LengthMismatch {
        /// Length of the current bytes.
        current: usize,
        /// Length of the new bytes.
        new: usize,
    },
    /// Nothing or too much to write.
    #[error("cannot plan a write of {len} bytes (1..={max})")]
    BadLength {
        /// Length asked for.
        len: usize,
        /// The longest supported write.
        max: usize,
    },
    /// `addr + len` wraps around the address space.
    #[error("a write of {len} bytes at {addr:#x} wraps around the address space")]
    AddressOverflow {
        /// The address.
        addr: u64,
        /// The length.
        len: usize,
    },
    /// The jump to the target is longer than the site's displaced instructions.
    #[error("a {jump_len}-byte jump to {target:#x} does not fit in the {room} bytes of the site at {addr:#x}")]
    JumpDoesNotFit {
        /// The patch address.
        addr: u64,
        /// The target.
        target: u64,
        /// Length of the jump needed to reach it.
        jump_len: usize,
        /// Bytes of whole instructions the site can give.
        room: usize,
    },
    /// Fewer current bytes were given than the jump covers.
    #[error("need the {need} current bytes at {addr:#x}, got {have}")]
    CurrentTooShort {
        /// The patch address.
        addr: u64,
        /// Bytes given.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The bytes at the site are neither the site's original bytes nor one of our redirects.
    #[error("unexpected byte {found:#04x} at {addr:#x} (expected {expected:#04x}): the code is not what the patch was made for")]
    UnexpectedBytes {
        /// Address of the first differing byte.
        addr: u64,
        /// The byte found there.
        found: u8,
        /// The original byte.
        expected: u8,
    },
}

/// Plan rewriting `current` (the bytes now at `addr`) into `new`, both 1..=16 bytes long.
///
/// ```
/// use lp_core::plan::{plan_write, PlanError};
/// // only the first byte differs: int3, sync, first byte, sync (no tail write)
/// let plan = plan_write(0x1000, &[0x90, 0x90], &[0xc3, 0x90]).unwrap();
/// assert_eq!(plan.steps().len(), 4);
/// assert!(matches!(plan_write(0, &[1], &[1, 2]), Err(PlanError::LengthMismatch { .. })));
/// ```
pub fn plan_write(addr: u64, current: &[u8], new: &[u8]) -> Result<WritePlan, PlanError> {
    if current.len() != new.len() {
        return Err(PlanError::LengthMismatch {
            current: current.len(),
            new: new.len(),
        });
    }
    let len = new.len();
    if len == 0 || len > MAX_WRITE_LEN {
        return Err(PlanError::BadLength {
            len,
            max: MAX_WRITE_LEN,
        });
    }
    if addr.checked_add(len as u64).is_none() {
        return Err(PlanError::AddressOverflow { addr, len });
    }
    Ok(build(addr, current, new))
}

/// The protocol itself; callers guarantee equal lengths in 1..=MAX_WRITE_LEN and no overflow.
fn build(addr: u64, current: &[u8], new: &[u8]) -> WritePlan {
    let len = new.len();
    let mut plan = WritePlan {
        addr,
        len: len as u8,
        expected: [0; MAX_WRITE_LEN],
        result: [0; MAX_WRITE_LEN],
        steps: [Step::Sync; MAX_STEPS],
        step_count: 0,
    };
    plan.expected[..len].copy_from_slice(current);
    plan.result[..len].copy_from_slice(new);
    if current == new {
        return plan;
    }
    let mut push = |step: Step| {
        plan.steps[plan.step_count as usize] = step;
        plan.step_count += 1;
    };
    if current[0] != INT3 {
        push(Step::write(addr, &[INT3]));
        push(Step::Sync);
    }
    if current[1..] != new[1..] {
        push(Step::write(addr + 1, &new[1..]));
        push(Step::Sync);
    }
    if new[0] != INT3 {
        push(Step::write(addr, &new[..1]));
        push(Step::Sync);
    }
    plan
}

/// Plan redirecting `site` to `target`. `current` is what is at `site.patch_addr` now (at least
/// as many bytes as the jump; reading `site.displaced_len` bytes is always enough). It must be
/// either the site's original bytes, or one of our redirects followed by the original bytes
/// (stacking: a second patch replaces the first one's jump, and its revert puts that jump back).
///
/// The plan writes the new jump's bytes, or, when it replaces a longer jump of ours (an absolute
/// one), that jump's length: the bytes past the new jump become the original ones again.
///
/// ```
/// use lp_core::{plan::plan_apply, site::validate_site, jump::Jump};
/// let code = [0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3];
/// let site = validate_site(&code, 0x40_1000, 5).unwrap();
/// let first = plan_apply(&site, &code[..site.displaced_len], 0x50_0000).unwrap();
/// assert_eq!(first.result(), Jump::to(0x40_1000, 0x50_0000).as_bytes());
/// // a second patch on top plans from the first one's jump
/// let second = plan_apply(&site, first.result(), 0x60_0000).unwrap();
/// assert_eq!(second.expected(), first.result());
/// ```
pub fn plan_apply(site: &Site, current: &[u8], target: u64) -> Result<WritePlan, PlanError> {
    let addr = site.patch_addr;
    let jump = Jump::to(addr, target);
    let need = jump.len();
    if !site.fits(&jump) {
        return Err(PlanError::JumpDoesNotFit {
            addr,
            target,
            jump_len: need,
            room: site.displaced_len,
        });
    }
    // Stacking: the site starts with one of our jumps. A longer one (absolute) is replaced whole,
    // so the bytes it covers past the new jump go back to the originals; the bytes past a shorter
    // one must still be the originals, exactly like an unpatched site.
    let existing = Jump::decode(addr, current)
        .map(|(j, _)| j.len())
        .filter(|&len| len <= site.displaced_len);
    let write_len = need.max(existing.unwrap_or(0));
    if current.len() < write_len {
        return Err(PlanError::CurrentTooShort {
            addr,
            have: current.len(),
            need: write_len,
        });
    }
    let current = &current[..write_len];
    let original = &site.displaced()[..write_len];
    let verified_from = match existing {
        Some(len) if current != original => len,
        _ => 0,
    };
    if let Some(i) = (verified_from..write_len).find(|&i| current[i] != original[i]) {
        return Err(PlanError::UnexpectedBytes {
            addr: addr + i as u64,
            found: current[i],
            expected: original[i],
        });
    }
    let mut new = [0u8; MAX_WRITE_LEN];
    new[..need].copy_from_slice(jump.as_bytes());
    new[need..write_len].copy_from_slice(&original[need..]);
    plan_write(addr, current, &new[..write_len])
}

/// The plan that takes an applied plan back: same protocol, from its result to its expected bytes.
///
/// ```
/// use lp_core::plan::{plan_write, plan_revert};
/// let apply = plan_write(0x1000, &[0x55, 0x48, 0x89, 0xe5, 0x90], &[0xe9, 1, 2, 3, 4]).unwrap();
/// let revert = plan_revert(&apply);
/// assert_eq!(revert.expected(), apply.result());
/// assert_eq!(revert.result(), apply.expected());
/// ```
pub fn plan_revert(applied: &WritePlan) -> WritePlan {
    build(applied.addr, applied.result(), applied.expected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::validate_site;

    fn run(plan: &WritePlan) -> [u8; MAX_WRITE_LEN] {
        let mut mem = [0u8; MAX_WRITE_LEN];
        mem[..plan.len()].copy_from_slice(plan.expected());
        for s in plan.steps() {
            assert!(s.apply(plan.addr(), &mut mem));
        }
        mem
    }

    #[test]
    fn collapses() {
        // first byte already int3: no step 1
        let p = plan_write(0, &[0xcc, 1, 2], &[0x90, 3, 4]).unwrap();
        assert_eq!(p.steps().len(), 4);
        assert_eq!(p.steps()[0].data(), Some((1, &[3, 4][..])));
        // new first byte is int3: no step 3
        let p = plan_write(0, &[0x90, 1, 2], &[0xcc, 3, 4]).unwrap();
        assert_eq!(p.steps().len(), 4);
        assert_eq!(run(&p)[..3], [0xcc, 3, 4]);
        // only the tail differs: the first byte still goes through int3 and back
        let p = plan_write(7, &[0x90, 1, 2], &[0x90, 3, 4]).unwrap();
        assert_eq!(p.steps().len(), 6);
        assert_eq!(p.steps()[4].data(), Some((7, &[0x90][..])));
        // a single byte
        let p = plan_write(7, &[0x90], &[0xc3]).unwrap();
        assert_eq!(p.steps().len(), 4);
    }

    #[test]
    fn bad_inputs() {
        assert_eq!(
            plan_write(0, &[], &[]),
            Err(PlanError::BadLength { len: 0, max: 16 })
        );
        assert!(matches!(
            plan_write(0, &[0; 17], &[1; 17]),
            Err(PlanError::BadLength { .. })
        ));
        assert!(matches!(
            plan_write(u64::MAX - 1, &[0; 4], &[1; 4]),
            Err(PlanError::AddressOverflow { .. })
        ));
    }

    #[test]
    fn apply_refuses_unexpected_bytes_and_far_targets() {
        let code = [0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3];
        let site = validate_site(&code, 0x1000, 5).unwrap();
        let mut changed = code;
        changed[2] = 0x8b;
        assert_eq!(
            plan_apply(&site, &changed, 0x2000),
            Err(PlanError::UnexpectedBytes {
                addr: 0x1002,
                found: 0x8b,
                expected: 0x89
            })
        );
        assert!(matches!(
            plan_apply(&site, &code, 0x7fff_0000_0000),
            Err(PlanError::JumpDoesNotFit {
                jump_len: 14,
                room: 6,
                ..
            })
        ));
        assert!(matches!(
            plan_apply(&site, &code[..3], 0x2000),
            Err(PlanError::CurrentTooShort {
                have: 3,
                need: 5,
                ..
            })
        ));
    }

    #[test]
    fn stacking_and_reverting_in_order() {
        let code = [0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3];
        let site = validate_site(&code, 0x1000, 5).unwrap();
        let p1 = plan_apply(&site, &code, 0x2000).unwrap();
        let p2 = plan_apply(&site, p1.result(), 0x3000).unwrap();
        assert_eq!(run(&p2)[..5], *Jump::to(0x1000, 0x3000).as_bytes());
        let r2 = plan_revert(&p2);
        assert_eq!(run(&r2)[..5], *p1.result());
        let r1 = plan_revert(&p1);
        assert_eq!(run(&r1)[..5], code[..5]);
    }

    /// A 20-byte site (room for the absolute jump) at 0x1000.
    fn long_site() -> ([u8; 21], Site) {
        // 5x `mov eax,imm32` (b8 xx xx xx xx) then ret
        let mut code = [0xc3u8; 21];
        for (i, chunk) in code[..20].chunks_mut(5).enumerate() {
            chunk.copy_from_slice(&[0xb8, i as u8, 0, 0, 0]);
        }
        let site = validate_site(&code, 0x1000, 14).unwrap();
        assert_eq!(site.displaced_len, 15);
        (code, site)
    }

    #[test]
    fn stacking_verifies_the_bytes_past_a_shorter_jump() {
        let (code, site) = long_site();
        let p1 = plan_apply(&site, &code, 0x2000).unwrap();
        assert_eq!(p1.len(), 5);
        let mut current = code;
        current[..5].copy_from_slice(p1.result());
        // the rel32 jump of ours, then the originals: an absolute jump stacks on it
        let far = 0x7fff_0000_0000;
        let p2 = plan_apply(&site, &current, far).unwrap();
        assert_eq!(p2.expected(), &current[..14]);
        assert_eq!(p2.result(), Jump::absolute(far).as_bytes());
        // someone changed a byte the rel32 jump does not cover: refused, naming it
        current[9] = 0x90;
        assert_eq!(
            plan_apply(&site, &current, far),
            Err(PlanError::UnexpectedBytes {
                addr: 0x1009,
                found: 0x90,
                expected: code[9]
            })
        );
    }

    #[test]
    fn a_near_jump_stacked_on_an_absolute_one_restores_the_bytes_it_no_longer_covers() {
        let (code, site) = long_site();
        let far = 0x7fff_0000_0000;
        let p1 = plan_apply(&site, &code, far).unwrap();
        let mut current = code;
        current[..14].copy_from_slice(p1.result());
        let p2 = plan_apply(&site, &current, 0x2000).unwrap();
        assert_eq!(p2.len(), 14);
        assert_eq!(&p2.result()[..5], Jump::to(0x1000, 0x2000).as_bytes());
        assert_eq!(&p2.result()[5..], &code[5..14]);
        let mut mem = [0u8; MAX_WRITE_LEN];
        mem[..14].copy_from_slice(&current[..14]);
        for s in p2.steps().iter().chain(plan_revert(&p2).steps()) {
            assert!(s.apply(0x1000, &mut mem));
        }
        assert_eq!(&mem[..14], p1.result());
    }
}

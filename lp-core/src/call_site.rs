//! Call sites: a caller's direct branch to a replaced function, retargeted at the new code so
//! that the call no longer goes through the redirect at the old entry.
//!
//! A patched function costs one extra `jmp` per call: the old entry's redirect into the patch
//! memory, another 4 KiB page. For direct callers that jump can go away: their `call rel32`
//! (`e8`), tail-call `jmp rel32` (`e9`) or conditional tail call `jcc rel32` (`0f 80`..`0f 8f`)
//! names the old entry in its displacement, and rewriting the displacement sends the caller
//! straight to the new code. Calls through function pointers, the PLT or another module's GOT
//! keep reaching the old entry, whose redirect still leads to the new code.
//!
//! This module only reasons about bytes: [`decode`] recognises exactly one such instruction,
//! [`plan_retarget`] checks that the bytes given are one, computes the new displacement (with a
//! reach check) and returns the [`WritePlan`] that rewrites it with the int3 protocol of
//! [`crate::plan`]. The instruction keeps its opcode and length, so a thread stopped at the
//! site resumes at an instruction boundary and runs either the old or the new instruction.
//! Nothing allocates.

use crate::plan::{plan_write, PlanError, WritePlan};

/// Length of `call rel32` and `jmp rel32`.
///
/// ```
/// use lp_core::call_site::{decode, REL32_BRANCH_LEN};
/// assert_eq!(decode(0x1000, &[0xe8, 0, 0, 0, 0]).unwrap().len, REL32_BRANCH_LEN);
/// ```
pub const REL32_BRANCH_LEN: usize = 5;

/// Length of `jcc rel32` (`0f 8x` and the displacement).
///
/// ```
/// use lp_core::call_site::{decode, JCC_REL32_LEN};
/// assert_eq!(decode(0x1000, &[0x0f, 0x84, 0, 0, 0, 0]).unwrap().len, JCC_REL32_LEN);
/// ```
pub const JCC_REL32_LEN: usize = 6;

/// The longest call-site instruction ([`JCC_REL32_LEN`]).
///
/// ```
/// use lp_core::call_site::{MAX_CALL_SITE_LEN, JCC_REL32_LEN};
/// assert_eq!(MAX_CALL_SITE_LEN, JCC_REL32_LEN);
/// ```
pub const MAX_CALL_SITE_LEN: usize = JCC_REL32_LEN;

/// Which branch a call site is.
///
/// ```
/// use lp_core::call_site::{decode, BranchKind};
/// assert_eq!(decode(0, &[0xe9, 0, 0, 0, 0]).unwrap().kind, BranchKind::Jump);
/// assert_eq!(decode(0, &[0x0f, 0x85, 0, 0, 0, 0]).unwrap().kind, BranchKind::CondJump(0x85));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BranchKind {
    /// `call rel32` (`e8`).
    Call,
    /// `jmp rel32` (`e9`): a tail call.
    Jump,
    /// `jcc rel32` (`0f` and this second opcode byte, `0x80..=0x8f`): a conditional tail call.
    CondJump(u8),
}

impl BranchKind {
    /// The opcode bytes (one or two).
    ///
    /// ```
    /// use lp_core::call_site::BranchKind;
    /// assert_eq!(BranchKind::Call.opcode(), &[0xe8]);
    /// assert_eq!(BranchKind::CondJump(0x84).opcode(), &[0x0f, 0x84]);
    /// ```
    pub fn opcode(&self) -> &'static [u8] {
        const JCC: [[u8; 2]; 16] = {
            let mut t = [[0x0f, 0]; 16];
            let mut i = 0;
            while i < 16 {
                t[i][1] = 0x80 + i as u8;
                i += 1;
            }
            t
        };
        match self {
            BranchKind::Call => &[0xe8],
            BranchKind::Jump => &[0xe9],
            BranchKind::CondJump(cc) => &JCC[(*cc & 0x0f) as usize],
        }
    }

    /// Instruction length: the opcode and a 4-byte displacement.
    ///
    /// ```
    /// use lp_core::call_site::BranchKind;
    /// assert_eq!(BranchKind::Jump.len(), 5);
    /// assert_eq!(BranchKind::CondJump(0x8f).len(), 6);
    /// ```
    #[allow(clippy::len_without_is_empty)] // an instruction is never empty
    pub fn len(&self) -> usize {
        self.opcode().len() + 4
    }
}

/// A decoded call site: one direct rel32 branch at `addr`.
///
/// ```
/// use lp_core::call_site::{decode, BranchKind};
/// // call 0x2000, placed at 0x1000: rel32 = 0x2000 - 0x1005
/// let site = decode(0x1000, &[0xe8, 0xfb, 0x0f, 0, 0]).unwrap();
/// assert_eq!((site.kind, site.target, site.len), (BranchKind::Call, 0x2000, 5));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CallSite {
    /// Address of the instruction's first byte.
    pub addr: u64,
    /// Which branch.
    pub kind: BranchKind,
    /// Instruction length (5 or 6).
    pub len: usize,
    /// Where it branches to now.
    pub target: u64,
}

/// Why bytes are not a call site, or cannot be retargeted. `Display` is one line.
///
/// ```
/// use lp_core::call_site::{decode, CallSiteError};
/// let err = decode(0x1000, &[0xff, 0x15, 0, 0, 0, 0]).unwrap_err();
/// assert_eq!(err, CallSiteError::NotABranch { addr: 0x1000, opcode: 0xff });
/// assert!(err.to_string().contains("0x1000"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum CallSiteError {
    /// The first bytes are not `e8`, `e9` or `0f 80`..`0f 8f`.
    #[error("bytes at {addr:#x} are not a call/jmp/jcc rel32 (opcode {opcode:#04x})")]
    NotABranch {
        /// The site.
        addr: u64,
        /// The first byte found (the second one for a `0f` that is not `0f 8x`).
        opcode: u8,
    },
    /// Fewer or more bytes than the instruction's length were given.
    #[error("{have} bytes given at {addr:#x} for a {need}-byte branch")]
    WrongLength {
        /// The site.
        addr: u64,
        /// Bytes given.
        have: usize,
        /// The instruction's length.
        need: usize,
    },
    /// The instruction would end past the top of the address space.
    #[error("a {len}-byte branch at {addr:#x} wraps around the address space")]
    Wraps {
        /// The site.
        addr: u64,
        /// The instruction's length.
        len: usize,
    },
    /// The new destination is beyond ±2 GiB of the end of the instruction.
    #[error("{dest:#x} is out of rel32 reach of the branch at {addr:#x}")]
    OutOfReach {
        /// The site.
        addr: u64,
        /// The destination asked for.
        dest: u64,
    },
    /// The current bytes branch somewhere other than expected.
    #[error("the branch at {addr:#x} goes to {found:#x}, expected {expected:#x}")]
    UnexpectedTarget {
        /// The site.
        addr: u64,
        /// Where it branches to.
        found: u64,
        /// Where it should.
        expected: u64,
    },
    /// The write plan could not be made.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Recognises `bytes` (at `addr`) as exactly one direct rel32 branch: `call`, `jmp` or `jcc`,
/// without prefixes, nothing after it, not wrapping around the address space.
///
/// ```
/// use lp_core::call_site::{decode, CallSiteError};
/// let jcc = decode(0x1000, &[0x0f, 0x84, 0x00, 0x01, 0x00, 0x00]).unwrap();
/// assert_eq!(jcc.target, 0x1106);
/// // a call followed by another byte is not one instruction
/// assert!(matches!(decode(0, &[0xe8, 0, 0, 0, 0, 0x90]), Err(CallSiteError::WrongLength { .. })));
/// // the target wraps around the address space like the CPU's
/// assert_eq!(decode(0, &[0xe8, 0xf6, 0xff, 0xff, 0xff]).unwrap().target, u64::MAX - 4);
/// ```
pub fn decode(addr: u64, bytes: &[u8]) -> Result<CallSite, CallSiteError> {
    let kind = match bytes {
        [0xe8, ..] => BranchKind::Call,
        [0xe9, ..] => BranchKind::Jump,
        [0x0f, cc @ 0x80..=0x8f, ..] => BranchKind::CondJump(*cc),
        [0x0f, other, ..] => {
            return Err(CallSiteError::NotABranch {
                addr,
                opcode: *other,
            })
        }
        [first, ..] => {
            return Err(CallSiteError::NotABranch {
                addr,
                opcode: *first,
            })
        }
        [] => {
            return Err(CallSiteError::WrongLength {
                addr,
                have: 0,
                need: REL32_BRANCH_LEN,
            })
        }
    };
    let len = kind.len();
    if bytes.len() != len {
        return Err(CallSiteError::WrongLength {
            addr,
            have: bytes.len(),
            need: len,
        });
    }
    if addr.checked_add(len as u64).is_none() {
        return Err(CallSiteError::Wraps { addr, len });
    }
    let mut rel = [0u8; 4];
    rel.copy_from_slice(&bytes[len - 4..]);
    let rel = i32::from_le_bytes(rel) as i64 as u64;
    let target = addr.wrapping_add(len as u64).wrapping_add(rel);
    Ok(CallSite {
        addr,
        kind,
        len,
        target,
    })
}

/// The bytes of a `kind` branch placed at `addr` going to `dest` (`kind.len()` of them are
/// meaningful), or [`CallSiteError::OutOfReach`].
///
/// ```
/// use lp_core::call_site::{encode, BranchKind};
/// let b = encode(BranchKind::Call, 0x1000, 0x2000).unwrap();
/// assert_eq!(&b[..5], &[0xe8, 0xfb, 0x0f, 0, 0]);
/// assert!(encode(BranchKind::Jump, 0, 0x1_0000_0000).is_err());
/// ```
pub fn encode(
    kind: BranchKind,
    addr: u64,
    dest: u64,
) -> Result<[u8; MAX_CALL_SITE_LEN], CallSiteError> {
    let len = kind.len();
    let next = addr.wrapping_add(len as u64);
    let rel = i32::try_from(dest.wrapping_sub(next) as i64)
        .map_err(|_| CallSiteError::OutOfReach { addr, dest })?;
    let mut out = [0u8; MAX_CALL_SITE_LEN];
    let op = kind.opcode();
    out[..op.len()].copy_from_slice(op);
    out[op.len()..len].copy_from_slice(&rel.to_le_bytes());
    Ok(out)
}

/// Plans rewriting the call site whose bytes are now `current` (at `addr`) so that it goes to
/// `dest`: same opcode, new displacement. Checks that `current` is one direct rel32 branch
/// ([`decode`]) and that `dest` is in reach. Retargeting to where it already goes gives an
/// empty plan ([`WritePlan::is_noop`]). Reverting is [`crate::plan::plan_revert`] of the
/// result, or another `plan_retarget` back.
///
/// ```
/// use lp_core::call_site::plan_retarget;
/// use lp_core::plan::Step;
/// let now = [0xe8, 0xfb, 0x0f, 0, 0]; // call 0x2000 at 0x1000
/// let plan = plan_retarget(0x1000, &now, 0x5000).unwrap();
/// assert_eq!(plan.expected(), &now);
/// assert_eq!(plan.result(), &[0xe8, 0xfb, 0x3f, 0, 0]);
/// // int3 first, then the displacement, then the opcode back
/// assert_eq!(plan.steps()[0].data(), Some((0x1000, &[0xcc][..])));
/// assert_eq!(plan.steps()[2].data(), Some((0x1001, &[0xfb, 0x3f, 0, 0][..])));
/// assert_eq!(plan.steps()[4].data(), Some((0x1000, &[0xe8][..])));
/// assert!(plan_retarget(0x1000, &now, 0x2000).unwrap().is_noop());
/// ```
pub fn plan_retarget(addr: u64, current: &[u8], dest: u64) -> Result<WritePlan, CallSiteError> {
    let site = decode(addr, current)?;
    let new = encode(site.kind, addr, dest)?;
    Ok(plan_write(addr, current, &new[..site.len])?)
}

/// Like [`plan_retarget`], but first checks that the site goes to `expected_target` now
/// (where the adapter's records say it must go): a site branching elsewhere was changed by
/// someone else and is refused.
///
/// ```
/// use lp_core::call_site::{plan_retarget_from, CallSiteError};
/// let now = [0xe9, 0xfb, 0x0f, 0, 0]; // jmp 0x2000 at 0x1000
/// assert!(plan_retarget_from(0x1000, &now, 0x2000, 0x3000).is_ok());
/// assert_eq!(
///     plan_retarget_from(0x1000, &now, 0x2100, 0x3000),
///     Err(CallSiteError::UnexpectedTarget { addr: 0x1000, found: 0x2000, expected: 0x2100 })
/// );
/// ```
pub fn plan_retarget_from(
    addr: u64,
    current: &[u8],
    expected_target: u64,
    dest: u64,
) -> Result<WritePlan, CallSiteError> {
    let site = decode(addr, current)?;
    if site.target != expected_target {
        return Err(CallSiteError::UnexpectedTarget {
            addr,
            found: site.target,
            expected: expected_target,
        });
    }
    plan_retarget(addr, current, dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan_revert, Step};
    use crate::site::INT3;

    fn run(plan: &WritePlan, mem: &mut [u8]) {
        for s in plan.steps() {
            assert!(s.apply(plan.addr(), mem));
            // Every intermediate state is the old instruction, an int3, or the new one.
            assert!(mem == plan.expected() || mem == plan.result() || mem[0] == INT3);
        }
        assert_eq!(mem, plan.result());
    }

    #[test]
    fn every_kind_round_trips() {
        let kinds = [BranchKind::Call, BranchKind::Jump]
            .into_iter()
            .chain((0x80..=0x8f).map(BranchKind::CondJump));
        for kind in kinds {
            let addr = 0x40_1000;
            let old = encode(kind, addr, 0x40_2000).unwrap();
            let old = &old[..kind.len()];
            let site = decode(addr, old).unwrap();
            assert_eq!(
                (site.kind, site.target, site.len),
                (kind, 0x40_2000, kind.len())
            );
            let plan = plan_retarget(addr, old, 0x7fff_0000).unwrap();
            let mut mem = old.to_vec();
            run(&plan, &mut mem);
            assert_eq!(decode(addr, &mem).unwrap().target, 0x7fff_0000);
            assert_eq!(decode(addr, &mem).unwrap().kind, kind);
            run(&plan_revert(&plan), &mut mem);
            assert_eq!(mem, old);
        }
    }

    #[test]
    fn reach_limits_are_relative_to_the_end_of_the_instruction() {
        let addr = 0x1_0000_0000u64;
        for kind in [BranchKind::Call, BranchKind::CondJump(0x84)] {
            let end = addr + kind.len() as u64;
            let max = end + i32::MAX as u64;
            let min = end - (1u64 << 31);
            assert!(encode(kind, addr, max).is_ok());
            assert!(encode(kind, addr, min).is_ok());
            assert_eq!(
                encode(kind, addr, max + 1),
                Err(CallSiteError::OutOfReach {
                    addr,
                    dest: max + 1
                })
            );
            assert!(encode(kind, addr, min - 1).is_err());
        }
        let now = encode(BranchKind::Call, addr, addr).unwrap();
        assert!(matches!(
            plan_retarget(addr, &now[..5], addr + (3 << 30)),
            Err(CallSiteError::OutOfReach { .. })
        ));
    }

    #[test]
    fn other_instructions_are_refused() {
        // call [rip+0]; jmp rel8; jcc rel8; nop; two-byte 0f that is not jcc; prefixed call
        let cases: [&[u8]; 6] = [
            &[0xff, 0x15, 0, 0, 0, 0],
            &[0xeb, 0x00],
            &[0x74, 0x00],
            &[0x90, 0, 0, 0, 0],
            &[0x0f, 0x05, 0, 0, 0, 0],
            &[0x66, 0xe8, 0, 0, 0, 0],
        ];
        for c in cases {
            assert!(
                matches!(decode(0, c), Err(CallSiteError::NotABranch { .. })),
                "{c:02x?}"
            );
        }
        assert!(matches!(
            decode(0, &[0xe8, 0, 0]),
            Err(CallSiteError::WrongLength {
                have: 3,
                need: 5,
                ..
            })
        ));
        assert!(matches!(
            decode(0, &[0x0f, 0x84, 0, 0, 0]),
            Err(CallSiteError::WrongLength {
                have: 5,
                need: 6,
                ..
            })
        ));
        assert!(matches!(
            decode(0, &[]),
            Err(CallSiteError::WrongLength { have: 0, .. })
        ));
        // found by the fuzzer: a jcc whose last byte would be past the top of the address space
        assert_eq!(
            decode(u64::MAX - 1, &[0x0f, 0x84, 0, 0, 0, 0]),
            Err(CallSiteError::Wraps {
                addr: u64::MAX - 1,
                len: 6
            })
        );
    }

    #[test]
    fn the_plan_goes_through_int3_even_when_only_the_displacement_changes() {
        let now = encode(BranchKind::Call, 0x1000, 0x2000).unwrap();
        let plan = plan_retarget(0x1000, &now[..5], 0x2004).unwrap();
        // only byte 1 differs, but the first byte is still made int3 around the change
        assert_eq!(plan.steps()[0].data(), Some((0x1000, &[INT3][..])));
        assert_eq!(plan.steps()[1], Step::Sync);
        assert_eq!(plan.steps().len(), 6);
    }

    #[test]
    fn a_site_with_our_int3_on_it_is_not_a_branch() {
        let mut now = encode(BranchKind::Call, 0x1000, 0x2000).unwrap();
        now[0] = INT3;
        assert!(matches!(
            plan_retarget(0x1000, &now[..5], 0x3000),
            Err(CallSiteError::NotABranch { opcode: INT3, .. })
        ));
    }
}

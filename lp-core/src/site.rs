//! Can this function's entry be patched, and where exactly does the redirect go?
//!
//! [`validate_site`] decodes the *whole* function with iced-x86 (it has to see every branch) and
//! answers with a [`Site`] or a [`SiteError`] naming the reason.
//!
//! Rules, and why:
//! - **Instruction boundaries.** The redirect covers whole instructions: the displaced range is the
//!   shortest run of instructions from the patch address that is at least as long as the jump.
//!   Those instructions are what a trampoline re-runs (see [`crate::trampoline`]).
//! - **`endbr64` stays.** With CET/IBT (`-fcf-protection`), indirect calls must land on an
//!   `endbr64`. The redirect goes right after it, so the entry stays a valid indirect-branch
//!   target and callers through function pointers still work.
//! - **`-fpatchable-function-entry=N,M`.** gcc puts `M` NOPs before the symbol and `N-M` NOPs at the
//!   entry. The bytes before the symbol are not part of the function's bytes we are given, so we
//!   cannot prove they belong to this function; we therefore patch at the entry like anywhere
//!   else, and the entry NOPs are simply displaced instructions (they give the jump room: a
//!   4-byte `lea; ret` function with 2 entry NOPs becomes patchable). [`Site::entry_nops`] reports
//!   them.
//! - **Room for the jump.** A function shorter than the jump is refused: the bytes after its end
//!   (alignment padding, usually `int3` or NOPs) belong to nobody we can prove, and another
//!   function may start there.
//! - **No branch into the overwritten bytes.** A branch anywhere in the function that lands inside
//!   the displaced range (other than its very first byte) would execute the middle of the jump.
//!   A branch to the patch address itself is fine: it runs the redirect, which is what a call to
//!   the function does. [`Site::branches_to_patch_addr`] counts them (the loop then continues in
//!   the new function).
//! - **Everything decodes.** An undecodable or truncated instruction anywhere means we do not
//!   understand the function, so we cannot prove the previous rule: refused.
//! - **Not already redirected.** An `int3` at the patch address (a debugger's breakpoint, or a
//!   patch in progress) or our 14-byte absolute jump (no compiler emits it) is refused. A `jmp
//!   rel32` at the entry is legitimate compiled code (a tail-call thunk), so adapters must
//!   validate the function's *original* bytes (from the patch file or saved state), not bytes that
//!   may already carry a redirect; stacking is handled by [`crate::plan::plan_apply`].
//!
//! What cannot be seen from the function's own bytes is not checked: indirect jumps (switch jump
//! tables) are assumed not to target the first bytes ([`Site::indirect_branches`] says whether the
//! function has any), and neither are branches from other functions (e.g. gcc's `.cold`
//! fragments, which jump back into their parent's body, never to its first instructions).

use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};

use crate::jump::{Jump, MAX_JUMP_LEN};

/// Encoding of `endbr64`, the CET indirect-branch landing pad.
///
/// ```
/// use lp_core::site::{validate_site, ENDBR64};
/// let mut code = ENDBR64.to_vec();
/// code.extend([0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3]); // push rbp; mov rbp,rsp; pop rbp; ret
/// assert!(validate_site(&code, 0x1000, 5).unwrap().endbr64);
/// ```
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// The most bytes a redirect can displace: the longest jump plus the rest of one maximal
/// (15-byte) instruction, rounded up.
///
/// ```
/// use lp_core::{jump::MAX_JUMP_LEN, site::MAX_DISPLACED_LEN};
/// assert!(MAX_DISPLACED_LEN >= MAX_JUMP_LEN + 14);
/// ```
pub const MAX_DISPLACED_LEN: usize = 32;

/// The opcode of `int3`.
///
/// ```
/// use lp_core::{plan::plan_write, site::INT3};
/// let plan = plan_write(0x1000, &[0x55, 0x48], &[0xe9, 0x00]).unwrap();
/// assert_eq!(plan.steps()[0].data(), Some((0x1000, &[INT3][..])));
/// ```
pub const INT3: u8 = 0xcc;

/// A validated patch site: where the redirect goes and which instructions it displaces.
///
/// A fixed-size value holding a copy of the displaced original bytes, so planning and trampoline
/// building need nothing else.
///
/// ```
/// use lp_core::site::validate_site;
/// // endbr64; push rbp; mov rbp,rsp; mov eax,1; pop rbp; ret
/// let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0xb8, 1, 0, 0, 0, 0x5d, 0xc3];
/// let site = validate_site(&code, 0x40_1000, 5).unwrap();
/// assert_eq!(site.patch_addr, 0x40_1004); // after endbr64
/// assert_eq!(site.displaced_len, 9);      // push (1) + mov (3) + mov (5): first cover of 5 bytes
/// assert_eq!(site.displaced(), &code[4..13]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Site {
    /// The function's first byte (its symbol address).
    pub entry: u64,
    /// Where the redirect is written: the entry, or just after its `endbr64`.
    pub patch_addr: u64,
    /// Bytes of the whole instructions covered by the redirect (>= [`Site::jump_len`]).
    pub displaced_len: usize,
    /// Number of instructions in the displaced range.
    pub displaced_count: usize,
    /// The jump length this site was validated for (room is guaranteed for it).
    pub jump_len: usize,
    /// The entry starts with `endbr64` (kept intact; the redirect follows it).
    pub endbr64: bool,
    /// Bytes of NOP instructions right at the patch address (a `-fpatchable-function-entry`
    /// pad); they are displaced like any other instruction.
    pub entry_nops: usize,
    /// Branches elsewhere in the function that target the patch address itself (allowed: they
    /// run the redirect, like a recursive call would).
    pub branches_to_patch_addr: usize,
    /// Displaced instructions that are RIP-relative (memory operand or relative branch) and so
    /// need re-encoding in a trampoline.
    pub relative_in_displaced: usize,
    /// The function contains indirect jumps, whose targets cannot be checked from its bytes.
    pub indirect_branches: bool,
    displaced: [u8; MAX_DISPLACED_LEN],
}

impl Site {
    /// The original bytes of the displaced instructions (`displaced_len` of them).
    ///
    /// ```
    /// use lp_core::site::validate_site;
    /// let code = [0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3]; // push rbp; mov rbp,rsp; xor eax,eax; pop rbp; ret
    /// let site = validate_site(&code, 0x1000, 5).unwrap();
    /// assert_eq!(site.displaced(), &code[..6]);
    /// ```
    pub fn displaced(&self) -> &[u8] {
        &self.displaced[..self.displaced_len]
    }

    /// Offset of the patch address from the entry (0, or 4 after `endbr64`).
    ///
    /// ```
    /// use lp_core::site::validate_site;
    /// let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x8d, 0x04, 0x37, 0x90, 0xc3];
    /// assert_eq!(validate_site(&code, 0x1000, 5).unwrap().patch_offset(), 4);
    /// ```
    pub fn patch_offset(&self) -> usize {
        self.patch_addr.wrapping_sub(self.entry) as usize
    }

    /// The first original instruction after the displaced ones: where a trampoline jumps back to.
    ///
    /// ```
    /// use lp_core::site::validate_site;
    /// let code = [0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3];
    /// assert_eq!(validate_site(&code, 0x1000, 5).unwrap().resume_addr(), 0x1006);
    /// ```
    pub fn resume_addr(&self) -> u64 {
        self.patch_addr.wrapping_add(self.displaced_len as u64)
    }

    /// Whether `jump` fits in the displaced range (a site validated for a 5-byte jump may still
    /// have room for the 14-byte one).
    ///
    /// ```
    /// use lp_core::{jump::Jump, site::validate_site};
    /// let code = [0x55, 0x48, 0x89, 0xe5, 0x31, 0xc0, 0x5d, 0xc3];
    /// let site = validate_site(&code, 0x1000, 5).unwrap();
    /// assert!(site.fits(&Jump::to(0x1000, 0x2000)));
    /// assert!(!site.fits(&Jump::absolute(0x2000)));
    /// ```
    pub fn fits(&self, jump: &Jump) -> bool {
        jump.len() <= self.displaced_len
    }
}

/// Why a function's entry cannot be patched. `Display` is one line naming the problem.
///
/// ```
/// use lp_core::site::{validate_site, SiteError};
/// // 0: xor eax,eax; 2: add eax,1; 5: cmp eax,edi; 7: jne 2; 9: ret — the loop head is 2 bytes in
/// let code = [0x31, 0xc0, 0x83, 0xc0, 0x01, 0x39, 0xf8, 0x75, 0xf9, 0xc3];
/// let err = validate_site(&code, 0x1000, 5).unwrap_err();
/// assert_eq!(err, SiteError::BranchIntoPatchedBytes { from: 0x1007, to: 0x1002 });
/// assert_eq!(err.to_string(), "branch at 0x1007 lands at 0x1002, inside the bytes the redirect overwrites");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SiteError {
    /// The function ends before the jump does.
    #[error(
        "function at {entry:#x} is too short: {available} bytes from the patch address, the jump needs {needed}"
    )]
    TooShort {
        /// The function's entry.
        entry: u64,
        /// Bytes from the patch address to the end of the function.
        available: usize,
        /// Bytes the jump needs.
        needed: usize,
    },
    /// A branch in the function lands inside the bytes the redirect overwrites.
    #[error("branch at {from:#x} lands at {to:#x}, inside the bytes the redirect overwrites")]
    BranchIntoPatchedBytes {
        /// Address of the branch instruction.
        from: u64,
        /// Its target.
        to: u64,
    },
    /// An instruction iced-x86 cannot decode.
    #[error("undecodable instruction at {addr:#x}")]
    UndecodableInstruction {
        /// Address of the instruction.
        addr: u64,
    },
    /// The last instruction runs past the end of the function's bytes.
    #[error("instruction at {addr:#x} runs past the end of the function")]
    TruncatedInstruction {
        /// Address of the instruction.
        addr: u64,
    },
    /// There is an `int3` at the patch address.
    #[error("int3 at {addr:#x}: a breakpoint or a patch in progress is already there")]
    BreakpointAtSite {
        /// The patch address.
        addr: u64,
    },
    /// Our absolute jump is already at the patch address.
    #[error("site {addr:#x} already holds a redirect to {target:#x}; validate the original bytes")]
    AlreadyPatched {
        /// The patch address.
        addr: u64,
        /// Where the existing redirect goes.
        target: u64,
    },
    /// The requested jump length is not one this crate can write.
    #[error("unsupported jump length {len} (1..={max})")]
    UnsupportedJumpLen {
        /// The length asked for.
        len: usize,
        /// The longest supported jump.
        max: usize,
    },
    /// `entry + code.len()` wraps around the address space.
    #[error("function at {entry:#x} of {len} bytes wraps around the address space")]
    AddressOverflow {
        /// The function's entry.
        entry: u64,
        /// Its length.
        len: usize,
    },
}

/// Validate the patch site of the function whose bytes (`code`, the symbol's size, as in memory
/// now) start at `entry`, for a redirect of `jump_len` bytes.
///
/// Allocation-free: the function is decoded twice, once for the displaced range and once for
/// every branch.
///
/// ```
/// use lp_core::site::{validate_site, SiteError};
/// // a 1-byte function: `ret`
/// let err = validate_site(&[0xc3], 0x1000, 5).unwrap_err();
/// assert!(matches!(err, SiteError::TooShort { available: 1, needed: 5, .. }));
/// assert_eq!(err.to_string(), "function at 0x1000 is too short: 1 bytes from the patch address, the jump needs 5");
/// ```
pub fn validate_site(code: &[u8], entry: u64, jump_len: usize) -> Result<Site, SiteError> {
    if jump_len == 0 || jump_len > MAX_JUMP_LEN {
        return Err(SiteError::UnsupportedJumpLen {
            len: jump_len,
            max: MAX_JUMP_LEN,
        });
    }
    if entry.checked_add(code.len() as u64).is_none() {
        return Err(SiteError::AddressOverflow {
            entry,
            len: code.len(),
        });
    }
    let endbr64 = code.starts_with(&ENDBR64);
    let patch_offset = if endbr64 { ENDBR64.len() } else { 0 };
    let patch_addr = entry + patch_offset as u64;
    let body = &code[patch_offset..];
    if body.len() < jump_len {
        return Err(SiteError::TooShort {
            entry,
            available: body.len(),
            needed: jump_len,
        });
    }
    if body[0] == INT3 {
        return Err(SiteError::BreakpointAtSite { addr: patch_addr });
    }
    if let Some((jump, target)) = Jump::decode(patch_addr, body) {
        if jump.is_absolute() {
            return Err(SiteError::AlreadyPatched {
                addr: patch_addr,
                target,
            });
        }
    }

    let mut site = Site {
        entry,
        patch_addr,
        displaced_len: 0,
        displaced_count: 0,
        jump_len,
        endbr64,
        entry_nops: 0,
        branches_to_patch_addr: 0,
        relative_in_displaced: 0,
        indirect_branches: false,
        displaced: [0; MAX_DISPLACED_LEN],
    };

    // Pass 1: the displaced range, from the patch address.
    let mut decoder = Decoder::with_ip(64, body, patch_addr, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    let mut in_nop_pad = true;
    while site.displaced_len < jump_len {
        decode_checked(&mut decoder, &mut instr)?;
        if in_nop_pad && instr.mnemonic() == Mnemonic::Nop {
            site.entry_nops += instr.len();
        } else {
            in_nop_pad = false;
        }
        if is_relative(&instr) {
            site.relative_in_displaced += 1;
        }
        site.displaced_len += instr.len();
        site.displaced_count += 1;
    }
    site.displaced[..site.displaced_len].copy_from_slice(&body[..site.displaced_len]);

    // Pass 2: every instruction of the function, from the entry, for branches into the range.
    let overwritten_start = patch_addr + 1;
    let overwritten_end = patch_addr + site.displaced_len as u64;
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    while decoder.can_decode() {
        decode_checked(&mut decoder, &mut instr)?;
        if is_near_branch(&instr) {
            let to = instr.near_branch_target();
            if (overwritten_start..overwritten_end).contains(&to) {
                return Err(SiteError::BranchIntoPatchedBytes {
                    from: instr.ip(),
                    to,
                });
            }
            if to == patch_addr {
                site.branches_to_patch_addr += 1;
            }
        } else if instr.flow_control() == FlowControl::IndirectBranch {
            site.indirect_branches = true;
        }
    }
    Ok(site)
}

/// Decode one instruction, turning iced's "invalid" into our reasons.
fn decode_checked(decoder: &mut Decoder<'_>, instr: &mut Instruction) -> Result<(), SiteError> {
    let addr = decoder.ip();
    if !decoder.can_decode() {
        // Ran out of bytes on an instruction boundary while still needing more.
        return Err(SiteError::TruncatedInstruction { addr });
    }
    decoder.decode_out(instr);
    if instr.is_invalid() {
        return Err(match decoder.last_error() {
            DecoderError::NoMoreBytes => SiteError::TruncatedInstruction { addr },
            _ => SiteError::UndecodableInstruction { addr },
        });
    }
    Ok(())
}

/// A direct near branch (jmp/jcc/call/loop/jrcxz/xbegin with an immediate target).
pub(crate) fn is_near_branch(instr: &Instruction) -> bool {
    instr.op_count() > 0
        && matches!(
            instr.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
}

/// An instruction whose meaning depends on where it sits: RIP-relative memory or a relative branch.
pub(crate) fn is_relative(instr: &Instruction) -> bool {
    is_near_branch(instr) || instr.is_ip_rel_memory_operand()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_jump_lengths() {
        let code = [0x90; 32];
        assert!(matches!(
            validate_site(&code, 0, 0),
            Err(SiteError::UnsupportedJumpLen { .. })
        ));
        assert!(matches!(
            validate_site(&code, 0, 15),
            Err(SiteError::UnsupportedJumpLen { .. })
        ));
    }

    #[test]
    fn branch_into_overwritten_bytes_is_refused() {
        // 0: xor eax,eax ; 2: add eax,1 ; 5: cmp eax,edi ; 7: jne 2 ; 9: ret
        let code = [0x31, 0xc0, 0x83, 0xc0, 0x01, 0x39, 0xf8, 0x75, 0xf9, 0xc3];
        let err = validate_site(&code, 0x1000, 5).unwrap_err();
        assert_eq!(
            err,
            SiteError::BranchIntoPatchedBytes {
                from: 0x1007,
                to: 0x1002
            }
        );
    }

    #[test]
    fn branch_to_the_patch_address_is_allowed() {
        // 0: dec edi ; 2: jne 0 ; 4: xor eax,eax ; 6: ret
        let code = [0xff, 0xcf, 0x75, 0xfc, 0x31, 0xc0, 0xc3];
        let site = validate_site(&code, 0x1000, 5).unwrap();
        assert_eq!(site.branches_to_patch_addr, 1);
        assert_eq!(site.displaced_len, 6);
        assert_eq!(site.relative_in_displaced, 1);
    }

    #[test]
    fn int3_and_absolute_jump_are_refused() {
        let mut code = [0x90u8; 16];
        code[0] = INT3;
        assert_eq!(
            validate_site(&code, 0x10, 5),
            Err(SiteError::BreakpointAtSite { addr: 0x10 })
        );
        let j = Jump::absolute(0xdead_beef);
        let mut code = [0xc3u8; 16];
        code[..14].copy_from_slice(j.as_bytes());
        assert_eq!(
            validate_site(&code, 0x10, 5),
            Err(SiteError::AlreadyPatched {
                addr: 0x10,
                target: 0xdead_beef
            })
        );
    }

    #[test]
    fn undecodable_and_truncated() {
        // 0x06 (push es) is invalid in 64-bit mode
        let code = [0x55, 0x48, 0x89, 0xe5, 0x06, 0xc3];
        assert_eq!(
            validate_site(&code, 0x100, 5),
            Err(SiteError::UndecodableInstruction { addr: 0x104 })
        );
        // mov eax, imm32 cut short
        let code = [0x55, 0x48, 0x89, 0xe5, 0x90, 0xb8, 0x01];
        assert_eq!(
            validate_site(&code, 0x100, 5),
            Err(SiteError::TruncatedInstruction { addr: 0x105 })
        );
        // the displaced range itself is cut short
        let code = [0x55, 0x48, 0x89, 0xe5, 0xb8, 0x01];
        assert_eq!(
            validate_site(&code, 0x100, 5),
            Err(SiteError::TruncatedInstruction { addr: 0x104 })
        );
    }

    #[test]
    fn patchable_entry_nops_are_displaced() {
        // nop; nop; lea eax,[rdi+rsi]; ret  (gcc -O2 -fpatchable-function-entry=16,14)
        let code = [0x90, 0x90, 0x8d, 0x04, 0x37, 0xc3];
        let site = validate_site(&code, 0x2000, 5).unwrap();
        assert_eq!(site.patch_addr, 0x2000);
        assert_eq!(site.entry_nops, 2);
        assert_eq!(site.displaced_len, 5);
    }

    #[test]
    fn overflow_is_refused() {
        assert!(matches!(
            validate_site(&[0x90; 8], u64::MAX - 3, 5),
            Err(SiteError::AddressOverflow { .. })
        ));
    }
}

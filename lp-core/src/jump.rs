//! The redirect instruction written over a patched function's entry.
//!
//! Two encodings, chosen by reach:
//! - `jmp rel32` (`e9 <rel32>`, 5 bytes) when the target is within ±2 GiB of the end of the jump;
//! - `jmp [rip+0]` followed by the absolute target (`ff 25 00 00 00 00 <abs64>`, 14 bytes)
//!   otherwise. It reads its target from the eight bytes right after it, so it needs no register.
//!
//! [`Jump::decode`] recognises both forms again, which is how a planner tells "this site already
//! carries one of our redirects" (stacking) from "this site holds something unexpected".

/// Length of `jmp rel32` (`e9 <rel32>`).
///
/// ```
/// use lp_core::jump::{Jump, REL32_JUMP_LEN};
/// assert_eq!(Jump::rel32(0, 0x100).unwrap().len(), REL32_JUMP_LEN);
/// ```
pub const REL32_JUMP_LEN: usize = 5;
/// Length of the absolute form `jmp [rip+0]; .quad target` (`ff 25 00 00 00 00 <abs64>`).
///
/// ```
/// use lp_core::jump::{Jump, ABS_JUMP_LEN};
/// assert_eq!(Jump::absolute(0x100).len(), ABS_JUMP_LEN);
/// ```
pub const ABS_JUMP_LEN: usize = 14;
/// The longest redirect this module produces.
///
/// ```
/// use lp_core::jump::{Jump, MAX_JUMP_LEN};
/// assert!(Jump::to(0, u64::MAX / 2).len() <= MAX_JUMP_LEN);
/// ```
pub const MAX_JUMP_LEN: usize = ABS_JUMP_LEN;

const REL32_OPCODE: u8 = 0xe9;
const ABS_PREFIX: [u8; 6] = [0xff, 0x25, 0x00, 0x00, 0x00, 0x00];

/// An encoded redirect: a `jmp` from one address to another, as bytes ready to be written.
///
/// A fixed-size value (no allocation), so it can be built anywhere, including a kernel.
///
/// ```
/// use lp_core::jump::{Jump, REL32_JUMP_LEN, ABS_JUMP_LEN};
/// let near = Jump::to(0x40_1000, 0x40_2000);
/// assert_eq!(near.as_bytes(), &[0xe9, 0xfb, 0x0f, 0x00, 0x00]);
/// assert_eq!(near.len(), REL32_JUMP_LEN);
/// let far = Jump::to(0x40_1000, 0x7f00_0000_0000);
/// assert_eq!(far.len(), ABS_JUMP_LEN);
/// assert_eq!(far.target(0x40_1000), 0x7f00_0000_0000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Jump {
    bytes: [u8; MAX_JUMP_LEN],
    len: u8,
}

impl Jump {
    /// The shortest jump placed at `from` that lands on `target`: `jmp rel32` when the target is
    /// in reach, the 14-byte absolute form otherwise.
    ///
    /// ```
    /// use lp_core::jump::Jump;
    /// assert_eq!(Jump::to(0x1000, 0x1005).len(), 5);
    /// assert_eq!(Jump::to(0x1000, 0x1_0000_1000).len(), 14);
    /// ```
    pub fn to(from: u64, target: u64) -> Jump {
        Jump::rel32(from, target).unwrap_or_else(|| Jump::absolute(target))
    }

    /// `jmp rel32` placed at `from` landing on `target`, or `None` when `target` is not within
    /// ±2 GiB of `from + 5` (the displacement is relative to the end of the instruction).
    ///
    /// ```
    /// use lp_core::jump::Jump;
    /// let j = Jump::rel32(0x1000, 0x1000).unwrap(); // a jump to itself
    /// assert_eq!(j.as_bytes(), &[0xe9, 0xfb, 0xff, 0xff, 0xff]);
    /// assert!(Jump::rel32(0, 0x8000_0005).is_none());
    /// ```
    pub fn rel32(from: u64, target: u64) -> Option<Jump> {
        let next = from.wrapping_add(REL32_JUMP_LEN as u64);
        let delta = target.wrapping_sub(next) as i64;
        let rel = i32::try_from(delta).ok()?;
        let mut bytes = [0u8; MAX_JUMP_LEN];
        bytes[0] = REL32_OPCODE;
        bytes[1..5].copy_from_slice(&rel.to_le_bytes());
        Some(Jump {
            bytes,
            len: REL32_JUMP_LEN as u8,
        })
    }

    /// The 14-byte absolute form `jmp [rip+0]; .quad target`; works from anywhere.
    ///
    /// ```
    /// use lp_core::jump::Jump;
    /// let j = Jump::absolute(0x1122_3344_5566_7788);
    /// assert_eq!(j.as_bytes()[..6], [0xff, 0x25, 0, 0, 0, 0]);
    /// assert_eq!(j.as_bytes()[6..], 0x1122_3344_5566_7788u64.to_le_bytes());
    /// ```
    pub fn absolute(target: u64) -> Jump {
        let mut bytes = [0u8; MAX_JUMP_LEN];
        bytes[..6].copy_from_slice(&ABS_PREFIX);
        bytes[6..14].copy_from_slice(&target.to_le_bytes());
        Jump {
            bytes,
            len: ABS_JUMP_LEN as u8,
        }
    }

    /// Recognises one of our jumps at the start of `bytes` (which sit at address `from`):
    /// returns the jump and its target, or `None` if the bytes are neither form.
    ///
    /// ```
    /// use lp_core::jump::Jump;
    /// let j = Jump::to(0x1000, 0x2000);
    /// assert_eq!(Jump::decode(0x1000, j.as_bytes()), Some((j, 0x2000)));
    /// assert_eq!(Jump::decode(0x1000, &[0x55, 0x48, 0x89, 0xe5, 0x90]), None);
    /// ```
    pub fn decode(from: u64, bytes: &[u8]) -> Option<(Jump, u64)> {
        if bytes.len() >= ABS_JUMP_LEN && bytes[..6] == ABS_PREFIX {
            let mut abs = [0u8; 8];
            abs.copy_from_slice(&bytes[6..14]);
            let target = u64::from_le_bytes(abs);
            return Some((Jump::absolute(target), target));
        }
        if bytes.len() >= REL32_JUMP_LEN && bytes[0] == REL32_OPCODE {
            let mut rel = [0u8; 4];
            rel.copy_from_slice(&bytes[1..5]);
            let rel = i32::from_le_bytes(rel) as i64 as u64;
            let target = from.wrapping_add(REL32_JUMP_LEN as u64).wrapping_add(rel);
            let jump = Jump::rel32(from, target)?;
            return Some((jump, target));
        }
        None
    }

    /// The encoded bytes (5 or 14 of them).
    ///
    /// ```
    /// use lp_core::jump::Jump;
    /// assert_eq!(Jump::to(0, 5).as_bytes(), &[0xe9, 0, 0, 0, 0]);
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Number of bytes the jump occupies.
    ///
    /// ```
    /// use lp_core::jump::Jump;
    /// assert_eq!(Jump::absolute(0).len(), 14);
    /// ```
    #[allow(clippy::len_without_is_empty)] // a jump is never empty
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether this is the 14-byte absolute form.
    ///
    /// ```
    /// use lp_core::jump::Jump;
    /// assert!(Jump::absolute(0).is_absolute());
    /// assert!(!Jump::to(0, 0x10).is_absolute());
    /// ```
    pub fn is_absolute(&self) -> bool {
        self.len as usize == ABS_JUMP_LEN
    }

    /// Where this jump lands when it is placed at `from` (the absolute form ignores `from`).
    ///
    /// ```
    /// use lp_core::jump::Jump;
    /// assert_eq!(Jump::to(0x1000, 0x900).target(0x1000), 0x900);
    /// ```
    pub fn target(&self, from: u64) -> u64 {
        Jump::decode(from, self.as_bytes())
            .map(|(_, t)| t)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel32_reach_limits() {
        // displacement relative to from + 5
        let from = 0x1_0000_0000u64;
        let max = from + 5 + i32::MAX as u64;
        let min = from + 5 - (1u64 << 31);
        assert_eq!(Jump::rel32(from, max).unwrap().target(from), max);
        assert_eq!(Jump::rel32(from, min).unwrap().target(from), min);
        assert!(Jump::rel32(from, max + 1).is_none());
        assert!(Jump::rel32(from, min - 1).is_none());
        assert_eq!(Jump::to(from, max + 1).len(), ABS_JUMP_LEN);
    }

    #[test]
    fn wraps_around_address_space_like_the_cpu() {
        // near the top of the address space, a small forward jump wraps
        let from = u64::MAX - 2;
        let j = Jump::rel32(from, 0x10).unwrap();
        assert_eq!(j.target(from), 0x10);
    }

    #[test]
    fn decodes_what_it_encodes() {
        for (from, to) in [(0u64, 0u64), (0x1000, 0xffff_ffff_0000), (u64::MAX - 20, 3)] {
            let j = Jump::to(from, to);
            assert_eq!(Jump::decode(from, j.as_bytes()), Some((j, to)));
        }
    }

    #[test]
    fn decode_refuses_short_input() {
        assert_eq!(Jump::decode(0, &[0xe9, 0, 0]), None);
        assert_eq!(Jump::decode(0, &ABS_PREFIX), None);
    }
}

//! Nonstop mode's dispatch: where a patched function's entry and its direct callers' branches
//! lead, so that the whole patch goes live with a single one-byte store (the commit), after
//! every site was switched at its own pace.
//!
//! Why. With the `int3` protocol every call that reaches a site between its `int3` and its
//! last byte costs a trap (~3 µs here). An entry must also wait, with its `int3` in place,
//! until every thread is seen outside the instructions the jump overwrites (the settle,
//! milliseconds). When the entries and the hot direct callers were switched in one window,
//! every call of every patched function trapped for those milliseconds: 8 threads calling
//! 10 patched functions needed more CPU than the machine had, and a call preempted meanwhile
//! waited behind the others' trapping calls (session 5: the longest single call of the
//! process_patch bench was 200–450 µs during a nonstop apply, against 2–20 µs during a revert,
//! whose window has no settle).
//!
//! So a nonstop apply points every site at a dispatch of the function, in windows: first the
//! callers' branches (one instruction each: no settle), two per window of three syncs; then
//! the entries in one window, whose settle runs while the hot direct calls already go through
//! the dispatches and trap nowhere. Until the commit the dispatch runs the old code (the
//! entry's trampoline), so any window can be rolled back with no new code having run; the
//! commit sets the patch's flag, and every dispatch of the patch runs the new code from the
//! next call on. (A patch stacked on another runs the version below until its commit, never
//! the original: that would come back for as long as the windows last.) The callers' branches are then pointed on from the dispatches to the new code
//! (a call through a dispatch costs a flag test and a branch), before the state's commit. A
//! nonstop revert restores the callers first (the dispatches still run the new code), then
//! clears the flag (the patch is out), then restores the entries (see nonstop.rs's
//! `switch_sites`).
//!
//! The dispatch, 18 bytes (flags are dead at a function's entry: no caller keeps a value in
//! them across a call):
//! ```text
//! testb $1, flag(%rip)
//! jnz   new          ; the new version (or its register-saving thunk)
//! jmp   old          ; what ran before: the trampoline (the original's displaced
//!                    ; instructions, then back), or the version below when the patch
//!                    ; stacks on another
//! ```

/// Length of a dispatch.
pub(crate) const DISPATCH_LEN: usize = 18;

/// The dispatch at `at`: runs `new` when the byte at `flag` has bit 0 set, `old` otherwise.
/// None when one of them is out of a rel32's reach.
pub(crate) fn encode(at: u64, flag: u64, new: u64, old: u64) -> Option<[u8; DISPATCH_LEN]> {
    let rel = |from_end: u64, to: u64| -> Option<[u8; 4]> {
        let d = to.wrapping_sub(from_end) as i64;
        i32::try_from(d).ok().map(i32::to_le_bytes)
    };
    let mut b = [0u8; DISPATCH_LEN];
    // testb $imm8, disp32(%rip): F6 /0 with ModRM 0x05; the displacement counts from the end
    // of the instruction, after the immediate.
    b[0] = 0xf6;
    b[1] = 0x05;
    b[2..6].copy_from_slice(&rel(at + 7, flag)?);
    b[6] = 0x01;
    // jnz rel32
    b[7] = 0x0f;
    b[8] = 0x85;
    b[9..13].copy_from_slice(&rel(at + 13, new)?);
    // jmp rel32
    b[13] = 0xe9;
    b[14..18].copy_from_slice(&rel(at + 18, old)?);
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};

    #[test]
    fn the_dispatch_tests_the_flag_then_branches_to_new_or_old() {
        let at = 0x7f00_0000_1040;
        let (flag, new, old) = (0x7f00_0000_1000, 0x7f00_0010_0000, 0x7f00_0000_0800);
        let code = encode(at, flag, new, old).unwrap();
        let mut d = Decoder::with_ip(64, &code, at, DecoderOptions::NONE);
        let test = d.decode();
        assert_eq!(test.mnemonic(), Mnemonic::Test);
        assert_eq!(test.memory_base(), Register::RIP);
        assert_eq!(test.memory_displacement64(), flag);
        assert_eq!(test.op1_kind(), OpKind::Immediate8);
        assert_eq!(test.immediate8(), 1);
        let jnz = d.decode();
        assert_eq!(jnz.mnemonic(), Mnemonic::Jne);
        assert_eq!(jnz.near_branch_target(), new);
        let jmp = d.decode();
        assert_eq!(jmp.mnemonic(), Mnemonic::Jmp);
        assert_eq!(jmp.near_branch_target(), old);
        assert_eq!(d.position(), DISPATCH_LEN);
    }

    #[test]
    fn a_target_out_of_reach_gives_none() {
        let at = 0x7f00_0000_0000;
        assert!(encode(at, at + 0x40, at + (3 << 30), at - 0x100).is_none());
        assert!(encode(at, at - (3 << 30), at + 0x100, at - 0x100).is_none());
        assert!(encode(at, at + 0x40, at + 0x100, at - (3 << 30)).is_none());
    }
}

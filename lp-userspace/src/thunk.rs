//! Register-preserving thunks for replacements of functions whose callers rely on `-fipa-ra`.
//!
//! gcc at -O2 lets the caller of a function it can see (not interposable) keep values in
//! caller-saved registers that this callee never writes. A replacement compiled separately may
//! write them. lp-core's clobber analysis says which registers the old function may change and
//! which the new one may; the difference (caller-saved registers only) is saved and restored by
//! a thunk that the redirect targets instead of the new function:
//!
//! ```text
//! push <gpr>...            ; each extra general-purpose register
//! sub  rsp, N              ; room for the extra xmm registers, keeping the call aligned
//! movdqu [rsp+16*i], xmmK  ; each extra xmm register
//! call new
//! movdqu xmmK, [rsp+16*i]
//! add  rsp, N
//! pop  <gpr>...            ; reverse order
//! ret
//! ```
//! The return address stays where the caller put it, so unwinding through the thunk's caller is
//! unaffected; the thunk is in the patch memory, covered by the consistency check.

use lp_core::clobber::{Regs, GPRS, XMMS};

/// Registers a thunk can save: general-purpose and xmm0–15 (flags never survive a call).
pub fn savable() -> Regs {
    GPRS | XMMS
}

/// The registers a thunk must preserve: written by the new function, not by the old one, and
/// caller-saved (callee-saved ones the new function preserves itself, by the ABI).
pub fn extra_clobbers(old: Regs, new: Regs) -> Regs {
    ((new - old) & lp_core::clobber::SYSV_CALLER_SAVED) - Regs::FLAGS
}

/// Builds the thunk placed at `at` that calls `target` preserving `save`. Refuses (with the
/// reason) registers it cannot save (x87, AVX-512 state).
pub fn build(at: u64, target: u64, save: Regs) -> Result<Vec<u8>, String> {
    let unsupported = save - savable();
    if !unsupported.is_empty() {
        return Err(format!(
            "the new version may change registers {unsupported:?} that callers of the old one rely on (not preservable by a thunk)"
        ));
    }
    let gprs: Vec<u8> = (0..16u8)
        .filter(|&n| n != 4 && save.contains(Regs::gpr(n as usize)))
        .collect();
    let xmms: Vec<u8> = (0..16u8)
        .filter(|&n| save.contains(Regs::xmm(n as usize)))
        .collect();
    let mut out = Vec::new();
    for &r in &gprs {
        if r >= 8 {
            out.push(0x41);
        }
        out.push(0x50 + (r & 7));
    }
    // At entry rsp ≡ 8 (mod 16); before our call it must be ≡ 0.
    let pushed = 8 * gprs.len() as u32;
    let mut frame = 16 * xmms.len() as u32;
    if !(8 + pushed + frame).is_multiple_of(16) {
        frame += 8;
    }
    if frame > 0 {
        out.extend_from_slice(&[0x48, 0x81, 0xec]);
        out.extend_from_slice(&frame.to_le_bytes());
    }
    for (i, &x) in xmms.iter().enumerate() {
        movdqu(&mut out, 0x7f, x, 16 * i as u32);
    }
    let after_call = at + out.len() as u64 + 5;
    let rel = target.wrapping_sub(after_call) as i64;
    let rel =
        i32::try_from(rel).map_err(|_| "thunk out of reach of the new function".to_string())?;
    out.push(0xe8);
    out.extend_from_slice(&rel.to_le_bytes());
    for (i, &x) in xmms.iter().enumerate() {
        movdqu(&mut out, 0x6f, x, 16 * i as u32);
    }
    if frame > 0 {
        out.extend_from_slice(&[0x48, 0x81, 0xc4]);
        out.extend_from_slice(&frame.to_le_bytes());
    }
    for &r in gprs.iter().rev() {
        if r >= 8 {
            out.push(0x41);
        }
        out.push(0x58 + (r & 7));
    }
    out.push(0xc3);
    Ok(out)
}

/// `movdqu [rsp+disp32], xmmN` (op 0x7f) or `movdqu xmmN, [rsp+disp32]` (op 0x6f).
fn movdqu(out: &mut Vec<u8>, op: u8, xmm: u8, disp: u32) {
    out.push(0xf3);
    if xmm >= 8 {
        out.push(0x44);
    }
    out.extend_from_slice(&[0x0f, op, 0x84 | ((xmm & 7) << 3), 0x24]);
    out.extend_from_slice(&disp.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_restores_in_reverse_and_keeps_alignment() {
        let t = build(0x1000, 0x2000, Regs::RCX | Regs::R9 | Regs::XMM1).unwrap();
        // push rcx; push r9; sub rsp,24 (8+16+16=40 → +8 = 48 ≡ 0)
        assert_eq!(&t[..3], &[0x51, 0x41, 0x51]);
        assert_eq!(&t[3..10], &[0x48, 0x81, 0xec, 24, 0, 0, 0]);
        // movdqu [rsp+0], xmm1
        assert_eq!(&t[10..19], &[0xf3, 0x0f, 0x7f, 0x8c, 0x24, 0, 0, 0, 0]);
        // call 0x2000
        assert_eq!(t[19], 0xe8);
        let rel = i32::from_le_bytes(t[20..24].try_into().unwrap());
        assert_eq!(0x1000 + 24 + rel as i64, 0x2000);
        assert_eq!(&t[t.len() - 4..], &[0x41, 0x59, 0x59, 0xc3]);
    }

    #[test]
    fn no_frame_when_aligned_and_refuses_x87() {
        let t = build(0x1000, 0x1100, Regs::RDX).unwrap();
        assert_eq!(&t[..1], &[0x52]);
        assert_eq!(t[1], 0xe8);
        assert!(build(0, 0, Regs::X87).is_err());
    }

    #[test]
    fn extra_is_new_minus_old_caller_saved_only() {
        let old = Regs::RAX | Regs::FLAGS;
        let new = Regs::RAX | Regs::RCX | Regs::RBX | Regs::FLAGS;
        assert_eq!(extra_clobbers(old, new), Regs::RCX);
    }
}

//! Passing lp-core's answers to C: errno values and one-line messages in caller buffers.

use core::fmt::{self, Write};

/// Linux errno values used in the answers (the C side returns them as `-errno`).
pub mod errno {
    /// No such entry.
    pub const ENOENT: i32 = 2;
    /// Busy: another patch on top, or a transition in progress.
    pub const EBUSY: i32 = 16;
    /// Already there.
    pub const EEXIST: i32 = 17;
    /// Bad argument.
    pub const EINVAL: i32 = 22;
    /// Out of table space.
    pub const ENOSPC: i32 = 28;
}

/// Writes into a C buffer, truncating, always NUL-terminated.
struct CBuf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for CBuf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len().saturating_sub(self.len + 1);
        let n = room.min(s.len());
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Put `what`'s `Display` text into the C buffer `msg[..len]` (NUL-terminated).
///
/// # Safety
/// `msg` is null or points to `len` writable bytes.
pub unsafe fn report(what: &dyn fmt::Display, msg: *mut u8, len: usize) {
    if msg.is_null() || len == 0 {
        return;
    }
    // SAFETY: the caller guarantees `len` writable bytes at `msg`.
    let buf = unsafe { core::slice::from_raw_parts_mut(msg, len) };
    let mut out = CBuf { buf, len: 0 };
    let _ = write!(out, "{what}");
    let end = out.len;
    out.buf[end] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_truncates_and_terminates() {
        let mut buf = [0xffu8; 8];
        // SAFETY: `buf` is 8 writable bytes.
        unsafe { report(&"a long message", buf.as_mut_ptr(), buf.len()) };
        assert_eq!(&buf, b"a long \0");
        // SAFETY: a null buffer is ignored.
        unsafe { report(&"x", core::ptr::null_mut(), 4) };
    }
}

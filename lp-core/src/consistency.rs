//! Whether any thread is inside the code being switched (the stop-mode safety check).
//!
//! # The rules
//! A thread is **busy** when switching now could leave it running old code later:
//! - its **instruction pointer** is inside a range `[start, end)`: it is executing the old code;
//! - one of its **return addresses** is inside a range `[start, end)`: a frame will return into
//!   the old code.
//!
//! Edges, decided deliberately:
//! - **ip == start** (the thread stopped before executing the function's first byte): busy by
//!   default ([`EntryRule::Busy`], used by [`check`]). It is safe only when the redirect becomes
//!   visible to that thread atomically, which holds when every thread stays stopped until the
//!   whole redirect is written and resumes through a serialising kernel exit (ptrace stop mode,
//!   `stop_machine`). [`check_with`] and [`EntryRule::SafeWhenStopped`] let such an adapter say
//!   so. Busy is the default because a false "busy" costs one retry (the thread moves on within
//!   microseconds), while a false "safe" with a thread that might execute a torn redirect costs a
//!   crash. Note this rule covers `start` only: an ip past the first byte (even just after an
//!   `endbr64`) is inside and busy.
//! - **return address == start**: busy. A return address is the byte after a `call`; equal to
//!   `start`, the call was the last instruction before the range (a `noreturn` call at the end
//!   of the preceding function). Compiled code never falls through into the next function, but
//!   hand-written code may; conservative.
//! - **return address == end**: safe. The call was the range's last instruction, so the callee
//!   is `noreturn`: the thread can never come back to execute it, and `end` is not in the range.
//!   (Counting it busy would block patching a function whose last act is a never-returning call,
//!   forever.)
//! - An empty or inverted range (`end <= start`) contains nothing.
//!
//! The first busy frame found is reported: threads in the order given, then per thread its ip,
//! then its return addresses in the order given (innermost first, as unwinders produce them).
//! Cost: O(threads × frames × ranges), no allocation.

use core::fmt;

/// One thread's stack as the adapter unwound it.
///
/// ```
/// use lp_core::consistency::ThreadStack;
/// let t = ThreadStack { tid: 42, ip: 0x401100, return_addresses: &[0x401234, 0x401500] };
/// assert_eq!(t.return_addresses.len(), 2);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadStack<'a> {
    /// Thread id (kernel task pid / process tid).
    pub tid: u32,
    /// The instruction pointer the thread will resume at.
    pub ip: u64,
    /// Return addresses of its frames, innermost first.
    pub return_addresses: &'a [u64],
}

/// Code being switched: `[start, end)` (typically one old function).
///
/// ```
/// use lp_core::consistency::CodeRange;
/// let r = CodeRange::new(0x401000, 0x401040);
/// assert!(r.contains(0x401000) && r.contains(0x40103f) && !r.contains(0x401040));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodeRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl CodeRange {
    /// `[start, end)`.
    ///
    /// ```
    /// assert_eq!(lp_core::consistency::CodeRange::new(1, 3).end, 3);
    /// ```
    pub const fn new(start: u64, end: u64) -> CodeRange {
        CodeRange { start, end }
    }

    /// Whether `addr` lies in `[start, end)`.
    ///
    /// ```
    /// assert!(!lp_core::consistency::CodeRange::new(5, 5).contains(5));
    /// ```
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// How to treat a thread whose ip is exactly a range's first byte. See the module documentation.
///
/// ```
/// use lp_core::consistency::{check_with, CodeRange, EntryRule, ThreadStack, Verdict};
/// let t = [ThreadStack { tid: 1, ip: 0x1000, return_addresses: &[] }];
/// let r = [CodeRange::new(0x1000, 0x1100)];
/// assert!(matches!(check_with(&t, &r, EntryRule::Busy), Verdict::Busy(_)));
/// assert_eq!(check_with(&t, &r, EntryRule::SafeWhenStopped), Verdict::Safe);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EntryRule {
    /// ip == start is busy (the conservative default).
    #[default]
    Busy,
    /// ip == start is safe: every thread stays stopped until the redirect is completely written
    /// and resumes through a serialising kernel exit, so it fetches either none or all of it.
    SafeWhenStopped,
}

/// Where the busy address was found.
///
/// ```
/// use lp_core::consistency::Frame;
/// assert_eq!(Frame::Return(0).to_string(), "will return into");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The thread's instruction pointer.
    Ip,
    /// The return address at this index of `return_addresses` (0 = innermost).
    Return(usize),
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Frame::Ip => "is executing",
            Frame::Return(_) => "will return into",
        })
    }
}

/// A thread that is in the way, as a one-line error.
///
/// ```
/// use lp_core::consistency::{Busy, Frame};
/// let b = Busy { tid: 7, range: 1, addr: 0x401010, frame: Frame::Ip };
/// assert_eq!(b.to_string(), "thread 7 is executing range 1 at 0x401010");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("thread {tid} {frame} range {range} at {addr:#x}")]
pub struct Busy {
    /// The thread.
    pub tid: u32,
    /// Index of the range in the slice given to [`check`].
    pub range: usize,
    /// The ip or return address inside the range.
    pub addr: u64,
    /// Which of the thread's addresses it was.
    pub frame: Frame,
}

/// The answer: switch now, or who is in the way.
///
/// ```
/// use lp_core::consistency::Verdict;
/// assert!(Verdict::Safe.is_safe());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No thread executes or will return into any range.
    Safe,
    /// The first thread found in the way.
    Busy(Busy),
}

impl Verdict {
    /// Whether the switch may happen now.
    ///
    /// ```
    /// use lp_core::consistency::{Busy, Frame, Verdict};
    /// assert!(!Verdict::Busy(Busy { tid: 1, range: 0, addr: 0, frame: Frame::Ip }).is_safe());
    /// ```
    pub const fn is_safe(&self) -> bool {
        matches!(self, Verdict::Safe)
    }

    /// `Ok(())` when safe, the [`Busy`] error otherwise (for `?` in adapters).
    ///
    /// ```
    /// use lp_core::consistency::Verdict;
    /// assert_eq!(Verdict::Safe.into_result(), Ok(()));
    /// ```
    pub const fn into_result(self) -> Result<(), Busy> {
        match self {
            Verdict::Safe => Ok(()),
            Verdict::Busy(b) => Err(b),
        }
    }
}

/// [`check_with`] under the conservative [`EntryRule::Busy`].
///
/// ```
/// use lp_core::consistency::{check, Busy, CodeRange, Frame, ThreadStack, Verdict};
/// let ranges = [CodeRange::new(0x1000, 0x1100), CodeRange::new(0x2000, 0x2080)];
/// let idle = ThreadStack { tid: 1, ip: 0x5000, return_addresses: &[0x5100] };
/// let inside = ThreadStack { tid: 2, ip: 0x5000, return_addresses: &[0x5200, 0x2010] };
/// assert_eq!(check(&[idle], &ranges), Verdict::Safe);
/// assert_eq!(
///     check(&[idle, inside], &ranges),
///     Verdict::Busy(Busy { tid: 2, range: 1, addr: 0x2010, frame: Frame::Return(1) }),
/// );
/// ```
pub fn check(threads: &[ThreadStack<'_>], ranges: &[CodeRange]) -> Verdict {
    check_with(threads, ranges, EntryRule::Busy)
}

/// Whether any of `threads` executes or will return into any of `ranges`; `entry` says how to
/// treat an ip exactly at a range's start. Rules in the module documentation.
///
/// ```
/// use lp_core::consistency::{check_with, CodeRange, EntryRule, ThreadStack, Verdict};
/// let r = [CodeRange::new(0x1000, 0x1100)];
/// // a return address equal to `end` belongs to a never-returning call: safe
/// let t = [ThreadStack { tid: 3, ip: 0x7000, return_addresses: &[0x1100] }];
/// assert_eq!(check_with(&t, &r, EntryRule::Busy), Verdict::Safe);
/// ```
pub fn check_with(threads: &[ThreadStack<'_>], ranges: &[CodeRange], entry: EntryRule) -> Verdict {
    for t in threads {
        for (range, r) in ranges.iter().enumerate() {
            let at_entry_ok = entry == EntryRule::SafeWhenStopped && t.ip == r.start;
            if r.contains(t.ip) && !at_entry_ok {
                return busy(t, range, t.ip, Frame::Ip);
            }
        }
        for (i, &ret) in t.return_addresses.iter().enumerate() {
            if let Some(range) = ranges.iter().position(|r| r.contains(ret)) {
                return busy(t, range, ret, Frame::Return(i));
            }
        }
    }
    Verdict::Safe
}

fn busy(t: &ThreadStack<'_>, range: usize, addr: u64, frame: Frame) -> Verdict {
    Verdict::Busy(Busy {
        tid: t.tid,
        range,
        addr,
        frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: CodeRange = CodeRange::new(0x1000, 0x1040);

    fn thread(ip: u64, rets: &[u64]) -> ThreadStack<'_> {
        ThreadStack {
            tid: 9,
            ip,
            return_addresses: rets,
        }
    }

    #[test]
    fn ip_edges() {
        for (ip, busy_expected) in [
            (0xfff, false),
            (0x1001, true),
            (0x103f, true),
            (0x1040, false),
        ] {
            assert_eq!(
                !check(&[thread(ip, &[])], &[F]).is_safe(),
                busy_expected,
                "ip {ip:#x}"
            );
        }
    }

    #[test]
    fn entry_rule_only_relaxes_the_first_byte() {
        let at = |ip| check_with(&[thread(ip, &[])], &[F], EntryRule::SafeWhenStopped);
        assert!(at(0x1000).is_safe());
        assert!(!at(0x1004).is_safe());
        assert!(!check(&[thread(0x1000, &[])], &[F]).is_safe());
    }

    #[test]
    fn return_address_edges() {
        assert!(!check(&[thread(0, &[0x1000])], &[F]).is_safe());
        assert!(!check(&[thread(0, &[0x103f])], &[F]).is_safe());
        assert!(check(&[thread(0, &[0x1040])], &[F]).is_safe());
        // the entry rule is about the ip only
        let v = check_with(&[thread(0, &[0x1000])], &[F], EntryRule::SafeWhenStopped);
        assert!(!v.is_safe());
    }

    #[test]
    fn ip_is_reported_before_return_addresses_and_first_thread_first() {
        let rets = [0x2010];
        let ranges = [F, CodeRange::new(0x2000, 0x2100)];
        let threads = [
            thread(0x5000, &[]),
            ThreadStack {
                tid: 4,
                ip: 0x1010,
                return_addresses: &rets,
            },
            ThreadStack {
                tid: 5,
                ip: 0x1020,
                return_addresses: &[],
            },
        ];
        let expected = Busy {
            tid: 4,
            range: 0,
            addr: 0x1010,
            frame: Frame::Ip,
        };
        assert_eq!(check(&threads, &ranges), Verdict::Busy(expected));
    }

    #[test]
    fn empty_and_inverted_ranges_contain_nothing() {
        let ranges = [
            CodeRange::new(0x1000, 0x1000),
            CodeRange::new(0x2000, 0x1000),
        ];
        assert!(check(&[thread(0x1000, &[0x1800])], &ranges).is_safe());
        assert!(check(&[], &[F]).is_safe());
        assert!(check(&[thread(0x1000, &[])], &[]).is_safe());
    }
}

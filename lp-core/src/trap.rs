//! What a trap handler does with an `int3` it caught: send the CPU to the replacement, let it
//! run the original code, or pass the trap on because it is not ours.
//!
//! # Which address
//! An `int3` (`cc`, one byte) is a trap: when the handler runs, the saved instruction pointer is
//! **one past** the `int3` byte. The table is keyed by the address **of the `int3` byte itself**,
//! the site address where the redirect is written (`Site::patch_addr`). Handlers convert with
//! [`trap_address`] (`ip - 1`) and pass that to [`decide`]. (A `SIGTRAP` seen through ptrace
//! reports the same "one past" ip.)
//!
//! # Phases of one switch, and what a trapping thread does in each
//! The write plan turns the first byte of the site into `int3`, syncs, writes the rest of the
//! new bytes, syncs, writes the first byte, syncs. A thread reaching the site while the `int3`
//! is in place traps; what it must run depends on the phase, recorded as the entry's state:
//!
//! | phase | entry state (top version) | code at the site | trapping thread goes to |
//! |---|---|---|---|
//! | apply, before commit | [`Pending`](EntryState::Pending) | old bytes / int3 + tail being written | the code below the top: previous version or the original (`resume`) |
//! | apply, committed | [`Active`](EntryState::Active) | int3 + new tail, first byte next | the top version (`new`) |
//! | revert | [`Reverting`](EntryState::Reverting) | int3 + old tail being written back | the code below the top: previous version or the original (`resume`) |
//!
//! "The code below the top" is what calls ran before this transition began: for a first patch,
//! the original function, reached through its trampoline (`resume`: the displaced instructions,
//! then a jump back past the site); for a stacked patch, the version below, which is active.
//! Going there keeps every call on one consistent version: the old one until the commit, the new
//! one after it, the old one again as soon as a revert starts. No call ever runs a mix.
//!
//! An `int3` at an address with no entry is somebody else's (a debugger, a kprobe): the handler
//! must pass it on untouched ([`TrapDecision::NotOurs`]).
//!
//! The adapter pops an entry only after the revert plan's final sync (see
//! [`RedirectTable::pop`]): until then an entry exists for every `int3` we wrote, so our own
//! traps are never mistaken for someone else's.

use crate::table::{EntryState, Redirect, RedirectTable, Snapshot};

/// Length of the `int3` instruction (`cc`).
///
/// ```
/// assert_eq!(lp_core::trap::trap_address(0x1000 + lp_core::trap::INT3_LEN), 0x1000);
/// ```
pub const INT3_LEN: u64 = 1;

/// The address of the `int3` byte, from the instruction pointer saved when it trapped (`ip` is
/// one past the byte).
///
/// ```
/// assert_eq!(lp_core::trap::trap_address(0x401001), 0x401000);
/// ```
pub const fn trap_address(saved_ip: u64) -> u64 {
    saved_ip.wrapping_sub(INT3_LEN)
}

/// What the trap handler does.
///
/// ```
/// use lp_core::trap::TrapDecision;
/// assert_eq!(TrapDecision::Redirect(0x2000).target(), Some(0x2000));
/// assert_eq!(TrapDecision::NotOurs.target(), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapDecision {
    /// Set the instruction pointer to this replacement function and continue: the thread was at
    /// the site with nothing of the old function executed, as if it had called the replacement.
    Redirect(u64),
    /// Set the instruction pointer to this address, which runs the original code from the site
    /// on (the original function's trampoline).
    Resume(u64),
    /// Not one of our sites: hand the trap to the next handler (debugger, kprobe).
    NotOurs,
}

impl TrapDecision {
    /// Where to set the instruction pointer, or `None` to pass the trap on.
    ///
    /// ```
    /// use lp_core::trap::TrapDecision;
    /// assert_eq!(TrapDecision::Resume(0x9000).target(), Some(0x9000));
    /// ```
    pub const fn target(self) -> Option<u64> {
        match self {
            TrapDecision::Redirect(a) | TrapDecision::Resume(a) => Some(a),
            TrapDecision::NotOurs => None,
        }
    }
}

/// Decide for a trap at `trap_addr` (the address of the `int3` byte: [`trap_address`] of the
/// saved ip) from the table's current snapshot. Never blocks, never allocates.
///
/// ```
/// use lp_core::table::{EntryState, RedirectTable, Slot};
/// use lp_core::trap::{decide, TrapDecision};
///
/// let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
/// let table = RedirectTable::new(&mut a, &mut b);
/// // site 0x1000, original resumes at trampoline 0x9000, patch 1 → 0x2000
/// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
/// assert_eq!(decide(&table, 0x1000), TrapDecision::Resume(0x9000)); // not committed
/// table.set_state(0x1000, 1, EntryState::Active).unwrap();
/// assert_eq!(decide(&table, 0x1000), TrapDecision::Redirect(0x2000)); // committed
/// table.set_state(0x1000, 1, EntryState::Reverting).unwrap();
/// assert_eq!(decide(&table, 0x1000), TrapDecision::Resume(0x9000)); // being reverted
/// assert_eq!(decide(&table, 0x1234), TrapDecision::NotOurs); // a debugger's int3
/// ```
pub fn decide(table: &RedirectTable<'_>, trap_addr: u64) -> TrapDecision {
    decide_for(table.lookup(trap_addr).as_ref())
}

/// [`decide`] against a snapshot the caller already holds (inside [`RedirectTable::read`]).
///
/// ```
/// use lp_core::table::{RedirectTable, Slot};
/// use lp_core::trap::{decide_in, TrapDecision};
/// # let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
/// # let table = RedirectTable::new(&mut a, &mut b);
/// table.push(0x1000, 0x9000, 0x2000, 1).unwrap();
/// let d = table.read(|snap| decide_in(&snap, 0x1000));
/// assert_eq!(d, TrapDecision::Resume(0x9000));
/// ```
pub fn decide_in(snapshot: &Snapshot<'_>, trap_addr: u64) -> TrapDecision {
    decide_for(snapshot.lookup(trap_addr).as_ref())
}

/// The decision for one entry (`None`: no entry at the trap address). Pure; the phase table in
/// the module documentation is this function.
///
/// ```
/// use lp_core::table::{EntryState, Redirect, Version};
/// use lp_core::trap::{decide_for, TrapDecision};
/// let reverting_second = Redirect {
///     old: 0x1000, new: 0x3000, patch_id: 2, state: EntryState::Reverting, depth: 2,
///     resume: 0x9000, below: Some(Version::new(0x2000, 1)),
/// };
/// // while patch 2 is being reverted, calls go to patch 1's version
/// assert_eq!(decide_for(Some(&reverting_second)), TrapDecision::Redirect(0x2000));
/// assert_eq!(decide_for(None), TrapDecision::NotOurs);
/// ```
pub fn decide_for(entry: Option<&Redirect>) -> TrapDecision {
    let Some(entry) = entry else {
        return TrapDecision::NotOurs;
    };
    match entry.state {
        EntryState::Active => TrapDecision::Redirect(entry.new),
        EntryState::Pending | EntryState::Reverting => match entry.below {
            Some(below) => TrapDecision::Redirect(below.new),
            None => TrapDecision::Resume(entry.resume),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Slot, Version};

    fn entry(state: EntryState, below: Option<Version>) -> Redirect {
        Redirect {
            old: 0x1000,
            new: 0x3000,
            patch_id: 2,
            state,
            depth: if below.is_some() { 2 } else { 1 },
            resume: 0x9000,
            below,
        }
    }

    #[test]
    fn phase_table_single_version() {
        use EntryState::*;
        assert_eq!(
            decide_for(Some(&entry(Pending, None))),
            TrapDecision::Resume(0x9000)
        );
        assert_eq!(
            decide_for(Some(&entry(Active, None))),
            TrapDecision::Redirect(0x3000)
        );
        assert_eq!(
            decide_for(Some(&entry(Reverting, None))),
            TrapDecision::Resume(0x9000)
        );
    }

    #[test]
    fn phase_table_stacked() {
        use EntryState::*;
        let below = Some(Version::new(0x2000, 1));
        assert_eq!(
            decide_for(Some(&entry(Pending, below))),
            TrapDecision::Redirect(0x2000)
        );
        assert_eq!(
            decide_for(Some(&entry(Active, below))),
            TrapDecision::Redirect(0x3000)
        );
        assert_eq!(
            decide_for(Some(&entry(Reverting, below))),
            TrapDecision::Redirect(0x2000)
        );
    }

    #[test]
    fn through_the_table_with_a_full_stack_cycle() {
        let (mut a, mut b) = ([Slot::EMPTY; 4], [Slot::EMPTY; 4]);
        let t = RedirectTable::new(&mut a, &mut b);
        t.push(0x1000, 0x9000, 0x2000, 1).unwrap();
        t.set_state(0x1000, 1, EntryState::Active).unwrap();
        t.push(0x1000, 0x9000, 0x3000, 2).unwrap();
        assert_eq!(decide(&t, 0x1000), TrapDecision::Redirect(0x2000));
        t.set_state(0x1000, 2, EntryState::Active).unwrap();
        assert_eq!(decide(&t, 0x1000), TrapDecision::Redirect(0x3000));
        t.set_state(0x1000, 2, EntryState::Reverting).unwrap();
        assert_eq!(decide(&t, 0x1000), TrapDecision::Redirect(0x2000));
        t.pop(0x1000, 2).unwrap();
        assert_eq!(decide(&t, 0x1000), TrapDecision::Redirect(0x2000));
        t.set_state(0x1000, 1, EntryState::Reverting).unwrap();
        assert_eq!(decide(&t, 0x1000), TrapDecision::Resume(0x9000));
        t.pop(0x1000, 1).unwrap();
        assert_eq!(decide(&t, 0x1000), TrapDecision::NotOurs);
        // the byte after the int3 (a caller that forgot ip - 1) is not ours either
        assert_eq!(decide(&t, 0x1001), TrapDecision::NotOurs);
    }

    #[test]
    fn trap_address_wraps_instead_of_panicking() {
        assert_eq!(trap_address(0), u64::MAX);
    }
}

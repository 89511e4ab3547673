//! # lp-core
//!
//! The `no_std` heart of livepatch: the pieces every adapter (kernel module, ptrace tool,
//! Python bindings) shares. It never touches memory it does not own: adapters hand it bytes and
//! addresses, it hands back decisions and plans.
//!
//! - [`table`]: the redirect table, old address → stack of new addresses, with a lookup for the
//!   trap path that never blocks and never allocates.
//! - [`trap`]: what a trap handler does with an `int3` it caught.
//! - [`site`]: whether a function's entry can be patched, and where the redirect goes.
//! - [`jump`]: the redirect's encoding (`jmp rel32`, or a 14-byte absolute form).
//! - [`plan`]: the ordered write plan (int3 → sync → tail → sync → first byte → sync).
//! - [`trampoline`]: the displaced entry instructions relocated so new code can call the old.
//! - [`clobber`]: the registers a function may write.
//! - [`call_site`]: a caller's direct `call`/`jmp`/`jcc rel32` retargeted at the new code.
//! - [`consistency`]: whether any thread is inside the code being switched.
#![no_std]
#![deny(missing_docs)]

pub mod call_site;
pub mod clobber;
pub mod consistency;
pub mod jump;
pub mod plan;
pub mod site;
pub mod table;
pub mod trampoline;
pub mod trap;

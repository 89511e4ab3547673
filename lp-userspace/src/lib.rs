//! livepatch's userspace adapter: patches running processes through ptrace.

pub mod process;
pub mod elf;
pub mod maps;
pub mod patchfile;
pub mod link;
pub mod pack;
pub mod unwind;
pub mod perf_map;
pub mod apply;
pub mod cli;
pub mod demo;
pub mod revert;
pub mod state;
pub mod status;
pub mod kernel;

pub use apply::{Error, ErrorKind};

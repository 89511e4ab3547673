//! livepatch's userspace adapter: patches running processes through ptrace.

pub mod apply;
pub mod cli;
mod deadline;
pub mod debug_info;
pub mod demo;
pub mod elf;
pub mod kernel;
pub mod link;
pub mod maps;
pub mod pack;
pub mod patchfile;
pub mod perf_map;
pub mod process;
pub mod revert;
pub mod state;
pub mod status;
pub mod thunk;
pub mod thunk_cfi;
pub mod unwind;

pub use apply::{Error, ErrorKind};

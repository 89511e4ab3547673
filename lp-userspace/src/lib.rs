//! livepatch's userspace adapter: patches running processes through ptrace.

pub mod process;
pub mod elf;
pub mod maps;
pub mod patchfile;
pub mod link;

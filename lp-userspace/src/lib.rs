//! livepatch's userspace adapter: patches running processes through ptrace.

pub mod process;

//! The target's memory through `/proc/PID/mem`: the kernel writes with FOLL_FORCE, so code pages
//! that are never writable (W^X targets) can be patched without mprotect.

use super::error::{ProcessError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

/// An open handle on a process's address space.
#[derive(Debug)]
pub struct Memory {
    pid: i32,
    file: File,
}

impl Memory {
    /// Opens `/proc/PID/mem` for reading and writing (through a live thread when the main
    /// thread has exited: `proc_dir.rs`). The file holds on to the address space it was opened
    /// on: it stays usable when that thread exits later, as long as the process runs.
    pub fn open(pid: i32) -> Result<Memory> {
        let file =
            super::proc_dir::open_shared(pid, "mem", OpenOptions::new().read(true).write(true))
                .map_err(|err| match err.raw_os_error() {
                    // No address space: no process, or one that exited and is not reaped yet (a
                    // zombie keeps its /proc directory).
                    Some(libc::ENOENT) | Some(libc::ESRCH) => {
                        let listed = std::path::Path::new(&format!("/proc/{pid}")).exists();
                        if listed && super::is_gone_or_zombie(pid) {
                            ProcessError::Exited(pid)
                        } else {
                            ProcessError::NoSuchProcess(pid)
                        }
                    }
                    Some(libc::EACCES) | Some(libc::EPERM) => ProcessError::Permission(pid),
                    _ => ProcessError::Memory {
                        op: "open",
                        pid,
                        addr: 0,
                        len: 0,
                        err,
                    },
                })?;
        Ok(Memory { pid, file })
    }

    /// Another handle on the same open `/proc/PID/mem` (a duplicated descriptor): for a
    /// reader that must not borrow this one, without the path walk and access check of a
    /// second open.
    pub fn try_clone(&self) -> Result<Memory> {
        let file = self.file.try_clone().map_err(|err| ProcessError::Memory {
            op: "dup",
            pid: self.pid,
            addr: 0,
            len: 0,
            err,
        })?;
        Ok(Memory {
            pid: self.pid,
            file,
        })
    }

    /// Fills `buf` from the target's address `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        self.file
            .read_exact_at(buf, addr)
            .map_err(|err| self.error("read", addr, len, err))
    }

    /// Reads `len` bytes at `addr`.
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    /// Reads a little-endian u64 at `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes `bytes` at the target's address `addr` (also on read-only code pages).
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, addr)
            .map_err(|err| self.error("write", addr, bytes.len(), err))
    }

    /// A failed access: the process exited (its memory went away under us: the kernel then
    /// reads and writes nothing, and the process has no address space left — no `VmSize` in
    /// its status — even before it is a zombie), or the error. Checked at once: reads of
    /// unmapped addresses fail too, and callers may expect that.
    fn error(&self, op: &'static str, addr: u64, len: usize, err: std::io::Error) -> ProcessError {
        if super::is_gone_or_zombie(self.pid) || super::proc_dir::no_address_space(self.pid) {
            return ProcessError::Exited(self.pid);
        }
        ProcessError::Memory {
            op,
            pid: self.pid,
            addr,
            len,
            err,
        }
    }
}

impl crate::unwind::MemoryReader for Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }
}

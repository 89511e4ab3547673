//! The bytes of an ELF file: memory-mapped read-only when opened from a path, so that opening
//! libc costs one `mmap` and the pages actually looked at (its `.eh_frame_hdr` search, a few
//! FDEs, a `.gnu.hash` chain) instead of a copy of the whole 2 MB file; owned when parsed from
//! memory (the vDSO, tests, fuzzing).
//!
//! Why not `std::fs::read`: a fresh `livepatch apply` opens every library the target maps, and
//! reading them whole was the largest part of its time (page-clearing and copying megabytes it
//! never looks at). `libc::mmap` directly rather than a crate: `libc` is a dependency already and
//! the wrapper is the few lines below.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Read-only bytes of a file (mapped) or of a buffer (owned).
pub(crate) enum FileBytes {
    /// A `MAP_PRIVATE`, `PROT_READ` mapping of the whole file.
    Mapped(Mapping),
    /// Bytes in memory.
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps the file at `path`; reads it into memory where it cannot be mapped (empty files,
    /// special files).
    pub(crate) fn open(path: &Path) -> std::io::Result<FileBytes> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len > 0 && file.metadata()?.is_file() {
            if let Ok(len) = usize::try_from(len) {
                if let Some(m) = Mapping::new(&file, len) {
                    return Ok(FileBytes::Mapped(m));
                }
            }
        }
        drop(file);
        std::fs::read(path).map(FileBytes::Owned)
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m.bytes(),
            FileBytes::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileBytes::Mapped(m) => write!(f, "Mapped({} bytes)", m.len),
            FileBytes::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
        }
    }
}

/// A read-only private mapping of a whole file, unmapped on drop.
pub(crate) struct Mapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone (never written, unmapped only in
// Drop), so sharing `&[u8]` views of it between threads is like sharing a `Box<[u8]>`.
unsafe impl Send for Mapping {}
// SAFETY: as above; there is no interior mutability.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize) -> Option<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of an open file descriptor;
        // it aliases no Rust object. PROT_READ + MAP_PRIVATE: we can never write the file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        own_mappings().insert(ptr as usize);
        Some(Mapping {
            ptr: ptr as *const u8,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes until Drop. The file is one a
        // running process has mapped (a library or executable): those are replaced by renaming
        // a new file over them (package managers, the linker), which leaves this mapping's inode
        // intact; truncating one in place would crash the process using it as well (SIGBUS),
        // so we rely on it not happening, as every debugger and profiler mapping ELF files does.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference into it outlives `self`
        // (every `&[u8]` handed out borrows `self`).
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
        own_mappings().remove(&(self.ptr as usize));
    }
}

/// Start addresses of the live [`Mapping`]s of this process.
fn own_mappings() -> std::sync::MutexGuard<'static, std::collections::HashSet<usize>> {
    static OWN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<usize>>> =
        std::sync::OnceLock::new();
    OWN.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `start` is where one of our own file mappings begins (see [`crate::maps::read`]).
pub(crate) fn is_own(start: u64) -> bool {
    usize::try_from(start).is_ok_and(|s| own_mappings().contains(&s))
}

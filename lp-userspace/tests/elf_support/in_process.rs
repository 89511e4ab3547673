//! Running linked patch code inside the test process itself: a mapping that receives a
//! `LinkedImage` with its regions' protections, and symbol lookup in what this process loaded.

use std::ffi::CString;

use lp_userspace::link::{LinkedImage, Protection};

/// Memory mapped in this process for an image; unmapped on drop.
pub struct Mapped {
    /// Where the mapping starts (the image's load address).
    pub addr: u64,
    len: usize,
}

/// Where `size` bytes fit within reach of the module at `lo..hi` of this process, among
/// every mapping it has. `maps::read` leaves this process's own read-only mappings of the
/// files it parses out (the tool looks at its targets, not at itself), and the kernel may put
/// one right next to the module (the test's library, parsed after it was loaded, once sat in
/// the gap below it: the hint then landed elsewhere).
pub fn free_near(lo: u64, hi: u64, size: u64) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/maps").ok()?;
    let all = lp_userspace::maps::parse(&text).ok()?;
    lp_userspace::maps::find_free_near(&all, lo, hi, size)
}

impl Mapped {
    /// `len` bytes of fresh anonymous memory, at `hint` if that is free (0: anywhere).
    pub fn new(len: u64, hint: u64) -> Mapped {
        // SAFETY: anonymous private mapping; the hint is only a hint (no MAP_FIXED).
        let p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapped {
            addr: p as u64,
            len: len as usize,
        }
    }

    /// Copies `image` (linked for `self.addr`) in and gives each region its protection.
    pub fn load(&self, image: &LinkedImage) {
        assert_eq!(image.load_addr, self.addr, "image linked for this mapping");
        assert!(image.bytes.len() <= self.len);
        // SAFETY: the mapping is ours, writable and at least image.bytes.len() long.
        unsafe {
            std::ptr::copy_nonoverlapping(
                image.bytes.as_ptr(),
                self.addr as *mut u8,
                image.bytes.len(),
            )
        };
        for r in &image.regions {
            let prot = match r.prot {
                Protection::ReadExec => libc::PROT_READ | libc::PROT_EXEC,
                Protection::Read => libc::PROT_READ,
                Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
            };
            // SAFETY: the region lies inside our mapping (page aligned by the layout).
            let rc = unsafe {
                libc::mprotect(
                    (self.addr + r.offset) as *mut libc::c_void,
                    r.len as usize,
                    prot,
                )
            };
            assert_eq!(rc, 0);
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping the region we mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The address of `name` among the libraries this process loaded (`dlsym(RTLD_DEFAULT)`).
pub fn dlsym(name: &str) -> Option<u64> {
    let c = CString::new(name).ok()?;
    // SAFETY: dlsym with RTLD_DEFAULT and a valid C string only reads the symbol tables.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
    (!p.is_null()).then_some(p as u64)
}

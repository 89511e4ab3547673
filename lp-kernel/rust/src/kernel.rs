//! What a `no_std` staticlib needs from its host: a panic handler and an allocator.

use core::alloc::{GlobalAlloc, Layout};

extern "C" {
    /// C shim: logs the message and stops the kernel (a Rust panic is a bug in lpcore).
    fn lp_c_rust_panic(msg: *const u8, len: usize) -> !;
    /// C shim: `kmalloc(size, GFP_ATOMIC)` aligned to at least `align` (≤ PAGE_SIZE).
    fn lp_c_alloc(size: usize, align: usize) -> *mut u8;
    /// C shim: `kfree`.
    fn lp_c_free(ptr: *mut u8);
}

/// Formats the panic message into a fixed buffer (no allocation while panicking).
struct PanicBuf {
    buf: [u8; 256],
    len: usize,
}

impl core::fmt::Write for PanicBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = room.min(s.len());
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let mut out = PanicBuf {
        buf: [0; 256],
        len: 0,
    };
    let _ = write!(out, "{info}");
    // SAFETY: the pointer and length describe `out.buf`'s initialised prefix.
    unsafe { lp_c_rust_panic(out.buf.as_ptr(), out.len) }
}

/// `kmalloc` with `GFP_ATOMIC`: lp-core's planning code may allocate; the trap path never does.
struct KernelAlloc;

// SAFETY: kmalloc returns memory aligned to its size class (power of two up to PAGE_SIZE), the
// shim rounds the size up to `align` so the alignment holds; kfree releases it.
unsafe impl GlobalAlloc for KernelAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain call into the shim; a null result is the documented failure.
        unsafe { lp_c_alloc(layout.size(), layout.align()) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above.
        unsafe { lp_c_free(ptr) }
    }
}

#[global_allocator]
static ALLOCATOR: KernelAlloc = KernelAlloc;

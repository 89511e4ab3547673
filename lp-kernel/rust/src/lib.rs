//! lp-core inside the kernel: the C shim of `lpcore.ko` calls these `extern "C"` functions.
//!
//! Built as a staticlib for `x86_64-unknown-none` (no SSE, no red zone, kernel code model),
//! reduced with `ld -r --gc-sections` to what the exported `lp_rs_*` symbols need and linked
//! into the module by kbuild. Nothing here sleeps or allocates: the redirect lookup runs in the
//! ftrace handler, the stack check and the commits inside `stop_machine`.
//!
//! The trap is ftrace (the `call __fentry__` at each function's entry), so the table's site
//! address is the function's address, and "resume the original" means: let the ftrace handler
//! return without touching the instruction pointer (the `resume` recorded is the site itself).
#![cfg_attr(not(test), no_std)]

mod ffi;
#[cfg(not(test))]
mod kernel;
mod redirects;
mod stacks;

/// ABI version of the `lp_rs_*` interface, checked by the C shim at init.
pub const ABI_VERSION: u32 = 1;

/// The interface version the C shim expects (it refuses to load on a mismatch).
#[no_mangle]
pub extern "C" fn lp_rs_abi_version() -> u32 {
    ABI_VERSION
}

//! A C++ exception thrown and caught inside linked patch code: the image's relocated .eh_frame
//! (zero-terminated, as `LinkedImage::eh_frame` gives it) registered with `__register_frame`
//! is all the C++ runtime needs — what user-proc does remotely in the target.

#[path = "elf_support/mod.rs"]
mod support;

use support::in_process::{dlsym, Mapped};

use std::ffi::CString;

use lp_userspace::link::Layout;

#[no_mangle]
pub extern "C" fn lp_cxx_test_callback(x: i32) -> i32 {
    x * 100
}

#[test]
fn link_cxx_exception_caught_through_new_functions() {
    let dir = tempfile::tempdir().unwrap();
    let obj = support::gcc(
        dir.path(),
        "t.o",
        &[
            "-c",
            "-fPIC",
            "-O2",
            support::fixture("throw_obj.cpp").to_str().unwrap(),
        ],
    );
    let obj = std::fs::read(obj).unwrap();
    // The C++ runtime, as a C++ target process would have it.
    let lib = CString::new("libstdc++.so.6").unwrap();
    // SAFETY: loading a system library.
    let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    assert!(!h.is_null(), "libstdc++ loads");

    let layout = Layout::of(&obj).unwrap();
    let mapped = Mapped::new(layout.size(), 0);
    let base = mapped.addr;
    let image = layout
        .link(base, &|name| match name {
            "host_callback" => Some(lp_cxx_test_callback as *const () as u64),
            _ => dlsym(name),
        })
        .unwrap();
    mapped.load(&image);
    let eh = image.eh_frame.clone().expect("C++ object has .eh_frame");
    let register = dlsym("__register_frame").expect("libgcc_s exports __register_frame");
    let deregister = dlsym("__deregister_frame").unwrap();
    // SAFETY: __register_frame(void *) from libgcc_s, given a zero-terminated .eh_frame that
    // stays mapped until __deregister_frame below.
    unsafe {
        let register: extern "C" fn(u64) = std::mem::transmute(register as usize);
        register(eh.start);
    }
    let catcher = image.symbol("lp_catcher").unwrap();
    // SAFETY: linked for this address; signature from throw_obj.cpp.
    let catcher: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(catcher as usize) };
    assert_eq!(catcher(3), 301, "normal path through the callback");
    assert_eq!(
        catcher(20),
        -1,
        "thrown in lp_thrower, through lp_middle, caught in lp_catcher"
    );
    // SAFETY: pairs with the registration above.
    unsafe {
        let deregister: extern "C" fn(u64) = std::mem::transmute(deregister as usize);
        deregister(eh.start);
    }
}

//! Live patching in the test process: a gcc-built shared object loaded with `dlopen`, pages
//! near it for trampolines and relays, and plan execution on real memory.

use std::ffi::CString;
use std::sync::atomic::{fence, Ordering};

use lp_core::jump::Jump;
use lp_core::plan::{plan_apply, WritePlan};
use lp_core::site::Site;

use super::{function, gcc_files, Compiled};

pub const C_SOURCE: &str = r#"
__attribute__((visibility("hidden"))) int factor = 3;
int scale(int x) { return x * factor + 1; }
long sum_to(long n) { long s = 0; for (long i = 1; i <= n; i++) s += i * i; return s; }
"#;

/// `countdown`'s loop head is its entry, and the loop branch is among the displaced bytes.
pub const ASM_SOURCE: &str = r#"
    .text
    .globl countdown
    .type countdown, @function
countdown:
    sub $1, %edi
    jg countdown
    mov %edi, %eax
    ret
    .size countdown, .-countdown
    .section .note.GNU-stack,"",@progbits
"#;

/// A shared object loaded into this process.
pub struct Loaded {
    pub obj: Compiled,
    handle: *mut libc::c_void,
}

impl Loaded {
    pub fn new() -> Loaded {
        let obj = gcc_files(
            &[("lib.c", C_SOURCE), ("loop.s", ASM_SOURCE)],
            &["-O2", "-shared", "-fPIC", "-fcf-protection=none"],
        );
        let path = CString::new(obj.path.to_str().unwrap()).unwrap();
        // SAFETY: dlopen of a library we just built; it has no constructors.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen failed");
        Loaded { obj, handle }
    }

    /// The function's live address and its bytes as they are in memory.
    pub fn live(&self, name: &str) -> (u64, Vec<u8>) {
        let f = function(&self.obj.bytes, name);
        let cname = CString::new(name).unwrap();
        // SAFETY: looking up a symbol in a handle we own.
        let addr = unsafe { libc::dlsym(self.handle, cname.as_ptr()) } as u64;
        assert_ne!(addr, 0);
        // SAFETY: the symbol's st_size bytes are mapped text of the loaded object.
        let code = unsafe { std::slice::from_raw_parts(addr as *const u8, f.size) }.to_vec();
        assert_eq!(code, f.code, "loaded bytes differ from the file");
        (addr, code)
    }
}

/// A page for trampolines and relays within rel32 reach of `near`.
pub struct NearPage(*mut u8);

impl NearPage {
    pub fn new(near: u64) -> NearPage {
        for delta in [0x100_0000u64, 0x1000_0000, 0x4000_0000] {
            for hint in [near.wrapping_sub(delta), near.wrapping_add(delta)] {
                // SAFETY: an anonymous private mapping; the hint is only a hint.
                let p = unsafe {
                    libc::mmap(
                        (hint & !0xfff) as *mut libc::c_void,
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    continue;
                }
                if (p as u64).abs_diff(near) < 0x7000_0000 {
                    return NearPage(p as *mut u8);
                }
                // SAFETY: unmapping the page we just mapped.
                unsafe { libc::munmap(p, 4096) };
            }
        }
        panic!("no page within reach of {near:#x}");
    }

    pub fn addr(&self, off: usize) -> u64 {
        self.0 as u64 + off as u64
    }

    pub fn write(&self, off: usize, bytes: &[u8]) {
        // SAFETY: the page is ours, 4096 bytes, and writable until `seal`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(off), bytes.len()) };
    }

    pub fn seal(&self) {
        // SAFETY: our own page; from now on it is only executed.
        let rc =
            unsafe { libc::mprotect(self.0 as *mut _, 4096, libc::PROT_READ | libc::PROT_EXEC) };
        assert_eq!(rc, 0);
    }
}

/// Make the code page(s) around `addr` writable (and still executable) for the test's writes.
pub fn unprotect(addr: u64, len: usize) {
    let start = addr & !0xfff;
    let end = (addr + len as u64 + 0xfff) & !0xfff;
    // SAFETY: the pages belong to the shared object the test loaded; keeping EXEC lets other
    // functions on the same page keep running while we write.
    let rc = unsafe {
        libc::mprotect(
            start as *mut _,
            (end - start) as usize,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        )
    };
    assert_eq!(rc, 0, "mprotect");
}

/// Perform `plan` on live memory, checking memory against a simulated copy after every step.
/// One thread: a full fence stands in for the cross-CPU serialisation.
pub fn execute(plan: &WritePlan) {
    execute_with(plan, || fence(Ordering::SeqCst));
}

/// Perform `plan` on live memory with `sync` as the serialisation step, checking memory against
/// a simulated copy after every step.
pub fn execute_with(plan: &WritePlan, mut sync: impl FnMut()) {
    let addr = plan.addr();
    let len = plan.len();
    // SAFETY: `addr..addr+len` is patchable text made writable by `unprotect`.
    let live = || unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
    assert_eq!(
        live(),
        plan.expected(),
        "memory is not what the plan expects"
    );
    let mut model = plan.expected().to_vec();
    for step in plan.steps() {
        match step.data() {
            Some((at, data)) => {
                // SAFETY: each write lies inside the plan's range (asserted by the model).
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at as *mut u8, data.len()) };
                assert!(step.apply(addr, &mut model));
            }
            None => sync(),
        }
        assert_eq!(live(), model);
    }
    assert_eq!(live(), plan.result());
}

/// Redirect `site` to `target` through a relay (`jmp abs`) at `relay_off` in `page`.
pub fn redirect(site: &Site, page: &NearPage, relay_off: usize, target: u64) -> WritePlan {
    page.write(relay_off, Jump::absolute(target).as_bytes());
    // SAFETY: reading the live bytes at the patch address.
    let current =
        unsafe { std::slice::from_raw_parts(site.patch_addr as *const u8, site.displaced_len) }
            .to_vec();
    plan_apply(site, &current, page.addr(relay_off)).expect("plan")
}

pub type IntFn = extern "C" fn(i32) -> i32;
pub type LongFn = extern "C" fn(i64) -> i64;

pub fn as_int_fn(addr: u64) -> IntFn {
    // SAFETY: `addr` is the start of code with the C signature int(int).
    unsafe { std::mem::transmute::<usize, IntFn>(addr as usize) }
}

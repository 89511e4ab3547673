//! Plans and trampolines executed for real: gcc builds a shared object, the test loads it into
//! its own process, patches live functions with the plan's steps (checking memory after every
//! write), calls them, calls the original through the trampoline, stacks a second patch and
//! reverts everything, observing the return values a caller would see.

mod sites_support;

use std::ffi::CString;
use std::sync::atomic::{fence, AtomicUsize, Ordering};

use lp_core::jump::Jump;
use lp_core::plan::{plan_apply, plan_revert, WritePlan};
use lp_core::site::{validate_site, Site};
use lp_core::trampoline::{build_trampoline, MAX_TRAMPOLINE_LEN};
use sites_support::{function, gcc_files, Compiled};

const C_SOURCE: &str = r#"
__attribute__((visibility("hidden"))) int factor = 3;
int scale(int x) { return x * factor + 1; }
long sum_to(long n) { long s = 0; for (long i = 1; i <= n; i++) s += i * i; return s; }
"#;

/// `countdown`'s loop head is its entry, and the loop branch is among the displaced bytes.
const ASM_SOURCE: &str = r#"
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
struct Loaded {
    obj: Compiled,
    handle: *mut libc::c_void,
}

impl Loaded {
    fn new() -> Loaded {
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
    fn live(&self, name: &str) -> (u64, Vec<u8>) {
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
struct NearPage(*mut u8);

impl NearPage {
    fn new(near: u64) -> NearPage {
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

    fn addr(&self, off: usize) -> u64 {
        self.0 as u64 + off as u64
    }

    fn write(&self, off: usize, bytes: &[u8]) {
        // SAFETY: the page is ours, 4096 bytes, and writable until `seal`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(off), bytes.len()) };
    }

    fn seal(&self) {
        // SAFETY: our own page; from now on it is only executed.
        let rc =
            unsafe { libc::mprotect(self.0 as *mut _, 4096, libc::PROT_READ | libc::PROT_EXEC) };
        assert_eq!(rc, 0);
    }
}

/// Make the code page(s) around `addr` writable (and still executable) for the test's writes.
fn unprotect(addr: u64, len: usize) {
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
fn execute(plan: &WritePlan) {
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
            // one thread: a full fence stands in for the cross-CPU serialisation
            None => fence(Ordering::SeqCst),
        }
        assert_eq!(live(), model);
    }
    assert_eq!(live(), plan.result());
}

/// Redirect `site` to `target` through a relay (`jmp abs`) at `relay_off` in `page`.
fn redirect(site: &Site, page: &NearPage, relay_off: usize, target: u64) -> WritePlan {
    page.write(relay_off, Jump::absolute(target).as_bytes());
    // SAFETY: reading the live bytes at the patch address.
    let current =
        unsafe { std::slice::from_raw_parts(site.patch_addr as *const u8, site.displaced_len) }
            .to_vec();
    plan_apply(site, &current, page.addr(relay_off)).expect("plan")
}

type IntFn = extern "C" fn(i32) -> i32;
type LongFn = extern "C" fn(i64) -> i64;

fn as_int_fn(addr: u64) -> IntFn {
    // SAFETY: `addr` is the start of code with the C signature int(int).
    unsafe { std::mem::transmute::<usize, IntFn>(addr as usize) }
}

static SCALE_ORIGINAL: AtomicUsize = AtomicUsize::new(0);
static COUNTDOWN_CALLS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn scale_times_ten(x: i32) -> i32 {
    as_int_fn(SCALE_ORIGINAL.load(Ordering::SeqCst) as u64)(x) * 10
}

extern "C" fn scale_minus_one(x: i32) -> i32 {
    -1 - x
}

extern "C" fn countdown_counted(x: i32) -> i32 {
    COUNTDOWN_CALLS.fetch_add(1, Ordering::SeqCst);
    x + 1000
}

#[test]
fn patched_function_calls_the_original_through_its_trampoline() {
    let lib = Loaded::new();
    let (addr, code) = lib.live("scale");
    let scale = as_int_fn(addr);
    assert_eq!(scale(5), 16);

    let site = validate_site(&code, addr, 5).unwrap();
    assert!(
        site.relative_in_displaced >= 1,
        "scale reads `factor` RIP-relatively at entry"
    );
    let page = NearPage::new(addr);
    let mut tramp = [0u8; MAX_TRAMPOLINE_LEN];
    let n = build_trampoline(&site, page.addr(0), &mut tramp).unwrap();
    page.write(0, &tramp[..n]);
    SCALE_ORIGINAL.store(page.addr(0) as usize, Ordering::SeqCst);

    unprotect(site.patch_addr, site.displaced_len);
    let apply = redirect(&site, &page, 512, scale_times_ten as IntFn as usize as u64);
    let stacked_relay = 1024;
    page.write(
        stacked_relay,
        Jump::absolute(scale_minus_one as IntFn as usize as u64).as_bytes(),
    );
    page.seal();

    // the trampoline alone is the original function
    assert_eq!(as_int_fn(page.addr(0))(5), 16);
    assert_eq!(as_int_fn(page.addr(0))(-7), -20);

    execute(&apply);
    assert_eq!(scale(5), 160, "new code runs and calls the original");
    assert_eq!(scale(0), 10);

    // a second patch stacked on the first plans from the first jump's bytes
    // SAFETY: reading the live bytes at the patch address.
    let current =
        unsafe { std::slice::from_raw_parts(site.patch_addr as *const u8, site.displaced_len) }
            .to_vec();
    let stacked = plan_apply(&site, &current, page.addr(stacked_relay)).unwrap();
    assert_eq!(stacked.expected(), apply.result());
    execute(&stacked);
    assert_eq!(scale(5), -6);

    execute(&plan_revert(&stacked));
    assert_eq!(scale(5), 160);
    execute(&plan_revert(&apply));
    assert_eq!(scale(5), 16);
    // SAFETY: reading back the restored function.
    let restored = unsafe { std::slice::from_raw_parts(addr as *const u8, code.len()) };
    assert_eq!(restored, &code[..]);
}

#[test]
fn relocated_conditional_branch_still_reaches_the_original_body() {
    let lib = Loaded::new();
    let (addr, code) = lib.live("sum_to");
    // SAFETY: sum_to has the C signature long(long).
    let sum_to = unsafe { std::mem::transmute::<usize, LongFn>(addr as usize) };
    let site = validate_site(&code, addr, 5).unwrap();
    let page = NearPage::new(addr);
    let mut tramp = [0u8; MAX_TRAMPOLINE_LEN];
    let n = build_trampoline(&site, page.addr(0), &mut tramp).unwrap();
    page.write(0, &tramp[..n]);
    page.seal();
    // SAFETY: the trampoline is sum_to's code relocated.
    let via_trampoline = unsafe { std::mem::transmute::<usize, LongFn>(page.addr(0) as usize) };
    for x in [-3i64, 0, 1, 2, 10, 1000] {
        assert_eq!(via_trampoline(x), sum_to(x), "sum_to({x})");
    }
    assert_eq!(via_trampoline(10), 385);
}

#[test]
fn loop_back_to_the_entry_stays_in_the_trampoline() {
    let lib = Loaded::new();
    let (addr, code) = lib.live("countdown");
    let countdown = as_int_fn(addr);
    assert_eq!(countdown(10), 0);
    let site = validate_site(&code, addr, 5).unwrap();
    assert_eq!(site.branches_to_patch_addr, 1);
    assert_eq!(site.displaced_len, 5); // sub $1,%edi; jg countdown

    let page = NearPage::new(addr);
    let mut tramp = [0u8; MAX_TRAMPOLINE_LEN];
    let n = build_trampoline(&site, page.addr(0), &mut tramp).unwrap();
    page.write(0, &tramp[..n]);
    unprotect(site.patch_addr, site.displaced_len);
    let apply = redirect(
        &site,
        &page,
        512,
        countdown_counted as IntFn as usize as u64,
    );
    page.seal();
    execute(&apply);
    assert_eq!(countdown(10), 1010);
    assert_eq!(COUNTDOWN_CALLS.load(Ordering::SeqCst), 1);

    // the original, run through the trampoline, loops inside the trampoline: it never
    // enters the patched entry (which would call the new function again)
    let original = as_int_fn(page.addr(0));
    assert_eq!(original(10), 0);
    assert_eq!(original(-5), -6);
    assert_eq!(COUNTDOWN_CALLS.load(Ordering::SeqCst), 1);

    execute(&plan_revert(&apply));
    assert_eq!(countdown(10), 0);
    assert_eq!(COUNTDOWN_CALLS.load(Ordering::SeqCst), 1);
}

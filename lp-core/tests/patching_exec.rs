//! Plans and trampolines executed for real: gcc builds a shared object, the test loads it into
//! its own process, patches live functions with the plan's steps (checking memory after every
//! write), calls them, calls the original through the trampoline, stacks a second patch and
//! reverts everything, observing the return values a caller would see.

mod sites_support;

use std::sync::atomic::{AtomicUsize, Ordering};

use lp_core::jump::Jump;
use lp_core::plan::{plan_apply, plan_revert};
use lp_core::site::validate_site;
use lp_core::trampoline::{build_trampoline, MAX_TRAMPOLINE_LEN};
use sites_support::live::{
    as_int_fn, execute, redirect, unprotect, IntFn, Loaded, LongFn, NearPage,
};

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

//! The int3 protocol under fire: threads call a live function in a tight loop while the main
//! thread applies and reverts a redirect hundreds of times, with `membarrier(SYNC_CORE)` as the
//! plan's `Sync` and a SIGTRAP handler playing the trap path (a thread that hits the temporary
//! int3 is sent to the new code while applying, to the original — the trampoline — while
//! reverting). Every call must return the old or the new value; a torn instruction would crash
//! the process or return garbage.

mod sites_support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use lp_core::plan::plan_revert;
use lp_core::site::validate_site;
use lp_core::trampoline::{build_trampoline, MAX_TRAMPOLINE_LEN};
use sites_support::live::{as_int_fn, execute_with, redirect, unprotect, IntFn, Loaded, NearPage};

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 6;

/// The patch address whose int3 is ours, and where a thread that hits it goes.
static TRAP_AT: AtomicU64 = AtomicU64::new(0);
static SEND_TO: AtomicU64 = AtomicU64::new(0);
static TRAPS: AtomicUsize = AtomicUsize::new(0);
static ORIGINAL: AtomicU64 = AtomicU64::new(0);
/// Results the callers have seen so far.
static OLD_SEEN: AtomicU64 = AtomicU64::new(0);
static NEW_SEEN: AtomicU64 = AtomicU64::new(0);

/// Let the callers run until they have seen one more result of `seen`'s kind (or give up after
/// a while: a starved caller is not a failure of the protocol).
fn let_callers_see(seen: &AtomicU64) {
    let before = seen.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    while seen.load(Ordering::SeqCst) == before && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
}

extern "C" fn times_ten(x: i32) -> i32 {
    as_int_fn(ORIGINAL.load(Ordering::SeqCst))(x) * 10
}

extern "C" fn on_sigtrap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; we only touch rip.
    unsafe {
        let uc = ctx as *mut libc::ucontext_t;
        let rip = &mut (*uc).uc_mcontext.gregs[libc::REG_RIP as usize];
        // after int3, rip points past it
        if (*rip as u64).wrapping_sub(1) != TRAP_AT.load(Ordering::SeqCst) {
            libc::abort(); // not our int3
        }
        *rip = SEND_TO.load(Ordering::SeqCst) as i64;
    }
    TRAPS.fetch_add(1, Ordering::Relaxed);
}

fn membarrier(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier takes (cmd, flags, cpu_id) and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) }
}

#[test]
fn callers_see_old_or_new_never_a_torn_instruction() {
    let lib = Loaded::new();
    let (addr, code) = lib.live("scale");
    let scale = as_int_fn(addr);
    assert_eq!(scale(5), 16);
    let site = validate_site(&code, addr, 5).unwrap();

    let page = NearPage::new(addr);
    let mut tramp = [0u8; MAX_TRAMPOLINE_LEN];
    let n = build_trampoline(&site, page.addr(0), &mut tramp).unwrap();
    page.write(0, &tramp[..n]);
    ORIGINAL.store(page.addr(0), Ordering::SeqCst);
    unprotect(site.patch_addr, site.displaced_len);
    let apply = redirect(&site, &page, 512, times_ten as IntFn as usize as u64);
    let revert = plan_revert(&apply);
    page.seal();

    assert_eq!(
        membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE),
        0,
        "membarrier SYNC_CORE registration"
    );
    let sync = || assert_eq!(membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE), 0);

    // SAFETY: installing a SIGTRAP handler for this test process (this test binary has no other
    // test that could trap).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigtrap;
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
    }
    TRAP_AT.store(site.patch_addr, Ordering::SeqCst);

    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match std::hint::black_box(scale)(5) {
                        16 => OLD_SEEN.fetch_add(1, Ordering::SeqCst),
                        160 => NEW_SEEN.fetch_add(1, Ordering::SeqCst),
                        other => panic!("scale(5) returned {other}"),
                    };
                }
            })
        })
        .collect();

    const CYCLES: usize = 200;
    for _ in 0..CYCLES {
        SEND_TO.store(times_ten as IntFn as usize as u64, Ordering::SeqCst);
        execute_with(&apply, sync);
        assert_eq!(scale(5), 160);
        let_callers_see(&NEW_SEEN);
        SEND_TO.store(page.addr(0), Ordering::SeqCst);
        execute_with(&revert, sync);
        assert_eq!(scale(5), 16);
        let_callers_see(&OLD_SEEN);
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().expect("a caller thread failed");
    }
    let (old, new) = (
        OLD_SEEN.load(Ordering::SeqCst),
        NEW_SEEN.load(Ordering::SeqCst),
    );
    // SAFETY: reading back the restored function.
    let restored = unsafe { std::slice::from_raw_parts(addr as *const u8, code.len()) };
    assert_eq!(restored, &code[..]);
    eprintln!(
        "{CYCLES} apply/revert cycles: {old} old and {new} new results, {} calls trapped",
        TRAPS.load(Ordering::Relaxed)
    );
    assert!(old > 0 && new > 0, "callers ran through both versions");
}

//! The trap decision on a real `int3`: machine code in an executable page of this process has
//! its site's first byte replaced by `int3` (step 1 of the write plan); calling it raises
//! SIGTRAP, whose handler does what a kernel or ptrace adapter does: take the saved ip, compute
//! the trap address, ask `lp_core::trap::decide`, and set the ip. What the call returns shows
//! which code ran: the original (through its trampoline), a replacement, or, for an `int3` that
//! is not in the table, the code after someone else's breakpoint.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::ptr::addr_of_mut;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use lp_core::table::{EntryState, RedirectTable, Slot};
use lp_core::trap::{decide, trap_address, TrapDecision};

const N: usize = 8;
static mut STORAGE_A: [Slot; N] = [Slot::EMPTY; N];
static mut STORAGE_B: [Slot; N] = [Slot::EMPTY; N];
// SAFETY: the two arrays are used by this table only, for the whole program.
static TABLE: RedirectTable<'static> = unsafe {
    RedirectTable::from_raw_parts(
        addr_of_mut!(STORAGE_A) as *mut Slot,
        addr_of_mut!(STORAGE_B) as *mut Slot,
        N,
    )
};

static OURS: AtomicUsize = AtomicUsize::new(0);
static NOT_OURS: AtomicUsize = AtomicUsize::new(0);
static LAST_TRAP: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigtrap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; we only read and
    // write the saved rip of the interrupted thread.
    let ucontext = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    let rip = &mut ucontext.uc_mcontext.gregs[libc::REG_RIP as usize];
    let trap = trap_address(*rip as u64);
    LAST_TRAP.store(trap, Ordering::SeqCst);
    match decide(&TABLE, trap) {
        TrapDecision::Redirect(to) | TrapDecision::Resume(to) => {
            OURS.fetch_add(1, Ordering::SeqCst);
            *rip = to as i64;
        }
        // pass it on: here "the debugger" just lets execution continue after its int3
        TrapDecision::NotOurs => {
            NOT_OURS.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// `mov eax, imm32`
fn mov_eax(v: u32) -> Vec<u8> {
    let mut b = vec![0xb8];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

struct Code {
    page: *mut u8,
}

const OLD: usize = 0x00; // original function: mov eax,1 ; ret — first byte replaced by int3
const TRAMPOLINE: usize = 0x40; // displaced mov eax,1 ; jmp OLD+5
const NEW_1: usize = 0x80; // mov eax,2 ; ret
const NEW_2: usize = 0xc0; // mov eax,3 ; ret
const FOREIGN: usize = 0x100; // int3 ; mov eax,7 ; ret  (somebody else's breakpoint)

impl Code {
    fn build() -> Code {
        let mut bytes = vec![0x90u8; 4096];
        let mut put = |at: usize, code: &[u8]| bytes[at..at + code.len()].copy_from_slice(code);
        let mut old = mov_eax(1);
        old.push(0xc3);
        old[0] = 0xcc; // the int3 of the write plan's first step
        put(OLD, &old);
        let mut tramp = mov_eax(1);
        let from = (TRAMPOLINE + 5 + 5) as i32;
        tramp.push(0xe9);
        tramp.extend_from_slice(&((OLD + 5) as i32 - from).to_le_bytes());
        put(TRAMPOLINE, &tramp);
        put(NEW_1, &[mov_eax(2), vec![0xc3]].concat());
        put(NEW_2, &[mov_eax(3), vec![0xc3]].concat());
        put(FOREIGN, &[vec![0xcc], mov_eax(7), vec![0xc3]].concat());

        // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED below.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        let page = page as *mut u8;
        // SAFETY: `page` is a writable 4096-byte mapping we own; then made read+exec (never W+X).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), page, 4096);
            assert_eq!(
                libc::mprotect(page.cast(), 4096, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
        }
        Code { page }
    }

    fn addr(&self, offset: usize) -> u64 {
        self.page as u64 + offset as u64
    }

    fn call(&self, offset: usize) -> u32 {
        // SAFETY: every offset used is the start of a complete function in our RX page that
        // takes no arguments, returns in eax and touches only eax (or traps into our handler).
        let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(self.page.add(offset)) };
        f()
    }
}

impl Drop for Code {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `build`; nothing calls into it afterwards.
        unsafe { libc::munmap(self.page.cast(), 4096) };
    }
}

fn install_handler() {
    // SAFETY: a zeroed sigaction with our SA_SIGINFO handler and an empty mask is valid.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigtrap;
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
    }
}

#[test]
fn int3_handler_follows_the_table_through_apply_stack_and_revert() {
    install_handler();
    let code = Code::build();
    let (site, resume) = (code.addr(OLD), code.addr(TRAMPOLINE));
    let (new1, new2) = (code.addr(NEW_1), code.addr(NEW_2));

    // someone else's int3: not ours, passed on
    assert_eq!(code.call(FOREIGN), 7);
    assert_eq!(NOT_OURS.load(Ordering::SeqCst), 1);
    assert_eq!(LAST_TRAP.load(Ordering::SeqCst), code.addr(FOREIGN));

    let mut expected_traps = 0;
    let mut call_old = |want: u32, phase: &str| {
        assert_eq!(code.call(OLD), want, "{phase}");
        expected_traps += 1;
        assert_eq!(OURS.load(Ordering::SeqCst), expected_traps, "{phase}");
        assert_eq!(LAST_TRAP.load(Ordering::SeqCst), site, "{phase}");
    };

    TABLE.push(site, resume, new1, 1).unwrap();
    call_old(1, "patch 1 pending: original code via the trampoline");
    TABLE.set_state(site, 1, EntryState::Active).unwrap();
    call_old(2, "patch 1 committed");
    TABLE.push(site, resume, new2, 2).unwrap();
    call_old(2, "patch 2 pending: still patch 1");
    TABLE.set_state(site, 2, EntryState::Active).unwrap();
    call_old(3, "patch 2 committed");
    TABLE.set_state(site, 2, EntryState::Reverting).unwrap();
    call_old(2, "patch 2 reverting: back to patch 1");
    TABLE.pop(site, 2).unwrap();
    call_old(2, "patch 2 removed");
    TABLE.set_state(site, 1, EntryState::Reverting).unwrap();
    call_old(1, "patch 1 reverting: original code");
    TABLE.pop(site, 1).unwrap();
    assert!(TABLE.is_empty());

    // the site is no longer ours: an int3 there now belongs to whoever else planted it
    assert_eq!(decide(&TABLE, site), TrapDecision::NotOurs);
    assert_eq!(NOT_OURS.load(Ordering::SeqCst), 1);
}

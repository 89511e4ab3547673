//! The SIGTRAP handler that nonstop mode puts into the target: machine code generated here
//! (with iced-x86's assembler) and a table the tool fills with lp-core's decisions.
//!
//! A thread of the target that reaches one of our temporary `int3`s takes SIGTRAP in its own
//! process, and this handler moves it on: no ptrace stop, no round trip through the tool. The
//! handler is a dumb lookup — `rip - 1` in the site table, the destination for the current
//! phase — every decision is lp-core's, computed by the tool beforehand (see `nonstop.rs`).
//!
//! Layout of the in-target area (one memfd mapping, see [`AREA_LEN`]):
//! - page 0, r-x: the handler at offset 0, the restorer (`mov eax, 15; syscall`) at
//!   [`RESTORER_OFF`];
//! - page 1.., rw-: the data below, then the site tables, then the threads' trap records
//!   ([`SEEN`]), then the sync agent's page ([`AGENT`], see `sync_agent.rs`), whose code sits
//!   in the code page at [`AGENT_CODE`].
//!
//! The handler is written with the data page's absolute address baked in (the area never
//! moves): `r11` holds it throughout.

use iced_x86::code_asm::*;

/// Size of the whole area: one code page and the data pages.
pub(crate) const AREA_LEN: u64 = 18 * PAGE;
/// Page size.
pub(crate) const PAGE: u64 = 4096;
/// Offset of the restorer in the code page.
pub(crate) const RESTORER_OFF: u64 = 0x200;
/// Offset of the sync agent's code in the code page (see `sync_agent.rs`).
pub(crate) const AGENT_CODE: u64 = 0x240;

// Data page offsets.
/// Phase index per table bank (u8 at PHASE + bank): which destination column the handler
/// uses. Flipped by the tool with a single one-byte write (atomic through /proc/PID/mem).
pub(crate) const PHASE: u64 = 0;
/// The bank (u8, 0 or 1) whose table and phase the handler uses. A switch fills the other
/// bank, then flips this byte: a thread of the previous switch still on its way to the
/// handler reads either the previous bank, untouched, or the new one, which carries the
/// previous switch's sites (sending such a thread back to the site, whose bytes are whole
/// again) — never a table being rewritten (review N4).
pub(crate) const BANK: u64 = 2;
/// Threads inside the handler (u64, lock inc on entry, lock dec on every exit).
pub(crate) const INSIDE: u64 = 8;
/// Traps redirected (u64, for the figures).
pub(crate) const HITS: u64 = 16;
/// The previous SIGTRAP action (kernel `struct sigaction`: handler, flags, restorer, mask).
pub(crate) const OLD_ACT: u64 = 32;
/// An all-zero action: SIG_DFL.
pub(crate) const DFL_ACT: u64 = 64;
/// A signal set holding SIGTRAP alone.
pub(crate) const TRAP_SET: u64 = 96;
/// The settle epoch (u64, below 2^32): set by the tool once every int3 of a switch is in
/// place and seen; a trap of ours copies it into the thread's record (see [`SEEN`]).
pub(crate) const EPOCH: u64 = 104;
/// The process the area belongs to (u64 pid, then u64 start time at OWNER + 8, from
/// /proc/PID/stat): a forked child shares the parent's area (a shared mapping), and must not
/// switch through it (its tables, phase and agent are the parent's).
pub(crate) const OWNER: u64 = 112;
/// Scratch for the tool's remote rt_sigaction calls (new action).
pub(crate) const SCRATCH_ACT: u64 = 128;
/// Scratch for the tool's remote rt_sigaction calls (action read back).
pub(crate) const SCRATCH_OLD: u64 = 160;
/// Number of sites in each bank's table (u64 at NSITES + 8 * bank).
pub(crate) const NSITES: u64 = 232;
/// The site tables, one per bank (bank b at TABLE + b * BANK_LEN): per site the int3
/// address, then one destination per phase (0: not ours).
pub(crate) const TABLE: u64 = 256;
/// Phases: before the commit, after it, rolling back.
pub(crate) const NPHASES: usize = 3;
/// Bytes per table entry.
pub(crate) const ENTRY_LEN: u64 = 8 * (1 + NPHASES as u64);
/// Sites one bank's table holds.
pub(crate) const MAX_SITES: usize = ((SEEN - TABLE) / 2 / ENTRY_LEN) as usize;
/// The threads' trap records, one u64 per slot (thread `tid` at slot `tid % NSEEN`): at each
/// trap of ours the handler stores `tid << 32 | epoch` (see [`EPOCH`]). A slot shared by two
/// threads holds the last one's: the other's record is lost, never forged.
pub(crate) const SEEN: u64 = AREA_LEN - 3 * PAGE;
/// The sync agent's page (its words, the context of the thread that starts it, its stack).
pub(crate) const AGENT: u64 = AREA_LEN - 2 * PAGE;
/// Slots of [`SEEN`] (a power of two).
pub(crate) const NSEEN: u64 = PAGE / 8;
/// Set in a destination (bit 63: never in a user address): the site is a direct `call`, and
/// the handler does what it would have done — push the return address (the site + 5) — before
/// sending the thread to the destination (the callee's own destination for the phase, so that
/// a call through a switched call site traps once, not at the call and again at the callee).
pub(crate) const CALL: u64 = 1 << 63;
/// Bytes of one bank's table.
pub(crate) const BANK_LEN: u64 = MAX_SITES as u64 * ENTRY_LEN;

/// Offset of the saved RIP in a `ucontext_t` on x86-64: uc_flags (8) + uc_link (8) +
/// uc_stack (24) = 40, then `gregs[REG_RIP]` with REG_RIP = 16: 40 + 16 * 8 = 168.
pub(crate) const UC_RIP: i32 = 168;
/// Offset of the saved RSP (`gregs[REG_RSP]`, REG_RSP = 15): 40 + 15 * 8.
pub(crate) const UC_RSP: i32 = 160;
/// Offset of `si_code` in a `siginfo_t`.
const SI_CODE: i32 = 8;
/// `si_code` of a trap raised by the kernel (an `int3`: do_int3_user → force_sig).
const SI_KERNEL: i32 = 0x80;
const SA_NODEFER: i32 = 0x4000_0000;
const SIGTRAP: u32 = 5;

/// The handler and the restorer for an area whose code page is at `code` (data at
/// `code + PAGE`): (handler bytes, restorer bytes).
pub(crate) fn generate(code: u64) -> Result<(Vec<u8>, Vec<u8>), IcedError> {
    let data = code + PAGE;
    let mut a = CodeAssembler::new(64)?;
    let mut look = a.create_label();
    let mut found = a.create_label();
    let mut set_rip = a.create_label();
    let mut chain = a.create_label();
    let mut not_ign = a.create_label();
    let mut jump = a.create_label();
    let mut dfl = a.create_label();
    let mut leave = a.create_label();

    // rdi = signal, rsi = siginfo, rdx = ucontext (SA_SIGINFO).
    a.mov(r11, data)?;
    a.lock().inc(qword_ptr(r11 + INSIDE))?;
    // Only a trap raised by the kernel can be one of our int3s; a SIGTRAP sent by kill,
    // tgkill or raise is never ours, whatever rip is.
    a.cmp(dword_ptr(rsi + SI_CODE), SI_KERNEL)?;
    a.jne(chain)?;
    a.mov(rax, qword_ptr(rdx + UC_RIP))?;
    a.dec(rax)?;
    a.movzx(r10d, byte_ptr(r11 + BANK))?;
    a.movzx(ecx, byte_ptr(r11 + r10 + PHASE))?;
    a.mov(r9, qword_ptr(r11 + r10 * 8 + NSITES))?;
    a.imul_3(r10, r10, BANK_LEN as i32)?;
    a.lea(r8, qword_ptr(r11 + r10 + TABLE))?;
    a.set_label(&mut look)?;
    a.test(r9, r9)?;
    a.jz(chain)?;
    a.cmp(rax, qword_ptr(r8))?;
    a.je(found)?;
    a.add(r8, ENTRY_LEN as i32)?;
    a.dec(r9)?;
    a.jmp(look)?;
    a.set_label(&mut found)?;
    a.mov(r9, qword_ptr(r8 + rcx * 8 + 8))?;
    a.test(r9, r9)?;
    a.jz(chain)?;
    // Ours. The thread's record: its tid and the epoch (the tool's evidence that this thread,
    // in the context that trapped, stood on a site's first byte after the epoch was set).
    a.mov(r10, rax)?; // the site
    a.mov(eax, libc::SYS_gettid as u32)?;
    a.syscall()?; // clobbers rcx and r11
    a.mov(r11, data)?;
    a.mov(ecx, eax)?;
    a.and(ecx, (NSEEN - 1) as u32)?;
    a.shl(rax, 32)?;
    a.or(rax, qword_ptr(r11 + EPOCH))?;
    a.mov(qword_ptr(r11 + rcx * 8 + SEEN), rax)?;
    // A direct call: push its return address as the call would have (below the interrupted
    // rsp: the red zone, which a call overwrites too; our frame lies below the red zone).
    a.btr(r9, 63)?;
    a.jnc(set_rip)?;
    a.mov(rax, qword_ptr(rdx + UC_RSP))?;
    a.sub(rax, 8)?;
    a.lea(rcx, qword_ptr(r10 + 5))?;
    a.mov(qword_ptr(rax), rcx)?;
    a.mov(qword_ptr(rdx + UC_RSP), rax)?;
    a.set_label(&mut set_rip)?;
    a.mov(qword_ptr(rdx + UC_RIP), r9)?;
    a.lock().inc(qword_ptr(r11 + HITS))?;
    a.lock().dec(qword_ptr(r11 + INSIDE))?;
    a.ret()?;

    // Not ours: behave as the previous action would have.
    a.set_label(&mut chain)?;
    a.mov(rax, qword_ptr(r11 + OLD_ACT))?;
    a.cmp(rax, 1)?; // SIG_IGN
    a.jne(not_ign)?;
    // Ignored: a sent SIGTRAP is dropped; a trap raised by the kernel under SIG_IGN makes
    // the kernel reset the action to SIG_DFL and kill (force_sig_info_to_task): the same.
    a.cmp(dword_ptr(rsi + SI_CODE), SI_KERNEL)?;
    a.jne(leave)?;
    a.xor(eax, eax)?;
    a.set_label(&mut not_ign)?;
    a.test(rax, rax)?; // SIG_DFL
    a.jz(dfl)?;
    // A handler function: run it with the signal mask the kernel would have set for it
    // (ours has SA_NODEFER; without it in the old flags, SIGTRAP is blocked in its handler).
    a.test(qword_ptr(r11 + (OLD_ACT + 8)), SA_NODEFER)?;
    a.jnz(jump)?;
    a.push(rdi)?;
    a.push(rsi)?;
    a.push(rdx)?;
    a.push(rax)?;
    a.mov(eax, libc::SYS_rt_sigprocmask as u32)?;
    a.mov(edi, libc::SIG_BLOCK as u32)?;
    a.lea(rsi, qword_ptr(r11 + TRAP_SET))?;
    a.xor(edx, edx)?;
    a.mov(r10d, 8u32)?;
    a.syscall()?;
    a.pop(rax)?;
    a.pop(rdx)?;
    a.pop(rsi)?;
    a.pop(rdi)?;
    a.mov(r11, data)?; // syscall clobbered it
    a.set_label(&mut jump)?;
    a.lock().dec(qword_ptr(r11 + INSIDE))?;
    // Same arguments, same return address (the restorer), and rax = 0 as the kernel leaves
    // it for a handler (a variadic or unprototyped handler reads al).
    a.xor(eax, eax)?;
    a.jmp(qword_ptr(r11 + OLD_ACT))?;

    // SIG_DFL: reset SIGTRAP to SIG_DFL and re-raise it on this thread: the process dies of
    // SIGTRAP exactly as it would have.
    a.set_label(&mut dfl)?;
    a.mov(eax, libc::SYS_rt_sigaction as u32)?;
    a.mov(edi, SIGTRAP)?;
    a.lea(rsi, qword_ptr(r11 + DFL_ACT))?;
    a.xor(edx, edx)?;
    a.mov(r10d, 8u32)?;
    a.syscall()?;
    a.mov(eax, libc::SYS_getpid as u32)?;
    a.syscall()?;
    a.mov(r8, rax)?;
    a.mov(eax, libc::SYS_gettid as u32)?;
    a.syscall()?;
    a.mov(esi, eax)?;
    a.mov(edi, r8d)?;
    a.mov(edx, SIGTRAP)?;
    a.mov(eax, libc::SYS_tgkill as u32)?;
    a.syscall()?;
    a.mov(r11, data)?;
    a.set_label(&mut leave)?;
    a.lock().dec(qword_ptr(r11 + INSIDE))?;
    a.ret()?;
    let handler = a.assemble(code)?;
    assert!(
        (handler.len() as u64) < RESTORER_OFF,
        "handler overlaps the restorer"
    );

    let mut r = CodeAssembler::new(64)?;
    r.mov(eax, libc::SYS_rt_sigreturn as u32)?;
    r.syscall()?;
    let restorer = r.assemble(code + RESTORER_OFF)?;
    Ok((handler, restorer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

    fn decode(bytes: &[u8], ip: u64) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let mut out = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            assert!(!i.is_invalid(), "invalid instruction at {:#x}", i.ip());
            out.push(i);
        }
        out
    }

    /// The handler run for real, in this process, on a trap it receives as the kernel would
    /// hand it over (siginfo with SI_KERNEL, a ucontext with the rip after the int3).
    #[test]
    fn handler_redirects_records_the_thread_and_makes_a_direct_call() {
        let len = AREA_LEN as usize;
        // SAFETY: a fresh anonymous mapping of our own, unmapped at the end of the test.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let code = base as u64;
        let (handler, _) = generate(code).unwrap();
        let word = |off: u64| (code + PAGE + off) as *mut u64;
        let (site, a, b, c) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        // SAFETY: every pointer below is inside the mapping (code page, then data pages).
        unsafe {
            std::ptr::copy_nonoverlapping(handler.as_ptr(), base as *mut u8, handler.len());
            assert_eq!(
                libc::mprotect(base, PAGE as usize, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
            *word(NSITES) = 1;
            for (i, v) in [site, a, b | CALL, c].into_iter().enumerate() {
                *word(TABLE + 8 * i as u64) = v;
            }
            *word(EPOCH) = 7;
        }
        // SAFETY: the handler follows the C calling convention of a SA_SIGINFO handler and
        // touches only its arguments, its area and the stack word below the saved rsp.
        let run: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::ucontext_t) =
            unsafe { std::mem::transmute(base) };
        let mut stack = [0u64; 4];
        let top = stack.as_mut_ptr() as u64 + 24;
        let trap = |phase: u8| {
            // SAFETY: plain old data, all-zero is valid; the phase byte is in the data page.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
            unsafe { *(code as *mut u8).add((PAGE + PHASE) as usize) = phase };
            info.si_code = SI_KERNEL;
            uc.uc_mcontext.gregs[libc::REG_RIP as usize] = site as i64 + 1;
            uc.uc_mcontext.gregs[libc::REG_RSP as usize] = top as i64;
            run(libc::SIGTRAP, &mut info, &mut uc);
            let g = uc.uc_mcontext.gregs;
            (
                g[libc::REG_RIP as usize] as u64,
                g[libc::REG_RSP as usize] as u64,
            )
        };
        // Phase 0: a plain redirect.
        assert_eq!(trap(0), (a, top));
        // Phase 1: a direct call made by the handler: the return address (site + 5) pushed.
        assert_eq!(trap(1), (b, top - 8));
        assert_eq!(stack[2], site + 5);
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u64;
        // SAFETY: inside the mapping.
        unsafe {
            assert_eq!(*word(SEEN + tid % NSEEN * 8), tid << 32 | 7);
            assert_eq!(*word(HITS), 2);
            assert_eq!(*word(INSIDE), 0);
            libc::munmap(base, len);
        }
    }

    #[test]
    fn ucontext_rip_offset_matches_libc() {
        // SAFETY: ucontext_t is plain old data; all-zero is a valid value.
        let ucontext: libc::ucontext_t = unsafe { std::mem::zeroed() };
        let base = &ucontext as *const _ as usize;
        let rip = &ucontext.uc_mcontext.gregs[libc::REG_RIP as usize] as *const _ as usize;
        assert_eq!(rip - base, UC_RIP as usize);
        let saved_sp = &ucontext.uc_mcontext.gregs[libc::REG_RSP as usize] as *const _ as usize;
        assert_eq!(saved_sp - base, UC_RSP as usize);
        // SAFETY: as above, for siginfo_t.
        let info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let code = &info.si_code as *const _ as usize - &info as *const _ as usize;
        assert_eq!(code, SI_CODE as usize);
    }

    #[test]
    fn handler_reads_and_writes_the_saved_rip_and_uses_only_its_data_page() {
        let code = 0x7000_0000_0000;
        let (h, r) = generate(code).unwrap();
        let insns = decode(&h, code);
        // The data pages' address is loaded, and every access through r11 stays in them.
        assert!(insns.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.op0_register() == Register::R11
            && i.op1_kind() == OpKind::Immediate64
            && i.immediate64() == code + PAGE));
        for i in &insns {
            if i.op_count() > 0
                && (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory)
                && i.memory_base() == Register::R11
            {
                assert!(i.memory_displacement64() < AREA_LEN - PAGE, "{i:?}");
            }
        }
        // rip is read from and written to the ucontext (rdx + 168).
        let in_uc = |i: &Instruction| {
            i.memory_base() == Register::RDX && i.memory_displacement64() == UC_RIP as u64
        };
        assert!(insns.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.op0_register() == Register::RAX
            && in_uc(i)));
        assert!(insns
            .iter()
            .any(|i| i.mnemonic() == Mnemonic::Mov && i.op0_kind() == OpKind::Memory && in_uc(i)));
        // The entry counter is incremented once and decremented on every way out.
        let lock_inc = insns
            .iter()
            .filter(|i| i.has_lock_prefix() && i.mnemonic() == Mnemonic::Inc)
            .count();
        let lock_dec = insns
            .iter()
            .filter(|i| i.has_lock_prefix() && i.mnemonic() == Mnemonic::Dec)
            .count();
        let chains: Vec<usize> = insns
            .iter()
            .enumerate()
            .filter(|(_, i)| i.mnemonic() == Mnemonic::Jmp && i.op0_kind() != OpKind::NearBranch64)
            .map(|(n, _)| n)
            .collect();
        let exits = insns
            .iter()
            .filter(|i| i.mnemonic() == Mnemonic::Ret)
            .count()
            + chains.len();
        assert_eq!(lock_inc, 2, "entry + hits");
        assert_eq!(lock_dec, exits);
        // The chain to the previous handler: rax = 0 (as the kernel gives a handler), then a
        // jump through the saved action's handler word, not through a register.
        assert_eq!(chains.len(), 1);
        let jmp = &insns[chains[0]];
        assert_eq!(jmp.op0_kind(), OpKind::Memory);
        assert_eq!(jmp.memory_base(), Register::R11);
        assert_eq!(jmp.memory_displacement64(), OLD_ACT);
        let before = &insns[chains[0] - 1];
        assert_eq!(before.mnemonic(), Mnemonic::Xor);
        assert_eq!(before.op0_register(), Register::EAX);
        assert_eq!(before.op1_register(), Register::EAX);
        // The restorer is rt_sigreturn.
        let r = decode(&r, code + RESTORER_OFF);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].immediate32(), libc::SYS_rt_sigreturn as u32);
        assert_eq!(r[1].mnemonic(), Mnemonic::Syscall);
    }
}

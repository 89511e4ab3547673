//! The resume stub: a small area of ours inside the target through which every system call and
//! function call we run on a borrowed thread passes, so that a tool killed in the middle
//! (SIGKILL, the OOM killer, a CI timeout) leaves the thread resuming its own code with its own
//! registers instead of running on from our `syscall` with ours (review session 3, R2: the
//! whole target died of SIGSEGV).
//!
//! The tool writes the thread's own context into a slot of the area before it changes any
//! register, and points the thread at the slot's code:
//! - a system call: `syscall`, then code that reloads every general register, the flags and
//!   the stack pointer from the slot and jumps to the saved rip;
//! - a function call returns to `mov rdi, rax; mov eax, getpid; syscall`, then `xrstor` of the
//!   saved extended state, then the same reload.
//!
//! Normally the tool stops the thread at that `syscall` (a syscall stop, as for any remote
//! system call) and puts the registers back itself: the reload code never runs. When the tool
//! is gone, the kernel lets the thread go and it runs the reload: its own context again. A
//! call of its own that our stop interrupted (rax -ERESTART*) is restarted, exactly as the
//! kernel restarts it when no signal handler runs: the slot holds the context already
//! adjusted for the restart. (Signals that arrived while the tool held the thread were
//! held back by the tool and die with it.)
//!
//! The area is one anonymous private mapping, read+execute for the target (the tool writes it
//! through /proc/PID/mem), found again by later invocations through its magic bytes. It is
//! created by the first remote system call of the first invocation on a process, which
//! cannot itself be guarded (nothing of ours exists yet): that single `mmap` is the only
//! remote call in a process's life whose interruption by a killed tool is fatal.
//!
//! Slots: a thread orphaned by a killed tool still reads its slot until it has reloaded its
//! context: while it finishes our system call (none of ours blocks for long: mmap, mprotect,
//! munmap, memfd_create, ftruncate, close, rt_sigaction, membarrier) or our function call. Each
//! invocation takes the slot after the previous one's (a counter in the area), so that slot is
//! rewritten only after eight more invocations. (Checking each thread's /proc/PID/task/TID/
//! syscall instead costs a file read per thread on every invocation.) A slot is also marked
//! busy while its invocation runs, and a mark a killed tool left is honoured until every slot is
//! marked; then the threads' positions decide (an orphan that cannot run — its process stopped
//! or frozen — stays in its slot for as long as that lasts).

use super::error::Result;
use super::mem::Memory;
use super::ptrace::Regs;

/// Size of the area: one code page, then the slots' data.
pub const AREA_LEN: u64 = PAGE + SLOTS as u64 * SLOT_DATA;
const PAGE: u64 = 4096;
const MAGIC: &[u8; 16] = b"livepatch-stub1\0";
/// Offset of the slot counter (u64) in the code page: the slot last taken.
const COUNTER: u64 = 16;
/// Offset of the busy mask (u64, right after the counter): bit i is set while an invocation
/// uses slot i and cleared when it lets the threads go; a killed tool leaves its bit set.
const BUSY: u64 = 24;
/// First slot's code.
const CODE_START: u64 = 64;
const SLOTS: usize = 8;
/// Code bytes per slot.
const SLOT_CODE: u64 = 256;
/// Where the call-return path starts in a slot's code.
const CALL_RETURN: u64 = 160;
/// Data bytes per slot: the registers, then the extended state (64-byte aligned for xrstor).
const SLOT_DATA: u64 = 3 * PAGE;
const XSTATE_OFF: u64 = 256;
/// Largest extended state a slot holds.
pub const XSTATE_MAX: usize = (SLOT_DATA - XSTATE_OFF) as usize;
/// Bytes below the saved stack pointer the reload code pushes the flags to: past the red zone.
const FLAGS_GAP: i32 = 256;

/// The general registers in the order of a slot's data (u64 each), then rsp, rip, rflags.
const GPRS: [u8; 15] = [
    0,  // rax
    3,  // rbx
    1,  // rcx
    2,  // rdx
    6,  // rsi
    7,  // rdi
    5,  // rbp
    8,  // r8
    9,  // r9
    10, // r10
    11, // r11
    12, // r12
    13, // r13
    14, // r14
    15, // r15
];
const RSP_AT: u64 = 15 * 8;
const RIP_AT: u64 = 16 * 8;
const FLAGS_AT: u64 = 17 * 8;

/// One slot of the area, taken by this invocation.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    area: u64,
    index: u64,
}

impl Slot {
    /// The area the slot belongs to.
    pub fn area(&self) -> u64 {
        self.area
    }

    fn code(&self) -> u64 {
        self.area + CODE_START + self.index * SLOT_CODE
    }

    fn data(&self) -> u64 {
        self.area + PAGE + self.index * SLOT_DATA
    }

    /// The `syscall` instruction a remote system call runs.
    pub fn syscall_insn(&self) -> u64 {
        self.code()
    }

    /// The return address of a remote function call.
    pub fn call_return(&self) -> u64 {
        self.code() + CALL_RETURN
    }

    /// The rip of the syscall stops of the call-return path's `syscall`.
    pub fn call_return_stop(&self) -> u64 {
        self.call_return() + CALL_RETURN_SYSCALL_END
    }

    /// Records `own`, the borrowed thread's context, as the one it resumes should the tool
    /// die before it restored the registers itself.
    pub fn guard(&self, mem: &Memory, own: &Regs) -> Result<()> {
        let r = resume_context(own);
        let values = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15, r.rsp, r.rip, r.eflags,
        ];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        mem.write(self.data(), &bytes)
    }

    /// Records the thread's extended state (a function call clobbers it), as the kernel gave
    /// it (the XSAVE standard format `xrstor` reads). Fails when it does not fit.
    pub fn guard_xstate(&self, mem: &Memory, xstate: &[u8]) -> Result<bool> {
        if xstate.len() > XSTATE_MAX {
            return Ok(false);
        }
        mem.write(self.data() + XSTATE_OFF, xstate)?;
        Ok(true)
    }
}

/// The context a thread resumes from the slot: `own`, with an interrupted system call of its
/// own set up to be restarted as the kernel does when it delivers no signal
/// (arch_do_signal_or_restart): the call's number back in rax, rip on its `syscall` again.
pub fn resume_context(own: &Regs) -> Regs {
    const ERESTARTSYS: i64 = -512;
    const ERESTARTNOINTR: i64 = -513;
    const ERESTARTNOHAND: i64 = -514;
    const ERESTART_RESTARTBLOCK: i64 = -516;
    let mut r = *own;
    if (own.orig_rax as i64) < 0 {
        return r;
    }
    match own.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = own.orig_rax;
            r.rip = own.rip.wrapping_sub(2);
        }
        ERESTART_RESTARTBLOCK => {
            r.rax = libc::SYS_restart_syscall as u64;
            r.rip = own.rip.wrapping_sub(2);
        }
        _ => {}
    }
    r
}

/// Whether the mapping at `addr` (anonymous, `AREA_LEN` long, r-x) is an area of ours.
pub fn is_area(mem: &Memory, addr: u64) -> bool {
    mem.read_vec(addr, MAGIC.len()).is_ok_and(|b| b == MAGIC)
}

/// An existing area of ours in process `pid`.
pub fn locate(pid: i32, mem: &Memory) -> Option<u64> {
    // Read once while we trace `pid` (only a tracer maps or unmaps the area).
    let maps = super::maps_text::ours(pid).ok()?;
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?;
        // Anonymous: offset, device, inode and no path.
        if perms != "r-xp" || fields.nth(3).is_some() {
            return None;
        }
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        (end - start == AREA_LEN && is_area(mem, start)).then_some(start)
    })
}

/// Takes the first free slot after the one the previous invocation took, and marks it busy.
/// When a killed tool left every slot marked, the marks are recomputed from where the threads
/// of `pid` that do not run are (an orphan that never ran — its process stopped, frozen —
/// still sits in its slot: review session 4, S4).
pub fn take_slot(pid: i32, mem: &Memory, area: u64) -> Result<Slot> {
    let mut words = [0u8; 16];
    mem.read(area + COUNTER, &mut words)?;
    let last = u64::from_le_bytes(words[..8].try_into().unwrap()) % SLOTS as u64;
    let mut busy = u64::from_le_bytes(words[8..].try_into().unwrap());
    let free = |busy: u64| {
        (1..=SLOTS as u64)
            .map(|i| (last + i) % SLOTS as u64)
            .find(|i| busy & (1 << i) == 0)
    };
    let index = match free(busy) {
        Some(i) => i,
        None => {
            busy = slots_in_use(pid, area);
            free(busy).unwrap_or((last + 1) % SLOTS as u64)
        }
    };
    busy |= 1 << index;
    words[..8].copy_from_slice(&index.to_le_bytes());
    words[8..].copy_from_slice(&busy.to_le_bytes());
    mem.write(area + COUNTER, &words)?;
    Ok(Slot { area, index })
}

/// Clears `slot`'s busy mark: its invocation is letting the threads go, none of them is left
/// in the slot.
pub fn release(mem: &Memory, slot: Slot) -> Result<()> {
    let busy = mem.read_u64(slot.area + BUSY)? & !(1 << slot.index);
    mem.write(slot.area + BUSY, &busy.to_le_bytes())
}

/// The slots whose code a thread of `pid` that is not running (blocked, stopped) is in.
fn slots_in_use(pid: i32, area: u64) -> u64 {
    let mut used = 0;
    for tid in super::observe::tasks(pid) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")) else {
            continue;
        };
        // "NR args... SP PC", or "-1 SP PC" when not in a system call; "running" otherwise.
        let Some(pc) = text
            .split_whitespace()
            .last()
            .and_then(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
        else {
            continue;
        };
        if pc >= area + CODE_START && pc < area + CODE_START + SLOTS as u64 * SLOT_CODE {
            used |= 1 << ((pc - area - CODE_START) / SLOT_CODE);
        }
    }
    used
}

/// Writes a fresh area's code at `area` (just mapped) and takes its first slot.
pub fn install(mem: &Memory, area: u64) -> Result<Slot> {
    let mut page = code_page(area);
    page[BUSY as usize..BUSY as usize + 8].copy_from_slice(&1u64.to_le_bytes());
    mem.write(area, &page)?;
    Ok(Slot { area, index: 0 })
}

/// The code page of an area at `area`: magic, counter (0), then every slot's code.
fn code_page(area: u64) -> Vec<u8> {
    let mut page = vec![0xcc; PAGE as usize];
    page[..MAGIC.len()].copy_from_slice(MAGIC);
    page[COUNTER as usize..COUNTER as usize + 8].fill(0);
    for index in 0..SLOTS as u64 {
        let slot = Slot { area, index };
        let at = (CODE_START + index * SLOT_CODE) as usize;
        let code = slot_code(&slot);
        page[at..at + code.len()].copy_from_slice(&code);
    }
    page
}

/// `mov eax, SYS_getpid; syscall` lengths before the call-return path's syscall ends.
const CALL_RETURN_SYSCALL_END: u64 = 3 + 5 + 2;

/// A slot's code (hand-encoded: nothing here may need iced's tables, which are built lazily
/// under a lock — see review R4 — and the bytes are checked by decoding in the tests).
fn slot_code(slot: &Slot) -> Vec<u8> {
    let base = slot.code();
    let data = slot.data();
    let mut c = Code {
        bytes: Vec::new(),
        base,
    };
    // System call path: the syscall, then the reload.
    c.raw(&[0x0f, 0x05]);
    let reload = c.here();
    c.reload(data);
    assert!(
        c.bytes.len() as u64 <= CALL_RETURN,
        "reload overlaps the call return"
    );
    c.bytes.resize(CALL_RETURN as usize, 0xcc);
    // Function call path: the callee's result where the tool reads it, a system call for
    // the tool to stop at, then the extended state and the reload.
    c.raw(&[0x48, 0x89, 0xc7]); // mov rdi, rax
    c.raw(&[0xb8]); // mov eax, imm32
    c.raw(&(libc::SYS_getpid as u32).to_le_bytes());
    c.raw(&[0x0f, 0x05]);
    debug_assert_eq!(c.here(), base + CALL_RETURN + CALL_RETURN_SYSCALL_END);
    c.raw(&[0xb8, 0xff, 0xff, 0xff, 0xff]); // mov eax, -1
    c.raw(&[0xba, 0xff, 0xff, 0xff, 0xff]); // mov edx, -1
    c.rip_rel(&[0x48, 0x0f, 0xae, 0x2d], data + XSTATE_OFF); // xrstor64 [rip+x]
    let rel = reload as i64 - (c.here() as i64 + 5);
    c.raw(&[0xe9]);
    c.raw(&(rel as i32).to_le_bytes()); // jmp reload
    assert!(c.bytes.len() as u64 <= SLOT_CODE, "slot code too long");
    c.bytes
}

struct Code {
    bytes: Vec<u8>,
    base: u64,
}

impl Code {
    fn here(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }

    fn raw(&mut self, b: &[u8]) {
        self.bytes.extend_from_slice(b);
    }

    /// An instruction whose last 4 bytes are a rip-relative displacement to `target`.
    fn rip_rel(&mut self, prefix: &[u8], target: u64) {
        let end = self.here() + prefix.len() as u64 + 4;
        let disp = target as i64 - end as i64;
        self.raw(prefix);
        self.raw(&(disp as i32).to_le_bytes());
    }

    /// `mov reg64, [rip+x]` (reg numbered as in the encoding: 0 rax ... 15 r15).
    fn load(&mut self, reg: u8, target: u64) {
        let rex = 0x48 | if reg >= 8 { 0x04 } else { 0 };
        self.rip_rel(&[rex, 0x8b, ((reg & 7) << 3) | 0b101], target);
    }

    /// Reloads the context of slot data `data`: flags (pushed below the saved stack pointer,
    /// past its red zone), then the general registers, the stack pointer last but one, and
    /// jumps to the saved rip. Nothing after `popfq` changes the flags.
    fn reload(&mut self, data: u64) {
        self.load(4, data + RSP_AT); // mov rsp, [saved rsp]
        let gap = (-FLAGS_GAP).to_le_bytes();
        self.raw(&[0x48, 0x8d, 0xa4, 0x24]); // lea rsp, [rsp - gap]
        self.raw(&gap);
        self.rip_rel(&[0xff, 0x35], data + FLAGS_AT); // push qword [saved rflags]
        self.raw(&[0x9d]); // popfq
        self.raw(&[0x48, 0x8d, 0xa4, 0x24]); // lea rsp, [rsp + gap]
        self.raw(&FLAGS_GAP.to_le_bytes());
        for (i, &reg) in GPRS.iter().enumerate() {
            self.load(reg, data + i as u64 * 8);
        }
        self.rip_rel(&[0xff, 0x25], data + RIP_AT); // jmp [saved rip]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

    /// (mnemonic, first operand register, rip-relative address or immediate/displacement).
    fn listing(bytes: &[u8], ip: u64) -> Vec<(Mnemonic, Register, u64)> {
        let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let mut out = Vec::new();
        let mut insn = Instruction::default();
        while d.can_decode() {
            d.decode_out(&mut insn);
            let reg = if insn.op_count() > 0 && insn.op0_kind() == OpKind::Register {
                insn.op0_register()
            } else {
                Register::None
            };
            let value = if insn.is_ip_rel_memory_operand() {
                insn.ip_rel_memory_address()
            } else if insn.op_count() > 1 && insn.op1_kind() == OpKind::Memory {
                insn.memory_displacement64()
            } else if insn.op_count() > 1 && insn.op1_kind() == OpKind::Immediate32 {
                insn.immediate32() as u64
            } else if insn.op_count() > 0 && insn.op0_kind() == OpKind::NearBranch64 {
                insn.near_branch64()
            } else {
                0
            };
            out.push((insn.mnemonic(), reg, value));
            if insn.mnemonic() == Mnemonic::Jmp {
                break;
            }
        }
        out
    }

    #[test]
    fn the_slot_code_reloads_every_register_from_its_data() {
        use Mnemonic::*;
        let area = 0x7f00_0000_0000;
        let slot = Slot { area, index: 3 };
        let code = slot_code(&slot);
        let data = slot.data();
        let sys = listing(&code, slot.code());
        assert_eq!(sys[0].0, Syscall);
        assert_eq!(sys[1], (Mov, Register::RSP, data + RSP_AT));
        assert_eq!(sys[2], (Lea, Register::RSP, (-256i64) as u64));
        assert_eq!(sys[3], (Push, Register::None, data + FLAGS_AT));
        assert_eq!(sys[4].0, Popfq);
        assert_eq!(sys[5], (Lea, Register::RSP, 256));
        let regs = [
            Register::RAX,
            Register::RBX,
            Register::RCX,
            Register::RDX,
            Register::RSI,
            Register::RDI,
            Register::RBP,
            Register::R8,
            Register::R9,
            Register::R10,
            Register::R11,
            Register::R12,
            Register::R13,
            Register::R14,
            Register::R15,
        ];
        for (i, r) in regs.iter().enumerate() {
            assert_eq!(sys[6 + i], (Mov, *r, data + i as u64 * 8), "register {r:?}");
        }
        assert_eq!(sys[21], (Jmp, Register::None, data + RIP_AT));
        assert_eq!(sys.len(), 22);

        let off = CALL_RETURN as usize;
        let call = listing(&code[off..], slot.call_return());
        assert_eq!(call[0], (Mov, Register::RDI, 0));
        assert_eq!(call[1], (Mov, Register::EAX, libc::SYS_getpid as u64));
        assert_eq!(call[2].0, Syscall);
        assert_eq!(call[3], (Mov, Register::EAX, u32::MAX as u64));
        assert_eq!(call[4], (Mov, Register::EDX, u32::MAX as u64));
        assert_eq!(call[5], (Xrstor64, Register::None, data + XSTATE_OFF));
        assert_eq!(call[6], (Jmp, Register::None, slot.code() + 2));
        assert_eq!(
            (data + XSTATE_OFF) % 64,
            0,
            "xrstor needs 64-byte alignment"
        );
    }

    /// Review session 4, S4: a slot a killed tool left marked (its thread may still have to
    /// reload its context from it) is not taken again while another slot is free, however many
    /// invocations come and go; when every slot is marked, the marks no thread backs are
    /// dropped. Run on a scratch page of a real process (`sleep`), whose threads are nowhere
    /// near it.
    #[test]
    fn a_slot_left_marked_is_not_reused_while_another_is_free() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let pid = child.id() as i32;
        let mem = Memory::open(pid).expect("open memory");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let stack = maps.lines().find(|l| l.ends_with("[stack]")).unwrap();
        let area = u64::from_str_radix(stack.split('-').next().unwrap(), 16).unwrap();
        mem.write(area + COUNTER, &[0; 16]).unwrap();
        // A killed invocation: its slot stays marked.
        let orphaned = take_slot(pid, &mem, area).unwrap();
        for _ in 0..3 * SLOTS {
            let s = take_slot(pid, &mem, area).unwrap();
            assert_ne!(s.index, orphaned.index);
            release(&mem, s).unwrap();
        }
        // Seven more killed ones: every slot marked, none backed by a thread: all free again.
        let taken: Vec<u64> = (1..SLOTS)
            .map(|_| take_slot(pid, &mem, area).unwrap().index)
            .collect();
        assert!(!taken.contains(&orphaned.index));
        assert_eq!(mem.read_u64(area + BUSY).unwrap(), (1 << SLOTS) - 1);
        take_slot(pid, &mem, area).unwrap();
        assert_eq!(mem.read_u64(area + BUSY).unwrap().count_ones(), 1);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn the_call_return_stop_is_after_its_syscall() {
        let slot = Slot {
            area: 0x10000,
            index: 1,
        };
        let code = slot_code(&slot);
        let stop = (slot.call_return_stop() - slot.code()) as usize;
        assert_eq!(code[stop - 2..stop], [0x0f, 0x05]);
    }

    #[test]
    fn an_interrupted_call_is_set_up_for_its_restart() {
        // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
        let mut own: Regs = unsafe { std::mem::zeroed() };
        own.orig_rax = libc::SYS_read as u64;
        own.rip = 0x1002;
        for (rax, want_rax) in [
            (-512i64, libc::SYS_read as u64),
            (-513, libc::SYS_read as u64),
            (-514, libc::SYS_read as u64),
            (-516, libc::SYS_restart_syscall as u64),
        ] {
            own.rax = rax as u64;
            let r = resume_context(&own);
            assert_eq!((r.rax, r.rip), (want_rax, 0x1000), "rax {rax}");
        }
        own.rax = -4i64 as u64; // EINTR: the call is over, nothing to restart
        assert_eq!(resume_context(&own).rip, 0x1002);
        own.orig_rax = u64::MAX; // not in a system call
        own.rax = -512i64 as u64;
        assert_eq!(resume_context(&own).rax, -512i64 as u64);
    }
}

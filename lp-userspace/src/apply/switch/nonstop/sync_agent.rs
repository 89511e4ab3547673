//! The sync agent: a thread of ours inside the target that runs nonstop mode's syncs
//! (`membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`) on request, for the few milliseconds of a switch
//! (and, in an apply, of its preparation before: the patch memory's mmap and mprotects, see
//! `nonstop::Early`).
//!
//! Why. A sync run on the borrowed thread through ptrace is two round trips (syscall-entry and
//! syscall-exit stop), each waiting until that ordinary thread gets a CPU back — behind the
//! target's threads, which trap on our int3s meanwhile: 40 µs to over 1 ms per sync, three syncs
//! per switch, all inside the int3 window. The agent waits on a futex in the trap area's memfd,
//! which the tool maps too (a shared futex: both sides name the same file page); the tool
//! writes a request word and wakes it, the agent runs the membarrier, publishes the result and
//! wakes the tool: one wake-up each way. The agent runs under SCHED_FIFO (set by the tool;
//! without the privilege it stays an ordinary thread), so it gets a CPU at once: behind the
//! target's trapping threads an ordinary agent waited up to 0.5 ms per sync (session 5), and
//! every µs of the window costs the calls that trap meanwhile. Each of its bursts preempts a
//! thread of the target for a few µs only: a membarrier and a futex wake per request. (The
//! tool's tracer thread runs real-time too since session 13: `process/realtime.rs`.)
//!
//! Started by the borrowed thread (stopped for us anyway), through a few instructions of ours
//! in the area's code page: with every signal blocked (the new thread inherits that mask: no
//! handler of the program ever runs on it — it shares the starting thread's TLS pointer and
//! has a stack of one page), `clone` (a thread of the process, sharing everything; its tid is
//! written to the agent's page and cleared by the kernel when it exits), then the starting
//! thread's own mask back. The tool sets both masks itself (PTRACE_SETSIGMASK), steps the
//! starting thread through the clone alone (two ptrace stops) and puts its own registers back
//! at the clone's exit stop, as after any remote system call. (The code's first
//! `rt_sigprocmask`, which blocks every signal and saves the mask, is what tools before
//! session 9 ran: an area's code never changes, see `open_area`.)
//!
//! It also carries out whole windows of the switch: programs of writes (through a
//! `/proc/self/mem` descriptor of its own, in a descriptor table of its own, procfs checked)
//! and syncs, queued by the tool in its page ([`SyncAgent::run`]).
//!
//! A tool killed at any point (`kill -9`) leaves nothing that outlives the next livepatch:
//! - the agent waits with a timeout ([`WAIT_TIMEOUT_NS`]); at each timeout it checks that the
//!   tool's process still exists (`kill(pid, 0)`; only when the target sees the tool's pid, i.e.
//!   shares its pid namespace) and exits when it does not, or when no request came for
//!   [`MAX_IDLE`] timeouts; it holds no lock, and its descriptor closes with it: its exit is
//!   the end of it. It is a thread of ours: no thread of the program ever changes its
//!   scheduling policy.
//! - a program it was given and had not finished when the tool died (the process stopped, say)
//!   would still be carried out when it runs again: so every livepatch, before it writes
//!   anything, cancels an orphaned agent's program and resolves an operation it had claimed
//!   ([`quiet_orphan`]; review 7, finding 1).
//! - the starting thread, if the tool dies while it starts the agent, goes back by itself: its
//!   rip is in our code only after its own mask and registers are in the agent's page, and
//!   only at the clone while every signal is blocked; from there it sets its own mask again,
//!   reloads its own registers (adjusted like the kernel does for a call interrupted without a
//!   handler: restarted) and goes on where it was.
//!
//! Any failure to start or to answer (no map_files access, clone refused, the agent gone or
//! silent for [`ANSWER_WAIT`]) only makes the switch fall back to the ptrace sync.

use crate::apply::switch::trap_handler as th;
use crate::process::ptrace::{self, Regs, WaitStatus};
use crate::process::seccomp::{self, Call};
use crate::process::Tracee;
use iced_x86::code_asm::*;
use lp_core::plan::Step;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

// Offsets in the agent's page.
/// Request sequence number (u32, futex word the agent waits on).
const REQ: u64 = 0;
/// Sequence number of the last request done (u32, futex word the tool waits on).
const DONE: u64 = 4;
/// What the request is: [`CMD_SYNC`] or [`CMD_QUIT`] (u32).
const CMD: u64 = 8;
/// The tool's pid as the target sees it, 0 when it cannot (u32).
const TOOL: u64 = 12;
/// The agent's tid (u32): written by clone (CLONE_PARENT_SETTID), cleared by the kernel and
/// woken when the agent exits (CLONE_CHILD_CLEARTID).
const TID: u64 = 16;
/// 1 while the agent's start-up registers the process for membarrier's SYNC_CORE (u32; see
/// [`assemble`]): the tool waits longer for a first answer meanwhile ([`SyncAgent::request`]).
const REGISTERING: u64 = 20;
/// The membarrier's result (u64).
const RESULT: u64 = 24;
/// The agent's futex timeout (struct timespec).
const TS: u64 = 32;
/// Every signal (u64 mask).
const ALL: u64 = 48;
/// The starting thread's own mask while it starts the agent (u64).
const OLD_MASK: u64 = 56;
/// The starting thread's own registers, for a start-up the tool does not finish: rax rbx rcx
/// rdx rsi rdi rbp r8..r15, then rip, rflags, rsp (u64 each).
const CTX: u64 = 64;
const CTX_RIP: i32 = 15 * 8;
const CTX_RFLAGS: i32 = 16 * 8;
const CTX_RSP: i32 = 17 * 8;
/// The agent's own descriptor of `/proc/self/mem` (i32), or the negative errno of its opening;
/// [`NO_FD`] until the agent has started.
const FD: u64 = 208;
/// Operations in the program (u32, see [`SyncAgent::run`]).
const NOPS: u64 = 212;
/// The next operation to claim (u32); bit 31 set by the tool: cancelled, claim no more.
const NEXT: u64 = 216;
/// Operations carried out so far (u32).
const COMPLETED: u64 = 220;
/// `/proc/self/mem`, NUL-terminated.
const PATH: u64 = 232;
/// The program: [`MAX_OPS`] operations of [`OP_LEN`] bytes (kind u32, length u32, address
/// u64, then up to 16 bytes of data — for a merged run, the u32 offset of its patch list in
/// [`DATA`] and the u32 number of patches).
const OPS: u64 = 256;
const OP_LEN: u64 = 32;
/// Operations a program holds.
pub(crate) const MAX_OPS: usize = 48;
/// The merged runs' patch lists (each patch: u16 offset in the run, u8 length, a pad byte,
/// then its bytes; each list 8-aligned).
const DATA: u64 = OPS + MAX_OPS as u64 * OP_LEN;
const DATA_LEN: u64 = 896;
/// Where the agent's fstatfs writes (`struct statfs`, 120 bytes on x86-64).
const STATFS: u64 = DATA + DATA_LEN;
const STATFS_LEN: u64 = 128;
/// The agent's buffer for a merged run (read, patched, written back); then 512 bytes of stack
/// up to the page's end.
const BUF: u64 = STATFS + STATFS_LEN;
/// The longest run of sites written as one (see [`Op::Merge`]).
pub(crate) const MAX_RUN: usize = 768;
const _: () = assert!(BUF + MAX_RUN as u64 + 512 <= th::PAGE);
const PROC_SUPER_MAGIC: i32 = 0x9fa0;
const OP_WRITE: u32 = 1;
const OP_SYNC: u32 = 2;
const OP_MERGE: u32 = 3;
const OP_SIGACTION: u32 = 4;
const OP_REGISTER: u32 = 5;
const OP_MMAP: u32 = 6;
const OP_MPROTECT: u32 = 7;
const CANCELLED: u32 = 1 << 31;
const NO_FD: i32 = -libc::EBADF;

const CMD_SYNC: u32 = 1;
const CMD_QUIT: u32 = 2;
const CMD_RUN: u32 = 3;
const CLOSE_RANGE_UNSHARE: u32 = 2;

/// The agent's futex timeout: how soon it notices that the tool is gone.
const WAIT_TIMEOUT_NS: u64 = 10_000_000;
/// Timeouts in a row without a request after which the agent exits anyway (10 s): the tool is
/// gone (or lost in a pid namespace the target does not see) or waits that long between syncs;
/// its next sync then falls back to ptrace.
const MAX_IDLE: u32 = 1000;
/// How long `start` waits at most for the agent's own start-up.
const START_WAIT: Duration = Duration::from_millis(2);
/// How long the tool waits for an answer before it falls back to the ptrace sync.
pub(crate) const ANSWER_WAIT: Duration = Duration::from_millis(100);

/// Offsets in the agent's code (from its start, see [`assemble`]; a unit test checks them)
/// where the tool puts the borrowed thread (see [`SyncAgent::start`]). The clone, past the
/// first `rt_sigprocmask`:
const CLONE_AT: u64 = 26;
/// The clone's `syscall` instruction.
const CLONE_CALL: u64 = 54;
/// The starting thread's way back after the clone: its own mask (OLD_MASK), then its own
/// registers (CTX).
const WAY_BACK: u64 = 65;

/// The one mapping the agent makes for the tool: an apply's patch memory, read-only, exactly
/// where the tool asks or not at all (see `apply::map_in_gap`).
const MMAP_PROT: u32 = libc::PROT_READ as u32;
const MMAP_FLAGS: u32 =
    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE | libc::MAP_POPULATE)
        as u32;
/// The protections the agent sets for the tool (the patch memory's code, and its writable
/// data): the only values `mprotect` is vetted for in the agent's code list.
pub(crate) const MPROTECT_PROTS: [u64; 2] = [
    (libc::PROT_READ | libc::PROT_EXEC) as u64,
    (libc::PROT_READ | libc::PROT_WRITE) as u64,
];
const MEMBARRIER_SYNC_CORE: u32 = 1 << 5; // MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE
const MEMBARRIER_REGISTER_SYNC_CORE: u32 = 1 << 6; // MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE
const CLONE_FLAGS: u32 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u32;

/// The agent's code for an area whose code page is at `code` (placed at
/// `code + AGENT_CODE`): the start-up sequence (entry at its first byte), then the agent.
pub(crate) fn generate(code: u64) -> Result<Vec<u8>, IcedError> {
    assemble(code).map(|(bytes, _)| bytes)
}

/// Where the agent is in a program, from its instruction pointer (see [`SyncAgent::resolve`]).
struct Landmarks {
    /// The first instruction after a successful claim.
    claimed: u64,
    /// The write's `syscall` instruction.
    write_call: u64,
    /// The first instruction of a sync operation.
    sync_op: u64,
    /// The sync's `syscall` instruction.
    sync_call: u64,
    /// The first instruction of a merged run's operation.
    merge_op: u64,
    /// Its write's `syscall` instruction (its read before is harmless when done late).
    merge_call: u64,
    /// The first instruction of a signal action's operation.
    sigaction_op: u64,
    /// Its `syscall` instruction.
    sigaction_call: u64,
    /// The first instruction of a mapping's operation, and its `syscall` instruction.
    mmap_op: u64,
    mmap_call: u64,
    /// Right after its result is stored in its operation (see [`Landmarks::mmap_unstored`]).
    mmap_stored: u64,
    /// The same for a protection's.
    mprotect_op: u64,
    mprotect_call: u64,
    /// Where a program ends: the answer to the tool.
    publish: u64,
}

impl Landmarks {
    /// Whether an agent stopped at `rip` has claimed an operation and not yet entered its
    /// system call.
    fn before_the_call(&self, rip: u64) -> bool {
        (self.claimed..=self.write_call).contains(&rip)
            || (self.sync_op..=self.sync_call).contains(&rip)
            || (self.merge_op..=self.merge_call).contains(&rip)
            || (self.sigaction_op..=self.sigaction_call).contains(&rip)
            || (self.mmap_op..=self.mmap_call).contains(&rip)
            || (self.mprotect_op..=self.mprotect_call).contains(&rip)
    }

    /// Whether an agent stopped at `rip` has made a mapping's call and not yet stored what it
    /// returned (in rax then): a stop signal that came during the mmap stops it right there.
    fn mmap_unstored(&self, rip: u64) -> bool {
        (self.mmap_call + 2..self.mmap_stored).contains(&rip)
    }
}

fn assemble(code: u64) -> Result<(Vec<u8>, Landmarks), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut agent = a.create_label();
    let mut wait = a.create_label();
    let mut work = a.create_label();
    let mut quit = a.create_label();
    let mut opened = a.create_label();
    let mut run = a.create_label();
    let mut next = a.create_label();
    let mut op_sync = a.create_label();
    let mut op_done = a.create_label();
    let mut failed = a.create_label();
    let mut publish = a.create_label();
    let mut write_call = a.create_label();
    let mut sync_call = a.create_label();
    let mut claimed = a.create_label();
    let mut not_proc = a.create_label();
    let mut op_merge = a.create_label();
    let mut merge_loop = a.create_label();
    let mut merge_skip = a.create_label();
    let mut merge_write = a.create_label();
    let mut merge_short = a.create_label();
    let mut merge_next = a.create_label();
    let mut merge_call = a.create_label();
    let mut op_sigaction = a.create_label();
    let mut sigaction_call = a.create_label();
    let mut op_register = a.create_label();
    let mut op_mmap = a.create_label();
    let mut mmap_call = a.create_label();
    let mut mmap_stored = a.create_label();
    let mut op_mprotect = a.create_label();
    let mut mprotect_call = a.create_label();

    // Start-up, run by the borrowed thread with rbx = the agent's page.
    a.mov(eax, libc::SYS_rt_sigprocmask as u32)?;
    a.mov(edi, libc::SIG_SETMASK as u32)?;
    a.lea(rsi, qword_ptr(rbx + ALL))?;
    a.lea(rdx, qword_ptr(rbx + OLD_MASK))?;
    a.mov(r10d, 8u32)?;
    a.syscall()?;
    a.mov(eax, libc::SYS_clone as u32)?;
    a.mov(edi, CLONE_FLAGS)?;
    a.lea(rsi, qword_ptr(rbx + th::PAGE))?; // the new thread's stack: the page's end
    a.lea(rdx, qword_ptr(rbx + TID))?;
    a.lea(r10, qword_ptr(rbx + TID))?;
    a.xor(r8d, r8d)?;
    a.syscall()?;
    a.test(rax, rax)?;
    a.jz(agent)?;
    a.mov(eax, libc::SYS_rt_sigprocmask as u32)?;
    a.mov(edi, libc::SIG_SETMASK as u32)?;
    a.lea(rsi, qword_ptr(rbx + OLD_MASK))?;
    a.xor(edx, edx)?;
    a.mov(r10d, 8u32)?;
    a.syscall()?;
    // Only without the tool (it stops the thread at that system call's exit and puts its
    // registers back itself): the thread's own registers, flags and stack pointer, and a jump
    // to its own rip. The flags and rip go below its red zone first.
    a.mov(rsp, qword_ptr(rbx + CTX + CTX_RSP))?;
    a.sub(rsp, 144)?;
    a.mov(rax, qword_ptr(rbx + CTX + CTX_RFLAGS))?;
    a.mov(qword_ptr(rsp), rax)?;
    a.mov(rax, qword_ptr(rbx + CTX + CTX_RIP))?;
    a.mov(qword_ptr(rsp + 8), rax)?;
    for (i, r) in [
        rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15,
    ]
    .into_iter()
    .enumerate()
    {
        if r != rbx {
            a.mov(r, qword_ptr(rbx + CTX + 8 * i as u64))?;
        }
    }
    a.mov(rbx, qword_ptr(rbx + CTX + 8))?;
    a.popfq()?;
    a.ret_1(128)?; // rip, then rsp back to its own value

    // The agent: rbx = its page (inherited), every signal blocked. Its own descriptor table,
    // empty (CLONE_FILES shared the program's: unshared copying none of it), and in it
    // /proc/self/mem, through which it writes the code (see `SyncAgent::run`): the program's
    // descriptors are never touched, and a descriptor of ours never shows up among them.
    a.set_label(&mut agent)?;
    a.mov(eax, 436u32)?; // close_range
    a.xor(edi, edi)?;
    a.mov(esi, u32::MAX)?;
    a.mov(edx, CLOSE_RANGE_UNSHARE)?;
    a.syscall()?;
    a.test(eax, eax)?;
    a.jnz(opened)?;
    a.mov(eax, libc::SYS_open as u32)?;
    a.lea(rdi, qword_ptr(rbx + PATH))?;
    a.mov(esi, (libc::O_RDWR | libc::O_CLOEXEC) as u32)?;
    a.syscall()?;
    a.test(eax, eax)?;
    a.js(opened)?;
    // Only procfs's own file (review 7, finding 3: a /proc of the target's mount namespace
    // could be anything, and writes into a plain file there would be counted as done).
    a.mov(r12d, eax)?;
    a.mov(edi, eax)?;
    a.lea(rsi, qword_ptr(rbx + STATFS))?;
    a.mov(eax, libc::SYS_fstatfs as u32)?;
    a.syscall()?;
    a.test(rax, rax)?;
    a.jnz(not_proc)?;
    a.cmp(qword_ptr(rbx + STATFS), PROC_SUPER_MAGIC)?;
    a.jne(not_proc)?;
    a.mov(eax, r12d)?;
    a.jmp(opened)?;
    a.set_label(&mut not_proc)?;
    a.mov(edi, r12d)?;
    a.mov(eax, libc::SYS_close as u32)?;
    a.syscall()?;
    a.mov(eax, -libc::ENOTSUP)?;
    a.set_label(&mut opened)?;
    a.mov(dword_ptr(rbx + FD), eax)?;
    // The process's membarrier registration for SYNC_CORE, which the switch needs before its
    // first int3 (its install registers again: at once then, or the error it reports). The
    // first in a process makes the kernel wait for an RCU grace period (3-24 ms here, session
    // 14): made here, as the agent starts, it overlaps the tool's preparation (the state
    // mapping's remote calls, the plan) instead of lengthening the switch. Requests wait
    // behind it (see `SyncAgent::request`).
    a.mov(dword_ptr(rbx + REGISTERING), 1u32)?;
    a.mov(eax, libc::SYS_membarrier as u32)?;
    a.mov(edi, MEMBARRIER_REGISTER_SYNC_CORE)?;
    a.xor(esi, esi)?;
    a.xor(edx, edx)?;
    a.syscall()?;
    a.mov(dword_ptr(rbx + REGISTERING), 0u32)?;
    a.xor(r14d, r14d)?; // timeouts in a row
    a.set_label(&mut wait)?;
    a.mov(eax, dword_ptr(rbx + REQ))?;
    a.cmp(eax, dword_ptr(rbx + DONE))?;
    a.jne(work)?;
    a.mov(edx, eax)?;
    a.lea(rdi, qword_ptr(rbx + REQ))?;
    a.xor(esi, esi)?; // FUTEX_WAIT, shared: the tool wakes it through its own mapping
    a.lea(r10, qword_ptr(rbx + TS))?;
    a.mov(eax, libc::SYS_futex as u32)?;
    a.syscall()?;
    a.cmp(rax, -libc::ETIMEDOUT)?;
    a.jne(wait)?;
    a.inc(r14d)?;
    a.cmp(r14d, MAX_IDLE)?;
    a.jae(quit)?;
    a.mov(edi, dword_ptr(rbx + TOOL))?;
    a.test(edi, edi)?;
    a.jz(wait)?;
    a.xor(esi, esi)?;
    a.mov(eax, libc::SYS_kill as u32)?;
    a.syscall()?;
    a.cmp(rax, -libc::ESRCH)?;
    a.jne(wait)?;
    a.jmp(quit)?;
    a.set_label(&mut work)?;
    a.xor(r14d, r14d)?;
    a.mov(r12d, eax)?;
    a.cmp(dword_ptr(rbx + CMD), CMD_QUIT)?;
    a.je(quit)?;
    a.cmp(dword_ptr(rbx + CMD), CMD_RUN)?;
    a.je(run)?;
    a.mov(eax, libc::SYS_membarrier as u32)?;
    a.mov(edi, MEMBARRIER_SYNC_CORE)?;
    a.xor(esi, esi)?;
    a.xor(edx, edx)?;
    a.syscall()?;
    a.mov(qword_ptr(rbx + RESULT), rax)?;
    a.jmp(publish)?;

    // A program: claim the next operation (the tool may cancel between two), carry it out,
    // count it; the first failure ends the program with its error in RESULT.
    a.set_label(&mut run)?;
    a.mov(qword_ptr(rbx + RESULT), 0)?;
    a.set_label(&mut next)?;
    a.mov(eax, dword_ptr(rbx + NEXT))?;
    a.test(eax, eax)?;
    a.js(publish)?; // cancelled
    a.cmp(eax, dword_ptr(rbx + NOPS))?;
    a.jae(publish)?;
    a.lea(ecx, dword_ptr(rax + 1))?;
    a.lock().cmpxchg(dword_ptr(rbx + NEXT), ecx)?;
    // Claimed from here when the compare-and-swap won (review 7, finding 4: an agent stopped
    // at this jne has its operation claimed).
    a.set_label(&mut claimed)?;
    a.jne(publish)?; // cancelled meanwhile
    a.mov(r13d, eax)?;
    a.shl(eax, 5)?; // OP_LEN
    a.lea(r15, qword_ptr(rbx + rax + OPS))?;
    a.cmp(dword_ptr(r15), OP_SYNC)?;
    a.je(op_sync)?;
    a.cmp(dword_ptr(r15), OP_MERGE)?;
    a.je(op_merge)?;
    a.cmp(dword_ptr(r15), OP_SIGACTION)?;
    a.je(op_sigaction)?;
    a.cmp(dword_ptr(r15), OP_REGISTER)?;
    a.je(op_register)?;
    a.cmp(dword_ptr(r15), OP_MMAP)?;
    a.je(op_mmap)?;
    a.cmp(dword_ptr(r15), OP_MPROTECT)?;
    a.je(op_mprotect)?;
    a.mov(edi, dword_ptr(rbx + FD))?;
    a.lea(rsi, qword_ptr(r15 + 16))?;
    a.mov(edx, dword_ptr(r15 + 4))?;
    a.mov(r10, qword_ptr(r15 + 8))?;
    a.mov(eax, libc::SYS_pwrite64 as u32)?;
    a.set_label(&mut write_call)?;
    a.syscall()?;
    a.cmp(rax, rdx)?;
    a.je(op_done)?;
    a.test(rax, rax)?;
    a.js(failed)?;
    a.mov(rax, -(libc::EIO as i64))?; // a short write
    a.jmp(failed)?;
    // A merged run: read right before, our bytes put in where the mask says, written back.
    a.set_label(&mut op_merge)?;
    a.mov(edi, dword_ptr(rbx + FD))?;
    a.lea(rsi, qword_ptr(rbx + BUF))?;
    a.mov(edx, dword_ptr(r15 + 4))?;
    a.mov(r10, qword_ptr(r15 + 8))?;
    a.mov(eax, libc::SYS_pread64 as u32)?;
    a.syscall()?;
    a.cmp(rax, rdx)?;
    a.jne(merge_short)?;
    a.mov(ecx, dword_ptr(r15 + 16))?;
    a.lea(rsi, qword_ptr(rbx + rcx))?; // the patch list
    a.mov(ecx, dword_ptr(r15 + 20))?; // patches
    a.set_label(&mut merge_loop)?;
    a.test(ecx, ecx)?;
    a.jz(merge_write)?;
    a.movzx(r8d, word_ptr(rsi))?; // offset in the run
    a.movzx(r9d, byte_ptr(rsi + 2))?; // length
    a.add(rsi, 4)?;
    a.set_label(&mut merge_skip)?; // one byte of the patch
    a.test(r9d, r9d)?;
    a.jz(merge_next)?;
    a.mov(al, byte_ptr(rsi))?;
    a.mov(byte_ptr(rbx + r8 + BUF), al)?;
    a.inc(rsi)?;
    a.inc(r8d)?;
    a.dec(r9d)?;
    a.jmp(merge_skip)?;
    a.set_label(&mut merge_next)?;
    a.dec(ecx)?;
    a.jmp(merge_loop)?;
    a.set_label(&mut merge_write)?;
    a.mov(edi, dword_ptr(rbx + FD))?;
    a.lea(rsi, qword_ptr(rbx + BUF))?;
    a.mov(r10, qword_ptr(r15 + 8))?;
    a.mov(eax, libc::SYS_pwrite64 as u32)?;
    a.set_label(&mut merge_call)?;
    a.syscall()?;
    a.cmp(rax, rdx)?;
    a.je(op_done)?;
    a.set_label(&mut merge_short)?;
    a.test(rax, rax)?;
    a.js(failed)?;
    a.mov(rax, -(libc::EIO as i64))?;
    a.jmp(failed)?;
    // A system call for the tool (see `SyncAgent::call`): rt_sigaction(signal, act, old, 8),
    // the signal in the length word, `act` in the address, `old` in the data.
    a.set_label(&mut op_sigaction)?;
    a.mov(edi, dword_ptr(r15 + 4))?;
    a.mov(rsi, qword_ptr(r15 + 8))?;
    a.mov(rdx, qword_ptr(r15 + 16))?;
    a.mov(r10d, 8u32)?;
    a.mov(eax, libc::SYS_rt_sigaction as u32)?;
    a.set_label(&mut sigaction_call)?;
    a.syscall()?;
    a.test(rax, rax)?;
    a.jnz(failed)?;
    a.jmp(op_done)?;
    // The process's registration for SYNC_CORE (idempotent: harmless when late).
    a.set_label(&mut op_register)?;
    a.mov(eax, libc::SYS_membarrier as u32)?;
    a.mov(edi, MEMBARRIER_REGISTER_SYNC_CORE)?;
    a.xor(esi, esi)?;
    a.xor(edx, edx)?;
    a.syscall()?;
    a.test(rax, rax)?;
    a.jnz(failed)?;
    a.jmp(op_done)?;
    // The tool's patch memory (see `SyncAgent::call`): mmap(addr, len, MMAP_PROT, MMAP_FLAGS,
    // -1, 0), the address in the address word, the length in the data; what it returns
    // (the mapping's address) in the data's second word. Placed elsewhere (a kernel without
    // MAP_FIXED_NOREPLACE takes the address for a hint): a failure, EEXIST — the calls after
    // it in the program are meant for `addr` (the tool unmaps that mapping).
    a.set_label(&mut op_mmap)?;
    a.mov(rdi, qword_ptr(r15 + 8))?;
    a.mov(rsi, qword_ptr(r15 + 16))?;
    a.mov(edx, MMAP_PROT)?;
    a.mov(r10d, MMAP_FLAGS)?;
    a.mov(r8, -1i64)?;
    a.xor(r9d, r9d)?;
    a.mov(eax, libc::SYS_mmap as u32)?;
    a.set_label(&mut mmap_call)?;
    a.syscall()?;
    a.test(rax, rax)?;
    a.js(failed)?;
    a.mov(qword_ptr(r15 + 24), rax)?;
    a.set_label(&mut mmap_stored)?;
    a.cmp(rax, rdi)?;
    a.je(op_done)?;
    a.mov(rax, -(libc::EEXIST as i64))?;
    a.jmp(failed)?;
    // Its protections: mprotect(addr, len, prot), the protection in the length word.
    a.set_label(&mut op_mprotect)?;
    a.mov(rdi, qword_ptr(r15 + 8))?;
    a.mov(rsi, qword_ptr(r15 + 16))?;
    a.mov(edx, dword_ptr(r15 + 4))?;
    a.mov(eax, libc::SYS_mprotect as u32)?;
    a.set_label(&mut mprotect_call)?;
    a.syscall()?;
    a.test(rax, rax)?;
    a.jnz(failed)?;
    a.jmp(op_done)?;
    a.set_label(&mut op_sync)?;
    a.mov(eax, libc::SYS_membarrier as u32)?;
    a.mov(edi, MEMBARRIER_SYNC_CORE)?;
    a.xor(esi, esi)?;
    a.xor(edx, edx)?;
    a.set_label(&mut sync_call)?;
    a.syscall()?;
    a.test(rax, rax)?;
    a.jnz(failed)?;
    a.set_label(&mut op_done)?;
    a.lea(eax, dword_ptr(r13 + 1))?;
    a.mov(dword_ptr(rbx + COMPLETED), eax)?;
    a.jmp(next)?;
    a.set_label(&mut failed)?;
    a.mov(qword_ptr(rbx + RESULT), rax)?;

    a.set_label(&mut publish)?;
    a.mov(dword_ptr(rbx + DONE), r12d)?;
    a.lea(rdi, qword_ptr(rbx + DONE))?;
    a.mov(esi, libc::FUTEX_WAKE as u32)?;
    a.mov(edx, 1u32)?;
    a.mov(eax, libc::SYS_futex as u32)?;
    a.syscall()?;
    a.jmp(wait)?;
    a.set_label(&mut quit)?;
    a.mov(eax, libc::SYS_exit as u32)?;
    a.xor(edi, edi)?;
    a.syscall()?;
    a.ud2()?;
    let result = a.assemble_options(
        code + th::AGENT_CODE,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let landmarks = Landmarks {
        claimed: result.label_ip(&claimed)?,
        write_call: result.label_ip(&write_call)?,
        sync_op: result.label_ip(&op_sync)?,
        sync_call: result.label_ip(&sync_call)?,
        merge_op: result.label_ip(&op_merge)?,
        merge_call: result.label_ip(&merge_call)?,
        sigaction_op: result.label_ip(&op_sigaction)?,
        sigaction_call: result.label_ip(&sigaction_call)?,
        mmap_op: result.label_ip(&op_mmap)?,
        mmap_call: result.label_ip(&mmap_call)?,
        mmap_stored: result.label_ip(&mmap_stored)?,
        mprotect_op: result.label_ip(&op_mprotect)?,
        mprotect_call: result.label_ip(&mprotect_call)?,
        publish: result.label_ip(&publish)?,
    };
    let bytes = result.inner.code_buffer;
    assert!(
        th::AGENT_CODE + (bytes.len() as u64) <= th::PAGE,
        "the sync agent's code overflows the code page"
    );
    Ok((bytes, landmarks))
}

/// The agent's page mapped in the tool (shared with the target: the same memfd page).
struct Shared {
    ptr: *mut u8,
}

impl Shared {
    /// Maps the agent's page of the area at `code` in process `pid` (through
    /// /proc/PID/map_files: the data pages are one mapping of the memfd).
    fn map(pid: i32, code: u64) -> Option<Shared> {
        use std::os::fd::AsRawFd;
        let path = format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            code + th::PAGE,
            code + th::AREA_LEN
        );
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ok()?;
        // SAFETY: a new shared mapping of one page of that file, at an address the kernel
        // chooses; nothing else of ours is affected. Unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                th::PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                (th::PAGE + th::AGENT) as libc::off_t,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Shared { ptr: ptr.cast() })
    }

    fn word(&self, off: u64) -> &AtomicU32 {
        // SAFETY: `off` is one of the u32 offsets above, 4-aligned and inside the mapped page,
        // which lives as long as self; the target writes these words only atomically.
        unsafe { &*(self.ptr.add(off as usize) as *const AtomicU32) }
    }

    fn result(&self) -> i64 {
        self.u64_at(RESULT) as i64
    }

    /// The u64 at offset `off` (8-aligned) of the page.
    fn u64_at(&self, off: u64) -> u64 {
        assert!(off.is_multiple_of(8) && off + 8 <= th::PAGE);
        // SAFETY: 8-aligned and inside the mapped page (checked above), which lives as long
        // as self; the agent writes these words only whole, before it counts its operation.
        unsafe { &*(self.ptr.add(off as usize) as *const AtomicU64) }.load(Ordering::Acquire)
    }

    /// Copies the bytes at offset `off` of the page to `buf` (written by the agent before its
    /// answer, whose acquire load the caller made).
    fn get(&self, off: u64, buf: &mut [u8]) {
        assert!(off as usize + buf.len() <= th::PAGE as usize);
        // SAFETY: inside the mapped page (checked above), which lives as long as self; the
        // agent wrote these bytes before it published its answer, and writes them no more.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(off as usize), buf.as_mut_ptr(), buf.len())
        };
    }

    /// Copies `bytes` to offset `off` of the page (read by the agent only after the request
    /// word's release store).
    fn put(&self, off: u64, bytes: &[u8]) {
        assert!(off as usize + bytes.len() <= th::PAGE as usize);
        // SAFETY: inside the mapped page (checked above), which lives as long as self; the
        // agent does not read these bytes before the next request.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off as usize), bytes.len())
        };
    }

    /// FUTEX_WAKE of the target's waiter on word `off` (shared futex).
    fn wake(&self, off: u64) {
        // SAFETY: a futex system call on a word of our mapping; no other memory is touched.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word(off).as_ptr(),
                libc::FUTEX_WAKE,
                1,
                0usize,
            );
        }
    }

    /// FUTEX_WAIT on word `off` while it holds `val`, for at most `ns`.
    fn wait(&self, off: u64, val: u32, ns: u64) {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: a futex system call on a word of our mapping with a valid timespec.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word(off).as_ptr(),
                libc::FUTEX_WAIT,
                val,
                &ts as *const libc::timespec,
            );
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: our own mapping of one page, made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), th::PAGE as usize) };
    }
}

/// A running sync agent in the target.
pub(crate) struct SyncAgent {
    shared: Shared,
    tid: i32,
    seq: u32,
    /// It did not answer once: no more requests (the ptrace sync is used).
    failed: bool,
    /// A write of a program failed, or it has no /proc/self/mem: no more programs (the tool
    /// writes).
    no_writes: bool,
    /// The area's code page (where the agent's code is).
    code: u64,
    /// It may still carry out an operation of a cancelled program (see [`Stuck`]).
    stuck: bool,
    /// It was told to exit ([`SyncAgent::quit`]).
    quit_sent: bool,
}

/// One operation of a program (see [`SyncAgent::run`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// lp-core's step: a write of up to 16 bytes, or a sync.
    Step(Step),
    /// Sites close together written at once (at most [`MAX_RUN`] bytes from `addr`): the
    /// bytes there are read right before — a uprobe's `int3` the kernel put in or took out
    /// meanwhile stays as it is —, `bytes` put in where `mask` is set, and written back.
    Merge {
        addr: u64,
        bytes: Vec<u8>,
        mask: Vec<bool>,
    },
    /// `rt_sigaction(signal, act, old, 8)` (addresses in the target), for the tool (see
    /// [`SyncAgent::call`]).
    SigAction { signal: u32, act: u64, old: u64 },
    /// The process's membarrier registration for SYNC_CORE (see [`SyncAgent::call`]).
    RegisterSyncCore,
    /// An apply's patch memory: `len` bytes at `addr`, read-only, private and anonymous,
    /// exactly there or not at all (`MAP_FIXED_NOREPLACE`), populated (see
    /// [`SyncAgent::call`]).
    Mmap { addr: u64, len: u64 },
    /// `mprotect(addr, len, prot)`, `prot` one of [`MPROTECT_PROTS`] (see [`SyncAgent::call`]).
    Mprotect { addr: u64, len: u64, prot: u64 },
}

impl Op {
    /// Whether carrying it out late does no harm: a sync writes nothing, a registration
    /// that is made already changes nothing.
    fn is_harmless_late(&self) -> bool {
        matches!(self, Op::Step(Step::Sync) | Op::RegisterSyncCore)
    }

    /// Its patch list (see [`DATA`]) and the number of patches: one per stretch of set mask.
    fn patch_list(&self) -> (Vec<u8>, u32) {
        let (mut list, mut n) = (Vec::new(), 0);
        if let Op::Merge { bytes, mask, .. } = self {
            let mut k = 0;
            while k < mask.len() {
                if !mask[k] {
                    k += 1;
                    continue;
                }
                let end = (k..mask.len())
                    .find(|&j| !mask[j] || j - k == 255)
                    .unwrap_or(mask.len());
                list.extend((k as u16).to_le_bytes());
                list.extend([(end - k) as u8, 0]);
                list.extend(&bytes[k..end]);
                n += 1;
                k = end;
            }
        }
        (list, n)
    }

    /// Bytes of [`DATA`] it takes.
    fn data_len(&self) -> u64 {
        match self {
            Op::Merge { .. } => (self.patch_list().0.len() as u64).div_ceil(8) * 8,
            _ => 0,
        }
    }
}

/// Whether `ops` fit in one program.
pub(crate) fn fits(ops: &[Op]) -> bool {
    ops.len() <= MAX_OPS
        && ops.iter().map(Op::data_len).sum::<u64>() <= DATA_LEN
        && ops.iter().all(|op| match op {
            Op::Merge { bytes, mask, .. } => bytes.len() <= MAX_RUN && mask.len() == bytes.len(),
            _ => true,
        })
}

/// How a program went ([`SyncAgent::carry_out`]): the number of operations carried out, a
/// prefix, as the agent answered, or as found after it was silent.
enum Answer {
    Answered(usize),
    Silent(usize),
}

/// How the tool's calls given to the agent went ([`SyncAgent::calls`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Calls {
    /// How many of them were made (a prefix) and succeeded.
    pub done: usize,
    /// The next one's error (-errno) when the agent made it and it failed; None when it was
    /// not made (or every call was).
    pub error: Option<i64>,
    /// What an [`Op::Mmap`] among the calls returned (its address; one placed elsewhere than
    /// asked fails with EEXIST, its address here), 0 when it was not made or failed. Set also
    /// when the agent made it and was silent before it counted it (`done` 0 then).
    pub mapped: i64,
}

/// An agent that took an operation of a cancelled program and neither carried it out nor
/// answered: it may still carry it out later, so nothing may be written over it.
#[derive(Debug)]
pub(crate) struct Stuck {
    pub tid: i32,
}

/// Bytes of a call's output slot (see [`SyncAgent::out_slot`]).
const OUT_LEN: u64 = 32;

impl SyncAgent {
    /// Starts the agent of the area at `code` on the borrowed thread of `t` (stopped, after a
    /// remote system call: its own registers are put back the same way). None when it cannot
    /// be started: the caller syncs through ptrace. Signals the borrowed thread was about to
    /// take meanwhile are added to `held` (tid, signal): the caller sends them again once the
    /// switch is over, as the tracee does with the signals it holds back. The agent runs under
    /// SCHED_FIFO when the tool may set it (see the module documentation).
    ///
    /// `settled`: wait (at most [`START_WAIT`]) for the agent's own start-up to be over, for a
    /// switch whose windows come next; an apply's preparation, which starts it first (see
    /// `nonstop::Early`), does not: its first request waits for that start-up in the agent.
    pub(crate) fn start(
        t: &mut Tracee,
        code: u64,
        held: &mut Vec<(i32, crate::process::HeldSignal)>,
        settled: bool,
    ) -> Option<SyncAgent> {
        let shared = Shared::map(t.pid(), code)?;
        // An agent orphaned by a killed livepatch still waits there (it exits at its next
        // timeout, or never ran since: its process was stopped): none is started beside it —
        // both would use the same words.
        if shared.word(TID).load(Ordering::Acquire) != 0 {
            return None;
        }
        // Stopped now if it was not yet (nonstop mode seizes it and stops it at its first use).
        let tid = t.stopped_thread().ok()?;
        // In a stopped process (SIGSTOP) the agent would join the stop at once: it could
        // neither answer nor exit until SIGCONT.
        if job_stopped(t.pid(), tid) {
            return None;
        }
        // The start-up runs on the borrowed thread and the agent is its clone: both under its
        // seccomp filters, which must let every system call of the code through.
        if !seccomp_allows(t.pid(), tid, code) {
            return None;
        }
        let page = code + th::PAGE + th::AGENT;
        let saved = t.regs(tid).ok()?;
        let own_mask = sigmask(tid).ok()?;
        write_page(&shared, t.pid(), &saved, own_mask);
        let start = code + th::AGENT_CODE;
        let mut regs = saved;
        regs.rip = start + WAY_BACK;
        regs.rbx = page;
        // Not in a system call: the kernel must not restart one at our rip (a signal taken
        // before the first instruction would otherwise rewind it by 2).
        regs.orig_rax = u64::MAX;
        // The masks are set by the tool (PTRACE_SETSIGMASK), not by the thread: its one system
        // call is the clone, two ptrace stops (its own rt_sigprocmask calls made it six, each
        // a round trip that waits for the thread to get a CPU). Three requests, in an order
        // that leaves the thread safe should the tool die between any two (it then runs on
        // from its rip by itself, see the module documentation): its rip at the way back (its
        // own mask, its own registers: nothing started); every signal blocked; its rip at the
        // clone (the agent then inherits that mask).
        // (The tests of a killed tool stop it after each step: `agent-start.N`, see
        // `start_point`.)
        // The clone is a system call of ours on the thread: when it runs its own code again,
        // a call of its own our stop interrupted must be restarted as after any remote call
        // (before, a remote call made first — the read of the SIGTRAP action — did that).
        t.runs_syscall_of_ours(tid);
        t.set_regs(tid, &regs).ok()?;
        start_point(1);
        let clone = set_sigmask(tid, u64::MAX)
            .ok()
            .and_then(|()| {
                start_point(2);
                regs.rip = start + CLONE_AT;
                t.set_regs(tid, &regs).ok()
            })
            .and_then(|()| {
                start_point(3);
                run_start_up(tid, start + CLONE_CALL + 2, held)
            });
        start_point(5);
        // Its own mask and then its own registers back, whatever happened (the thread sits in
        // the clone's syscall-exit stop, as after any remote system call, or is gone). In that
        // order: its own code never runs with every signal blocked, even should the tool die
        // in between (it takes the way back, which sets its own mask again).
        let _ = set_sigmask(tid, own_mask);
        start_point(6);
        let _ = t.set_regs(tid, &saved);
        let agent = clone.filter(|&r| r > 0)? as i32;
        // SAFETY: a plain system call on a thread id; rt is a valid sched_param.
        unsafe {
            let rt = libc::sched_param { sched_priority: 1 };
            libc::sched_setscheduler(agent, libc::SCHED_FIFO, &rt);
        }
        // Its own start-up (a descriptor table of its own, /proc/self/mem opened and checked)
        // over before the first window: the switch's traps then meet an agent that only waits
        // (the process_patch bench's longest calls overlapping an apply grew by 7–8 µs when the
        // windows began right after the clone; with six stops the agent had that time). At
        // most START_WAIT: a program queued earlier waits for it (see `run`).
        let deadline = Instant::now() + START_WAIT;
        while settled
            && shared.word(FD).load(Ordering::Acquire) as i32 == NO_FD
            && shared.word(TID).load(Ordering::Acquire) != 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_micros(20));
        }
        Some(SyncAgent {
            shared,
            tid: agent,
            seq: 0,
            failed: false,
            no_writes: false,
            code,
            stuck: false,
            quit_sent: false,
        })
    }

    /// The agent's thread id (it is no thread of the program: skipped when the threads are
    /// watched).
    pub(crate) fn tid(&self) -> i32 {
        self.tid
    }

    /// Whether it may still write a byte of a program that was cancelled (see [`Stuck`]):
    /// then nothing of the switch may be written any more.
    pub(crate) fn is_stuck(&self) -> bool {
        self.stuck
    }

    /// Whether programs go to it (see [`SyncAgent::run`]).
    pub(crate) fn writes(&self) -> bool {
        !self.failed && !self.no_writes
    }

    /// Runs one sync; false when the agent did not do it (gone, silent, or the membarrier
    /// failed): the caller syncs through ptrace instead.
    pub(crate) fn sync(&mut self) -> bool {
        if self.failed {
            return false;
        }
        self.seq = self.seq.wrapping_add(1);
        let done = self.request(CMD_SYNC, ANSWER_WAIT, &mut || {});
        self.failed = !done || self.shared.result() != 0;
        !self.failed
    }

    /// Runs `ops` in the agent, in order, at once: writes through its /proc/self/mem and
    /// syncs, with no round trip through the tool in between (the tool, an ordinary thread,
    /// waited for a CPU after each sync behind the target's threads — which trap on our int3s
    /// for as long as a window lasts; the agent runs under SCHED_FIFO). Returns how many of
    /// them were carried out, a prefix: the caller carries out the rest itself. 0 when the
    /// agent cannot write (no /proc/self/mem, an earlier failure) or did not start them.
    ///
    /// The agent claims each operation before it starts it; when it does not answer in
    /// [`ANSWER_WAIT`] the program is cancelled (no further claim) and the one it has claimed,
    /// if any, is waited for. An agent that stays stopped with a claimed operation is
    /// [`Stuck`].
    pub(crate) fn run(&mut self, ops: &[Op]) -> Result<usize, Stuck> {
        if self.failed || self.no_writes || ops.is_empty() || !fits(ops) {
            return Ok(0);
        }
        let fd = self.shared.word(FD).load(Ordering::Acquire) as i32;
        if fd < 0 && fd != NO_FD {
            // No descriptor (no procfs /proc in its namespace). (NO_FD: the agent has not run
            // its start-up yet; it takes the request after it, and a write without a
            // descriptor fails at the first operation, which the tool then carries out.)
            self.no_writes = true;
            return Ok(0);
        }
        self.load(ops);
        match self.carry_out(ops, ANSWER_WAIT, &mut || {})? {
            Answer::Answered(done) => {
                if self.shared.result() != 0 {
                    self.no_writes = true;
                }
                Ok(done)
            }
            Answer::Silent(done) => Ok(done),
        }
    }

    /// Makes one system call for the tool ([`Op::SigAction`], [`Op::RegisterSyncCore`],
    /// [`Op::Mmap`] or [`Op::Mprotect`]) in the agent: a request and its answer, where the
    /// same call through ptrace is two stops of the borrowed thread, each waiting until that
    /// ordinary thread gets a CPU back (100–250 µs each on this project's loaded 2-CPU
    /// machine; the agent runs under SCHED_FIFO). The call's result (0 or -errno; a mapping's
    /// address for [`Op::Mmap`]); None when the agent did not make it (an earlier failure,
    /// gone, or silent for `within`: the caller makes it through ptrace).
    /// It is claimed and resolved like a program's operation (see [`SyncAgent::run`]): a
    /// call the agent did not make is never made later, or the agent is [`Stuck`].
    pub(crate) fn call(&mut self, op: Op, within: Duration) -> Result<Option<i64>, Stuck> {
        let mmap = matches!(op, Op::Mmap { .. });
        Ok(self
            .calls(&[op], within)?
            .and_then(|c| match (c.done, c.error) {
                (1, _) if mmap => Some(c.mapped),
                (1, _) => Some(0),
                (_, Some(e)) => Some(e),
                // Not made.
                _ => None,
            }))
    }

    /// Makes the system calls `ops` for the tool in the agent, in order, as one program (one
    /// request and its answer for all of them: see [`SyncAgent::call`]); the first that fails
    /// ends it. None when the agent did not take it (an earlier failure, gone, or silent for
    /// `within` before its first call was claimed).
    pub(crate) fn calls(&mut self, ops: &[Op], within: Duration) -> Result<Option<Calls>, Stuck> {
        self.calls_meanwhile(ops, within, &mut || {})
    }

    /// [`SyncAgent::calls`], with `meanwhile` run by the tool while the agent makes them (once,
    /// right after the request; `within` counts from its end): work of the tool's own that
    /// needs none of the calls' results, in the time it would spend waiting for them.
    pub(crate) fn calls_meanwhile(
        &mut self,
        ops: &[Op],
        within: Duration,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Option<Calls>, Stuck> {
        debug_assert!(ops.iter().all(|op| matches!(
            op,
            Op::SigAction { .. } | Op::RegisterSyncCore | Op::Mmap { .. } | Op::Mprotect { .. }
        )));
        if self.failed || ops.is_empty() || !fits(ops) {
            return Ok(None);
        }
        self.load(ops);
        // Each call's point, in order (all of them loaded, none asked for yet).
        for op in ops {
            let nr = match op {
                Op::SigAction { .. } => libc::SYS_rt_sigaction,
                Op::Mmap { .. } => libc::SYS_mmap,
                Op::Mprotect { .. } => libc::SYS_mprotect,
                _ => libc::SYS_membarrier,
            };
            crate::process::stop_point::reached_with("agent-call", nr);
        }
        // What a mapping returned: stored in its operation (zeroed by `load`) before it was
        // counted as done, or failed for its place.
        let mapped = |s: &Shared, _done: usize| {
            ops.iter()
                .position(|op| matches!(op, Op::Mmap { .. }))
                .map_or(0, |i| s.u64_at(OPS + i as u64 * OP_LEN + 24) as i64)
        };
        Ok(match self.carry_out(ops, within, meanwhile)? {
            Answer::Answered(done) => Some(Calls {
                done,
                // Made, and failed: its error (a program's first failure ends it, in RESULT).
                error: Some(self.shared.result()).filter(|&r| r < 0 && done < ops.len()),
                mapped: mapped(&self.shared, done),
            }),
            // Nothing counted — but a mapping made and stored, not yet counted (its process
            // stopped right after the call, say; review 11), is there all the same: the caller
            // must not map again (its second mmap failed, EEXIST, and the first stayed for good).
            Answer::Silent(0) if mapped(&self.shared, 0) == 0 => None,
            // Silent, the calls counted as done made: the rest was not, and will not be.
            Answer::Silent(done) => Some(Calls {
                done,
                error: None,
                mapped: mapped(&self.shared, done),
            }),
        })
    }

    /// The address in the target of 32 bytes of the agent's page that a call of a program of
    /// calls may write its output to (slot `i`; `rt_sigaction`'s old action), and that
    /// [`SyncAgent::out`] reads: the room of a window program's patch lists, free in a
    /// program of calls. None past the last slot.
    pub(crate) fn out_slot(&self, i: usize) -> Option<u64> {
        let off = DATA + i as u64 * OUT_LEN;
        (off + OUT_LEN <= DATA + DATA_LEN).then_some(self.code + th::PAGE + th::AGENT + off)
    }

    /// What a call wrote to slot `i` (see [`SyncAgent::out_slot`]), read through the tool's
    /// own mapping of the page.
    pub(crate) fn out(&self, i: usize) -> [u8; OUT_LEN as usize] {
        let mut b = [0u8; OUT_LEN as usize];
        self.shared.get(DATA + i as u64 * OUT_LEN, &mut b);
        b
    }

    /// Puts `ops` (which [`fits`]) in the agent's page as its next program.
    fn load(&self, ops: &[Op]) {
        let s = &self.shared;
        let mut data_at = DATA;
        for (i, op) in ops.iter().enumerate() {
            let mut raw = [0u8; OP_LEN as usize];
            let head = |raw: &mut [u8], kind: u32, len: usize, addr: u64| {
                raw[..4].copy_from_slice(&kind.to_le_bytes());
                raw[4..8].copy_from_slice(&(len as u32).to_le_bytes());
                raw[8..16].copy_from_slice(&addr.to_le_bytes());
            };
            match op {
                Op::Step(Step::Sync) => head(&mut raw, OP_SYNC, 0, 0),
                Op::Step(step) => {
                    let (addr, data) = step.data().unwrap_or_default();
                    head(&mut raw, OP_WRITE, data.len(), addr);
                    raw[16..16 + data.len()].copy_from_slice(data);
                }
                Op::Merge { addr, bytes, .. } => {
                    head(&mut raw, OP_MERGE, bytes.len(), *addr);
                    let (list, n) = op.patch_list();
                    raw[16..20].copy_from_slice(&(data_at as u32).to_le_bytes());
                    raw[20..24].copy_from_slice(&n.to_le_bytes());
                    s.put(data_at, &list);
                    data_at += op.data_len();
                }
                Op::SigAction { signal, act, old } => {
                    head(&mut raw, OP_SIGACTION, *signal as usize, *act);
                    raw[16..24].copy_from_slice(&old.to_le_bytes());
                }
                Op::RegisterSyncCore => head(&mut raw, OP_REGISTER, 0, 0),
                Op::Mmap { addr, len } => {
                    head(&mut raw, OP_MMAP, 0, *addr);
                    raw[16..24].copy_from_slice(&len.to_le_bytes());
                }
                Op::Mprotect { addr, len, prot } => {
                    head(&mut raw, OP_MPROTECT, *prot as usize, *addr);
                    raw[16..24].copy_from_slice(&len.to_le_bytes());
                }
            }
            s.put(OPS + i as u64 * OP_LEN, &raw);
        }
        s.word(NOPS).store(ops.len() as u32, Ordering::Release);
        s.word(NEXT).store(0, Ordering::Release);
        s.word(COMPLETED).store(0, Ordering::Release);
    }

    /// Asks the agent to carry out the program [`load`](Self::load)ed, and waits `within` for
    /// its answer. Silent: no more claims (the agent is not asked anything again); the claimed
    /// operation, if any, is a few instructions away from its end unless the agent is stopped
    /// (a stopped process), and is waited for, then resolved.
    fn carry_out(
        &mut self,
        ops: &[Op],
        within: Duration,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Answer, Stuck> {
        self.seq = self.seq.wrapping_add(1);
        let answered = self.request(CMD_RUN, within, meanwhile);
        let s = &self.shared;
        if answered {
            let done = s.word(COMPLETED).load(Ordering::Acquire) as usize;
            return Ok(Answer::Answered(done.min(ops.len())));
        }
        self.failed = true;
        let claimed = s.word(NEXT).fetch_or(CANCELLED, Ordering::AcqRel) & !CANCELLED;
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let done = s.word(COMPLETED).load(Ordering::Acquire);
            if done >= claimed || s.word(DONE).load(Ordering::Acquire) == self.seq {
                return Ok(Answer::Silent(done as usize));
            }
            // A sync carried out late writes nothing (review 7): the caller syncs again.
            if done + 1 == claimed && ops[done as usize].is_harmless_late() {
                return Ok(Answer::Silent(done as usize));
            }
            if s.word(TID).load(Ordering::Acquire) == 0 {
                // Gone (the process is exiting): it carries out nothing more.
                return Ok(Answer::Silent(done as usize));
            }
            if Instant::now() > deadline {
                let resolved = self.resolve();
                self.stuck = resolved.is_err();
                return resolved.map(Answer::Silent);
            }
            s.wait(DONE, s.word(DONE).load(Ordering::Acquire), 1_000_000);
        }
    }

    /// A cancelled program whose claimed operation was not carried out in time: the agent is
    /// stopped (a stopped process) or starved. It is stopped through ptrace and looked at. If it
    /// has not entered the operation's system call, it is sent to the end of the program: it
    /// will never carry the operation out. Either way the operations counted as done are
    /// returned; the caller carries out the rest (redoing one whose count was not yet stored:
    /// a write of the same bytes, or a sync, again). The agent is let go as it was (still
    /// stopped, in a stopped process).
    fn resolve(&self) -> Result<usize, Stuck> {
        resolve_claim(self.tid, self.code, &self.shared)
    }

    /// Asks for `cmd` and waits `within` for its answer, after `meanwhile` (see
    /// [`SyncAgent::calls_meanwhile`]).
    fn request(&mut self, cmd: u32, within: Duration, meanwhile: &mut dyn FnMut()) -> bool {
        let s = &self.shared;
        s.word(CMD).store(cmd, Ordering::Release);
        s.word(REQ).store(self.seq, Ordering::Release);
        s.wake(REQ);
        meanwhile();
        let now = Instant::now();
        let mut deadline = now + within;
        // An agent still in its start-up's membarrier registration (see `assemble`) takes the
        // request after it: that long is waited for too, up to what the install's own
        // registration gets (150 ms were seen on a loaded machine), and `within` counts from
        // its end. (Review 2 of session 14: counted from the request, a registration that
        // outlasted `within` made the tool give up at its first look after the word was
        // cleared, the agent then in the middle of the request: cancelled, and the switch
        // left to ptrace.)
        let registering = now + super::REGISTER_WAIT;
        loop {
            let done = s.word(DONE).load(Ordering::Acquire);
            if done == self.seq {
                return true;
            }
            let now = Instant::now();
            if s.word(REGISTERING).load(Ordering::Acquire) != 0 && now < registering {
                deadline = deadline.max(now + within);
            }
            if s.word(TID).load(Ordering::Acquire) == 0 || now > deadline {
                return false;
            }
            s.wait(DONE, done, 1_000_000);
        }
    }
}

impl SyncAgent {
    /// Tells the agent to exit, without waiting: its exit is waited for when it is dropped.
    /// No request may follow.
    pub(crate) fn quit(&mut self) {
        if self.quit_sent {
            return;
        }
        self.quit_sent = true;
        self.seq = self.seq.wrapping_add(1);
        let s = &self.shared;
        s.word(CMD).store(CMD_QUIT, Ordering::Release);
        s.word(REQ).store(self.seq, Ordering::Release);
        s.wake(REQ);
    }
}

impl Drop for SyncAgent {
    /// Tells the agent to exit (unless [`SyncAgent::quit`] did) and waits (at most a second)
    /// until it has: the process's thread list is its own again.
    fn drop(&mut self) {
        self.quit();
        let s = &self.shared;
        if self.stuck {
            // Stopped: it quits once it runs again.
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let tid = s.word(TID).load(Ordering::Acquire);
            if tid == 0 || Instant::now() > deadline {
                break;
            }
            s.wait(TID, tid, 10_000_000);
        }
    }
}

/// Resolves the operation the agent `tid` (of the area at `code`, page `shared`) has claimed
/// in a cancelled program and not counted (see [`SyncAgent::resolve`]): the operations counted
/// as done, or [`Stuck`].
fn resolve_claim(tid: i32, code: u64, shared: &Shared) -> Result<usize, Stuck> {
    let stuck = Stuck { tid };
    let landmarks = assemble(code).map_err(|_| Stuck { tid })?.1;
    ptrace::seize(tid).map_err(|_| Stuck { tid })?;
    let mut sig = 0;
    let stopped = ptrace::interrupt(tid).is_ok() && {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match ptrace::wait(tid, true) {
                Ok(Some((_, WaitStatus::Signal(s)))) => {
                    sig = s;
                    break true;
                }
                Ok(Some((_, WaitStatus::Gone))) | Err(_) => break false,
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() > deadline => break false,
                Ok(None) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    };
    let sent_away = stopped
        && ptrace::get_regs(tid).is_ok_and(|mut regs| {
            // A mapping made, its address not yet stored: stored for it, so that the tool
            // knows the mapping is there (review 11: it mapped again elsewhere, and this one
            // stayed for good). r13 holds the operation's index.
            if landmarks.mmap_unstored(regs.rip) && (regs.rax as i64) > 0 {
                if let Some(i) = Some(regs.r13 & 0xffff_ffff).filter(|&i| i < MAX_OPS as u64) {
                    shared.put(OPS + i * OP_LEN + 24, &regs.rax.to_le_bytes());
                }
            }
            !landmarks.before_the_call(regs.rip) || {
                regs.rip = landmarks.publish;
                ptrace::set_regs(tid, &regs).is_ok()
            }
        });
    let done = shared.word(COMPLETED).load(Ordering::Acquire) as usize;
    let _ = ptrace::detach(tid, sig);
    if sent_away {
        Ok(done)
    } else {
        Err(stuck)
    }
}

/// Before anything is written to process `pid`: an agent that a killed livepatch left in the
/// area at `code` gets its program cancelled — it claims no operation after this — and an
/// operation it claimed and has not counted is waited for a moment, then resolved as a live
/// tool resolves it ([`resolve_claim`]): a write of a killed tool's program carried out after
/// the next livepatch's recovery would undo it (review 7, finding 1: SIGSEGV). A claimed sync
/// writes nothing and needs nothing. An agent that cannot be made harmless is [`Stuck`]. The
/// agent itself exits on its own (its tool is gone).
///
/// `own`: the area is this build's. In another build's area (same layout, other code: the tool
/// upgraded meanwhile) the words are read and cancelled the same way, but a claimed write not
/// carried out in time is not resolved by hand (that needs the agent's code, see
/// [`resolve_claim`]): the agent is [`Stuck`] then, and nothing is written.
///
/// Returns whether a living agent was left alone because its tool lives (that tool's business,
/// until it dies: the caller looks again once it holds the process).
pub(crate) fn quiet_orphan(
    pid: i32,
    mem: &crate::process::Memory,
    code: u64,
    own: bool,
) -> Result<bool, Stuck> {
    let Some(s) = Shared::map(pid, code) else {
        // The page cannot be mapped (a process whose main thread has exited has no map_files):
        // an agent living there can be neither cancelled nor resolved, and a program it was
        // given would be carried out after our recovery (review 10). Unless its tool lives.
        return match living_agent(mem, code) {
            Some(tid) if !tool_still_tracing(pid, agent_word(mem, code, TOOL)) => {
                Err(Stuck { tid })
            }
            agent => Ok(agent.is_some()),
        };
    };
    let tid = s.word(TID).load(Ordering::Acquire) as i32;
    if tid == 0 {
        return Ok(false);
    }
    if tool_still_tracing(pid, s.word(TOOL).load(Ordering::Acquire)) {
        // One whose tool lives: that tool holds the process (the attach that follows waits
        // for it), and its program is its own business (review 7, finding 6).
        return Ok(true);
    }
    let claimed = s.word(NEXT).fetch_or(CANCELLED, Ordering::AcqRel) & !CANCELLED;
    let deadline = Instant::now() + Duration::from_millis(100);
    loop {
        let done = s.word(COMPLETED).load(Ordering::Acquire);
        if done >= claimed || s.word(TID).load(Ordering::Acquire) == 0 {
            return Ok(false);
        }
        let op = OPS + u64::from(done) * OP_LEN;
        if done + 1 == claimed
            && (done as usize) < MAX_OPS
            && s.word(op).load(Ordering::Acquire) == OP_SYNC
        {
            return Ok(false);
        }
        if Instant::now() > deadline {
            if !own {
                return Err(Stuck { tid });
            }
            return resolve_claim(tid, code, &s).map(|_| false);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The tid of the agent living in the area at `code` of the process `mem` reads (this
/// switch's or one a killed livepatch left; any state: waiting, starved of a CPU, not yet at
/// its first instruction), None when there is none: the word clone sets and the kernel clears
/// at the agent's exit. One read of 4 bytes.
pub(crate) fn living_agent(mem: &crate::process::Memory, code: u64) -> Option<i32> {
    Some(agent_word(mem, code, TID) as i32).filter(|&tid| tid != 0)
}

/// Word `off` of the agent's page in the area at `code`, read through `mem` (0 when it
/// cannot be read).
fn agent_word(mem: &crate::process::Memory, code: u64, off: u64) -> u32 {
    let mut b = [0u8; 4];
    match mem.read(code + th::PAGE + th::AGENT + off, &mut b) {
        Ok(_) => u32::from_le_bytes(b),
        Err(_) => 0,
    }
}

/// Whether `tool` (the pid an agent's page names, 0 when unknown) still traces a thread of
/// process `pid`: a nonstop switch traces its borrowed thread for as long as its agent lives.
/// (TracerPid names the tracing thread: its thread group is the tool's process.)
fn tool_still_tracing(pid: i32, tool: u32) -> bool {
    let field = |path: String, name: &str| -> Option<u32> {
        let st = std::fs::read_to_string(path).ok()?;
        st.lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .parse()
            .ok()
    };
    tool != 0
        && crate::process::observe::tasks(pid).into_iter().any(|tid| {
            field(format!("/proc/{pid}/task/{tid}/status"), "TracerPid:").is_some_and(|t| {
                t != 0 && (t == tool || field(format!("/proc/{t}/status"), "Tgid:") == Some(tool))
            })
        })
}

/// Writes the agent's page before the start-up: the words, the timeout, the masks (the
/// starting thread's own: `own_mask`), and the starting thread's own context (`saved`) as it
/// must resume without the tool — a system call of its own that our stop interrupted
/// restarted, as the kernel does when no handler runs.
///
/// Through the tool's own mapping of the page (`shared`, the same memfd page): a copy, where a
/// write through /proc/PID/mem is a system call of 10–20 µs. No agent runs yet (the caller
/// checked), and the thread reads the page only after the tool's next ptrace request.
fn write_page(shared: &Shared, pid: i32, saved: &Regs, own_mask: u64) {
    // The same context the resume stub's slots hold (process/stub.rs).
    let ctx = crate::process::stub::resume_context(saved);
    let tool = if same_pid_namespace(pid) {
        std::process::id()
    } else {
        0
    };
    let mut b = vec![0u8; OPS as usize];
    b[TOOL as usize..TOOL as usize + 4].copy_from_slice(&tool.to_le_bytes());
    b[FD as usize..FD as usize + 4].copy_from_slice(&NO_FD.to_le_bytes());
    b[PATH as usize..PATH as usize + 15].copy_from_slice(b"/proc/self/mem\0");
    b[TS as usize + 8..TS as usize + 16].copy_from_slice(&WAIT_TIMEOUT_NS.to_le_bytes());
    b[ALL as usize..ALL as usize + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    b[OLD_MASK as usize..OLD_MASK as usize + 8].copy_from_slice(&own_mask.to_le_bytes());
    let regs = [
        ctx.rax, ctx.rbx, ctx.rcx, ctx.rdx, ctx.rsi, ctx.rdi, ctx.rbp, ctx.r8, ctx.r9, ctx.r10,
        ctx.r11, ctx.r12, ctx.r13, ctx.r14, ctx.r15, ctx.rip, ctx.eflags, ctx.rsp,
    ];
    for (i, r) in regs.iter().enumerate() {
        let o = CTX as usize + 8 * i;
        b[o..o + 8].copy_from_slice(&r.to_le_bytes());
    }
    shared.put(0, &b);
}

/// Whether process `pid` is in a job-control stop: the first of its threads (other than
/// `borrowed`, ours) that tells is in state T. A group stop stops every thread that nobody
/// traces (a traced one shows `t`; one exiting, `Z` or `X`, takes no part): one thread tells
/// as well as all of them once the stop is made, for one status read (each costs 20–40 µs
/// here, and there were as many as the process has threads). A stop still being made, or made
/// after the look, is missed either way; the agent then answers nothing until the process
/// runs again, and the switch syncs through ptrace (see [`ANSWER_WAIT`]).
fn job_stopped(pid: i32, borrowed: i32) -> bool {
    let state = |tid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        rest.trim_start().chars().next()
    };
    // The main thread first: no directory read when it tells (it is rarely the borrowed one).
    let others = std::iter::once(()).flat_map(|()| crate::process::observe::tasks(pid));
    std::iter::once(pid)
        .chain(others.filter(|&tid| tid != pid))
        .filter(|&tid| tid != borrowed)
        .find_map(|tid| state(tid).filter(|s| !matches!(s, 't' | 'Z' | 'X' | 'x')))
        == Some('T')
}

/// Whether the target sees the tool's pid: it shares the tool's pid namespace. (The links'
/// text names the namespace, `pid:[inode]`: a readlink is cheaper than a stat there, which
/// makes the kernel find a dentry for it; the tool's own never changes.)
fn same_pid_namespace(pid: i32) -> bool {
    static OURS: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let ours = OURS.get_or_init(|| std::fs::read_link("/proc/self/ns/pid").ok());
    ours.as_ref()
        .is_some_and(|o| std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|t| &t == o))
}

/// The signal mask of the stopped thread `tid` (PTRACE_GETSIGMASK: the mask it goes back to
/// when a system call of its own that set another one for its duration is interrupted).
fn sigmask(tid: i32) -> std::io::Result<u64> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes one sigset_t (8 bytes, `addr`) to `data`, a u64 of ours.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETSIGMASK, tid, 8usize, &mut mask as *mut u64) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(mask)
}

/// Sets the signal mask of the stopped thread `tid` (PTRACE_SETSIGMASK; SIGKILL and SIGSTOP
/// are never blocked). The kernel looks at its pending signals again when it resumes. (It
/// also forgets a mask that a system call of the thread's own set for its duration, see
/// [`sigmask`]: the thread has already made a remote call since our stop, on whose way out
/// the kernel put its own mask back, and a restarted call sets its mask again.)
fn set_sigmask(tid: i32, mask: u64) -> std::io::Result<()> {
    // SAFETY: the kernel reads one sigset_t (8 bytes, `addr`) from `data`, a u64 of ours.
    let r = unsafe { libc::ptrace(libc::PTRACE_SETSIGMASK, tid, 8usize, &mask as *const u64) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The test hook's points in the start-up (`LIVEPATCH_DEBUG_STOP=agent-start.N`, see
/// process/stop_point.rs), the borrowed thread stopped: 1, its rip at the way back; 2, every
/// signal blocked too; 3, its rip at the clone; 4, in the clone's entry stop; 5, after the
/// clone's exit stop (or a failure before it); 6, its own mask back, its own registers not.
fn start_point(n: u32) {
    crate::process::stop_point::reached_with("agent-start", n);
}

/// Runs the borrowed thread `tid` (its registers set to the clone, every signal blocked)
/// through the clone's entry and exit stops; returns clone's result, read at the exit stop,
/// which must be at `after_clone` (the instruction after its `syscall`). A signal that it was
/// about to take meanwhile (only one no mask blocks) is held (added to `held`, with its
/// siginfo). None when the thread or the process went away, or stopped elsewhere.
fn run_start_up(
    tid: i32,
    after_clone: u64,
    held: &mut Vec<(i32, crate::process::HeldSignal)>,
) -> Option<i64> {
    let mut stops = 0;
    loop {
        if ptrace::syscall(tid).is_err() {
            break None;
        }
        match ptrace::wait(tid, false) {
            Ok(Some((_, WaitStatus::Syscall))) => {
                stops += 1;
                if stops == 1 {
                    start_point(4);
                }
                if stops == 2 {
                    break ptrace::get_regs(tid)
                        .ok()
                        .filter(|r| r.rip == after_clone)
                        .map(|r| r.rax as i64);
                }
            }
            Ok(Some((_, WaitStatus::Signal(sig)))) => {
                held.push((tid, crate::process::HeldSignal::take(tid, sig)))
            }
            Ok(Some((_, WaitStatus::EventStop | WaitStatus::OtherEvent(_)))) => {}
            _ => break None,
        }
    }
}

/// The system calls of the agent's code ([`assemble`]), with the arguments it passes where they
/// are constants (0 elsewhere; every variant a filter might tell apart): the start-up's, run
/// by the borrowed thread, then the agent's own. The code is decoded against this list when
/// the borrowed thread is filtered ([`seccomp_allows`]), and a test checks that they match.
const SYSCALLS: &[Call] = &[
    Call::new(
        "rt_sigprocmask",
        libc::SYS_rt_sigprocmask,
        [libc::SIG_SETMASK as u64, 0, 0, 8, 0, 0],
    ),
    Call::new(
        "clone",
        libc::SYS_clone,
        [CLONE_FLAGS as u64, 0, 0, 0, 0, 0],
    ),
    Call::new(
        "close_range",
        libc::SYS_close_range,
        [0, u32::MAX as u64, CLOSE_RANGE_UNSHARE as u64, 0, 0, 0],
    ),
    Call::new(
        "open",
        libc::SYS_open,
        [0, (libc::O_RDWR | libc::O_CLOEXEC) as u64, 0, 0, 0, 0],
    ),
    Call::new("fstatfs", libc::SYS_fstatfs, [0; 6]),
    Call::new("close", libc::SYS_close, [0; 6]),
    Call::new(
        "futex",
        libc::SYS_futex,
        [0, libc::FUTEX_WAIT as u64, 0, 0, 0, 0],
    ),
    Call::new(
        "futex",
        libc::SYS_futex,
        [0, libc::FUTEX_WAKE as u64, 1, 0, 0, 0],
    ),
    Call::new("kill", libc::SYS_kill, [0; 6]),
    Call::new(
        "membarrier",
        libc::SYS_membarrier,
        [MEMBARRIER_SYNC_CORE as u64, 0, 0, 0, 0, 0],
    ),
    Call::new("pwrite64", libc::SYS_pwrite64, [0; 6]),
    Call::new("pread64", libc::SYS_pread64, [0; 6]),
    // The tool's calls (`SyncAgent::call`; each is vetted again with its own arguments). The
    // registration is also the agent's own, made as it starts (see `assemble`): vetted here
    // only, before the start.
    Call::new(
        "rt_sigaction",
        libc::SYS_rt_sigaction,
        [libc::SIGTRAP as u64, 0, 0, 8, 0, 0],
    ),
    Call::new(
        "membarrier",
        libc::SYS_membarrier,
        [MEMBARRIER_REGISTER_SYNC_CORE as u64, 0, 0, 0, 0, 0],
    ),
    Call::new(
        "mmap",
        libc::SYS_mmap,
        [0, 0, MMAP_PROT as u64, MMAP_FLAGS as u64, u64::MAX, 0],
    ),
    Call::new(
        "mprotect",
        libc::SYS_mprotect,
        [0, 0, MPROTECT_PROTS[0], 0, 0, 0],
    ),
    Call::new(
        "mprotect",
        libc::SYS_mprotect,
        [0, 0, MPROTECT_PROTS[1], 0, 0, 0],
    ),
    Call::new("exit", libc::SYS_exit, [0; 6]),
];

/// Whether the seccomp filters of the borrowed thread `tid` (stopped) let every system call of
/// the agent's code at `code` through. Without seccomp (nearly always) one status read.
///
/// The status is read afresh, not taken from the attach's check of this thread (`Tracee`'s
/// seccomp state): the thread, ptrace-stopped, cannot change its own filters, but another
/// thread's filter installed with TSYNC reaches it meanwhile.
fn seccomp_allows(pid: i32, tid: i32, code: u64) -> bool {
    match seccomp::mode(pid, tid) {
        Some(seccomp::Mode::Disabled) => return true,
        Some(seccomp::Mode::Strict) | None => return false,
        Some(seccomp::Mode::Filter) => {}
    }
    // The agent's code as the area's page holds it: assembled once per code address (see
    // `nonstop::generate`; this switch's `open_area` made or checked that page already), not
    // assembled again here (a CLI's switch assembled it twice: ~25 µs of CPU each with
    // iced-x86's tables built, release build; taking the kept page costs ~1.5 µs).
    let Ok(page) = super::generate(&super::Area { code, bank: 0 }) else {
        return false;
    };
    let Some(bytes) = page.get(th::AGENT_CODE as usize..) else {
        return false;
    };
    match calls_in(bytes, code + th::AGENT_CODE) {
        Some(calls) => seccomp::first_blocked(tid, &calls).is_none(),
        None => false,
    }
}

/// The system call numbers of machine code `bytes` (at `ip`): each `syscall`'s from the
/// `mov eax, imm32` that last set eax before it; None for one whose number is not such a
/// constant.
fn syscall_numbers(bytes: &[u8], ip: u64) -> Vec<Option<i64>> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    let mut number: Option<i64> = None;
    let mut numbers = Vec::new();
    for insn in Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE) {
        if insn.mnemonic() == Mnemonic::Syscall {
            numbers.push(number);
            number = None; // its result
        } else if insn.op_count() > 0
            && insn.op0_kind() == OpKind::Register
            && insn.op0_register().full_register() == Register::RAX
        {
            number = (insn.mnemonic() == Mnemonic::Mov && insn.op1_kind() == OpKind::Immediate32)
                .then(|| i64::from(insn.immediate32()));
        }
    }
    numbers
}

/// The calls of the agent's code `bytes` at `ip` ([`SYSCALLS`]' entries for each of its system
/// calls); None when one is not a constant or not listed.
fn calls_in(bytes: &[u8], ip: u64) -> Option<Vec<Call>> {
    let mut calls = Vec::new();
    for nr in syscall_numbers(bytes, ip) {
        let nr = nr?;
        let listed: Vec<Call> = SYSCALLS.iter().filter(|c| c.nr == nr).copied().collect();
        if listed.is_empty() {
            return None;
        }
        calls.extend(listed);
    }
    Some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merged run's patch list: one patch per stretch of our bytes (offset, length, bytes),
    /// none for the bytes between them, which the agent reads and writes back as they are.
    #[test]
    fn a_merged_run_lists_only_its_sites_bytes() {
        let mut bytes = vec![0u8; 300];
        let mut mask = vec![false; 300];
        for (at, data) in [(0usize, &[0xcc][..]), (7, &[1, 2, 3, 4]), (295, &[9; 5])] {
            bytes[at..at + data.len()].copy_from_slice(data);
            mask[at..at + data.len()].fill(true);
        }
        let op = Op::Merge {
            addr: 0x1000,
            bytes,
            mask,
        };
        let (list, n) = op.patch_list();
        assert_eq!(n, 3);
        let want: Vec<u8> = [
            &[0, 0, 1, 0, 0xcc][..],
            &[7, 0, 4, 0, 1, 2, 3, 4],
            &[39, 1, 5, 0, 9, 9, 9, 9, 9],
        ]
        .concat();
        assert_eq!(list, want);
        assert_eq!(op.data_len(), 24);
        assert!(fits(&[op.clone(), Op::Step(Step::Sync)]));
        let long = Op::Merge {
            addr: 0,
            bytes: vec![0; MAX_RUN + 1],
            mask: vec![true; MAX_RUN + 1],
        };
        assert!(!fits(&[long]));
    }

    /// `seccomp_allows` decodes the agent's code from the area's page: the same bytes.
    #[test]
    fn the_areas_page_holds_the_agents_code() {
        let code = 0x7000_0000_0000;
        let page = super::super::generate(&super::super::Area { code, bank: 0 }).unwrap();
        assert_eq!(page[th::AGENT_CODE as usize..], generate(code).unwrap()[..]);
    }

    #[test]
    fn the_agent_code_fits_and_decodes() {
        let code = 0x7000_0000_0000;
        let bytes = generate(code).unwrap();
        let mut d = iced_x86::Decoder::with_ip(
            64,
            &bytes,
            code + th::AGENT_CODE,
            iced_x86::DecoderOptions::NONE,
        );
        let mut syscalls = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            assert!(!i.is_invalid());
            if i.mnemonic() == iced_x86::Mnemonic::Syscall {
                syscalls.push(i.ip());
            }
        }
        // start-up: sigprocmask, clone, sigprocmask; agent: close_range, open, fstatfs, close
        // (not procfs), membarrier (the registration), futex wait, kill, membarrier (a sync
        // request), pwrite, pread and pwrite (a merged run), rt_sigaction, membarrier, mmap and
        // mprotect (the tool's calls), membarrier (a program's sync), futex wake, exit.
        assert_eq!(syscalls.len(), 21);
        // Where the tool puts the starting thread (see `SyncAgent::start`): the clone, right
        // after the first call (CLONE_AT), whose exit stop it expects after the second
        // (CLONE_CALL); the way back, the parent's path after the clone (WAY_BACK), whose
        // first call sets the mask in OLD_MASK.
        let start = code + th::AGENT_CODE;
        assert_eq!(syscalls[0] + 2, start + CLONE_AT);
        assert_eq!(syscalls[1], start + CLONE_CALL);
        let decode = |off: u64| {
            iced_x86::Decoder::with_ip(
                64,
                &bytes[off as usize..],
                start + off,
                iced_x86::DecoderOptions::NONE,
            )
            .into_iter()
            .take(6)
            .collect::<Vec<_>>()
        };
        let clone_at = decode(CLONE_AT)[0];
        assert_eq!(clone_at.op0_register(), iced_x86::Register::EAX);
        assert_eq!(i64::from(clone_at.immediate32()), libc::SYS_clone);
        let after_clone = decode(CLONE_CALL + 2);
        assert_eq!(after_clone[0].mnemonic(), iced_x86::Mnemonic::Test);
        assert_eq!(after_clone[1].mnemonic(), iced_x86::Mnemonic::Je);
        assert_eq!(after_clone[2].ip(), start + WAY_BACK);
        let way_back = decode(WAY_BACK);
        assert_eq!(way_back[0].op0_register(), iced_x86::Register::EAX);
        assert_eq!(
            i64::from(way_back[0].immediate32()),
            libc::SYS_rt_sigprocmask
        );
        assert_eq!(way_back[1].immediate32(), libc::SIG_SETMASK as u32);
        assert_eq!(way_back[2].memory_displacement64(), OLD_MASK);
        assert_eq!(way_back[5].mnemonic(), iced_x86::Mnemonic::Syscall);
        assert_eq!(syscalls[2], way_back[5].ip());
        // The landmarks a cancelled program is resolved by: the two operations' system calls,
        // each after its claim, and the answer after both.
        let (_, l) = assemble(code).unwrap();
        assert!(syscalls.contains(&l.write_call) && syscalls.contains(&l.sync_call));
        assert!(syscalls.contains(&l.merge_call) && l.write_call < l.merge_op);
        assert!(l.merge_op < l.merge_call && l.merge_call < l.sync_op);
        assert!(l.before_the_call(l.merge_op) && l.before_the_call(l.merge_call));
        assert!(!l.before_the_call(l.merge_call + 2));
        assert!(l.claimed < l.write_call && l.write_call < l.sync_op);
        assert!(l.sync_op < l.sync_call && l.sync_call < l.publish);
        assert!(l.before_the_call(l.claimed) && l.before_the_call(l.sync_call));
        // The claim holds from the instruction right after the compare-and-swap: the `jne`
        // that leaves when it failed (review 7, finding 4).
        let at = |ip: u64| {
            let off = (ip - code - th::AGENT_CODE) as usize;
            iced_x86::Decoder::with_ip(64, &bytes[off..], ip, iced_x86::DecoderOptions::NONE)
                .decode()
        };
        assert_eq!(at(l.claimed).mnemonic(), iced_x86::Mnemonic::Jne);
        let cas = (code + th::AGENT_CODE..l.claimed).rev().find(|&ip| {
            at(ip).mnemonic() == iced_x86::Mnemonic::Cmpxchg && at(ip).next_ip() == l.claimed
        });
        assert!(cas.is_some(), "the claim's cmpxchg right before `claimed`");
        assert!(!l.before_the_call(l.write_call + 2) && !l.before_the_call(l.sync_call + 2));
        // The tool's signal action call: claimed like a write, resolved the same way.
        assert!(syscalls.contains(&l.sigaction_call));
        assert!(l.merge_call < l.sigaction_op && l.sigaction_op < l.sigaction_call);
        assert!(l.before_the_call(l.sigaction_op) && l.before_the_call(l.sigaction_call));
        assert!(!l.before_the_call(l.sigaction_call + 2));
        // The patch memory's calls: the same.
        for (op, call) in [(l.mmap_op, l.mmap_call), (l.mprotect_op, l.mprotect_call)] {
            assert!(syscalls.contains(&call) && op < call);
            assert!(l.before_the_call(op) && l.before_the_call(call));
            assert!(!l.before_the_call(call + 2));
        }
        // A mapping's result is stored a few instructions after its call.
        assert!(l.mmap_unstored(l.mmap_call + 2) && !l.mmap_unstored(l.mmap_stored));
        assert!(l.mmap_stored > l.mmap_call + 2 && l.mmap_stored < l.mprotect_op);
        assert!(!l.before_the_call(l.publish));
    }
}

#[cfg(test)]
mod seccomp_lists {
    use super::*;
    use std::collections::BTreeSet;

    const CODE: u64 = 0x7f12_3456_0000;

    /// The agent's code makes exactly the system calls [`SYSCALLS`] lists, each a constant:
    /// the list checked against a target's filters cannot drift from the code.
    #[test]
    fn the_agents_system_calls_are_the_listed_ones() {
        let bytes = generate(CODE).unwrap();
        let numbers = syscall_numbers(&bytes, CODE + th::AGENT_CODE);
        assert!(numbers.iter().all(Option::is_some), "{numbers:?}");
        let used: BTreeSet<i64> = numbers.into_iter().flatten().collect();
        let listed: BTreeSet<i64> = SYSCALLS.iter().map(|c| c.nr).collect();
        assert_eq!(used, listed);
        assert!(calls_in(&bytes, CODE + th::AGENT_CODE).is_some());
        // A call the list does not know makes the whole code unknown.
        let mut more = bytes.clone();
        more.extend([0xb8, 0x3b, 0, 0, 0, 0x0f, 0x05]); // mov eax, 59 (execve); syscall
        assert!(calls_in(&more, CODE + th::AGENT_CODE).is_none());
        // So does a number that is not a constant.
        let unknown = [0x89, 0xd8, 0x0f, 0x05]; // mov eax, ebx; syscall
        assert_eq!(syscall_numbers(&unknown, CODE), vec![None]);
    }

    /// Nonstop mode's SIGTRAP handler and restorer make only calls of the list an apply checks
    /// (seccomp::calls::TRAP_HANDLER), each a constant.
    #[test]
    fn the_trap_handlers_system_calls_are_listed() {
        let (handler, restorer) = th::generate(CODE).unwrap();
        let mut numbers = syscall_numbers(&handler, CODE);
        numbers.extend(syscall_numbers(&restorer, CODE + th::RESTORER_OFF));
        assert!(
            numbers.len() >= 2 && numbers.iter().all(Option::is_some),
            "{numbers:?}"
        );
        let listed: BTreeSet<i64> = seccomp::calls::TRAP_HANDLER.iter().map(|c| c.nr).collect();
        let used: BTreeSet<i64> = numbers.into_iter().flatten().collect();
        assert_eq!(used, listed);
    }
}

//! Which registers may a function change, as seen by its caller?
//!
//! gcc's `-fipa-ra` lets a caller keep values in caller-saved registers across a call when it can
//! see that the callee never touches them. A replacement function may touch more, so the adapter
//! wraps it in a thunk that saves and restores `(new - old) ∩ caller-saved`
//! ([`registers_to_preserve`]). This module computes the sets, from the functions' bytes only.
//!
//! The two sides need opposite approximations. For the replacement, [`clobbered_registers`] is an
//! *upper* bound of what it may change (calls count as the whole caller-saved set). For the
//! function being replaced, what matters is what gcc *believed* when it compiled the callers; gcc
//! may know a local callee's exact set, so assuming "a call clobbers everything" there would hide
//! registers callers rely on. [`written_registers`] is a *lower* bound instead: the writes of the
//! old function's own reachable instructions.
//!
//! The analysis follows the function's own control flow from the entry (only reachable
//! instructions count; jumps and conditional branches within the function are followed) and
//! tracks, per instruction, which general-purpose registers still hold their entry value and
//! which stack slots hold a saved entry value. So `push rbx … pop rbx` preserves `rbx`, and so
//! does `push rbp; mov rbp,rsp; … leave`. A register counts as clobbered when some reachable
//! instruction writes it (any sub-register counts for the whole register) and it is not back to
//! its entry value at every exit.
//!
//! Conservative rules (each errs towards "clobbered"):
//! - a call to elsewhere (direct or indirect), or a jump out of the function (a tail call),
//!   clobbers the whole [`SYSV_CALLER_SAVED`] set;
//! - flags and vector/x87 registers are never considered restored once written;
//! - an indirect jump (a switch jump table) makes the analysis fall back to every instruction of
//!   the function, in address order, without restore credit, plus the caller-saved set;
//! - the stack pointer is assumed balanced (a function returns with `rsp` as it found it) and is
//!   never reported; writes through pointers other than `rsp`/`rbp` are assumed not to hit the
//!   function's own saved-register slots.
//!
//! Uses `alloc` (iced-x86's instruction-info factory and a per-instruction state table): this is
//! planning code, never on the trap path.

extern crate alloc;

use alloc::vec::Vec;

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory,
    OpAccess, OpKind, Register,
};

bitflags::bitflags! {
    /// A set of x86-64 registers: general-purpose registers in hardware order, the flags,
    /// `xmm0`–`xmm15` (standing for their `ymm`/`zmm` extensions too), the x87/MMX state and the
    /// AVX-512-only registers.
    ///
    /// ```
    /// use lp_core::clobber::{Regs, SYSV_CALLER_SAVED};
    /// assert!(SYSV_CALLER_SAVED.contains(Regs::RDX | Regs::XMM7 | Regs::FLAGS));
    /// assert!(!SYSV_CALLER_SAVED.contains(Regs::RBX));
    /// assert_eq!(Regs::gpr(2), Regs::RDX);
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Regs: u64 {
        /// `rax` (and `eax`, `ax`, `al`, `ah`).
        const RAX = 1 << 0;
        /// `rcx`.
        const RCX = 1 << 1;
        /// `rdx`.
        const RDX = 1 << 2;
        /// `rbx`.
        const RBX = 1 << 3;
        /// `rsp` (never reported by the analysis: assumed balanced).
        const RSP = 1 << 4;
        /// `rbp`.
        const RBP = 1 << 5;
        /// `rsi`.
        const RSI = 1 << 6;
        /// `rdi`.
        const RDI = 1 << 7;
        /// `r8`.
        const R8 = 1 << 8;
        /// `r9`.
        const R9 = 1 << 9;
        /// `r10`.
        const R10 = 1 << 10;
        /// `r11`.
        const R11 = 1 << 11;
        /// `r12`.
        const R12 = 1 << 12;
        /// `r13`.
        const R13 = 1 << 13;
        /// `r14`.
        const R14 = 1 << 14;
        /// `r15`.
        const R15 = 1 << 15;
        /// The arithmetic flags (`rflags`).
        const FLAGS = 1 << 16;
        /// `xmm0` (with `ymm0`/`zmm0`).
        const XMM0 = 1 << 17;
        /// `xmm1`.
        const XMM1 = 1 << 18;
        /// `xmm2`.
        const XMM2 = 1 << 19;
        /// `xmm3`.
        const XMM3 = 1 << 20;
        /// `xmm4`.
        const XMM4 = 1 << 21;
        /// `xmm5`.
        const XMM5 = 1 << 22;
        /// `xmm6`.
        const XMM6 = 1 << 23;
        /// `xmm7`.
        const XMM7 = 1 << 24;
        /// `xmm8`.
        const XMM8 = 1 << 25;
        /// `xmm9`.
        const XMM9 = 1 << 26;
        /// `xmm10`.
        const XMM10 = 1 << 27;
        /// `xmm11`.
        const XMM11 = 1 << 28;
        /// `xmm12`.
        const XMM12 = 1 << 29;
        /// `xmm13`.
        const XMM13 = 1 << 30;
        /// `xmm14`.
        const XMM14 = 1 << 31;
        /// `xmm15`.
        const XMM15 = 1 << 32;
        /// The x87 register stack and MMX registers.
        const X87 = 1 << 33;
        /// AVX-512-only state: `xmm16`–`xmm31`, mask registers `k0`–`k7`, AMX tiles.
        const OTHER_VECTOR = 1 << 34;
    }
}

/// All sixteen general-purpose registers.
///
/// ```
/// use lp_core::clobber::{Regs, GPRS};
/// assert!(GPRS.contains(Regs::RAX | Regs::R15) && !GPRS.contains(Regs::FLAGS));
/// ```
pub const GPRS: Regs = Regs::from_bits_truncate(0xffff);
/// `xmm0`–`xmm15`.
///
/// ```
/// use lp_core::clobber::{Regs, XMMS};
/// assert_eq!(XMMS.bits().count_ones(), 16);
/// assert!(XMMS.contains(Regs::XMM0 | Regs::XMM15));
/// ```
pub const XMMS: Regs = Regs::from_bits_truncate(0xffff << 17);

/// Registers a SysV x86-64 callee may change without restoring them: `rax rcx rdx rsi rdi
/// r8–r11`, the flags, every vector register and the x87 state.
///
/// ```
/// use lp_core::clobber::{Regs, SYSV_CALLER_SAVED};
/// assert!(SYSV_CALLER_SAVED.contains(Regs::RAX | Regs::R11 | Regs::XMM15 | Regs::FLAGS));
/// assert!(!SYSV_CALLER_SAVED.intersects(Regs::RBX | Regs::R12));
/// ```
pub const SYSV_CALLER_SAVED: Regs = Regs::RAX
    .union(Regs::RCX)
    .union(Regs::RDX)
    .union(Regs::RSI)
    .union(Regs::RDI)
    .union(Regs::R8)
    .union(Regs::R9)
    .union(Regs::R10)
    .union(Regs::R11)
    .union(Regs::FLAGS)
    .union(XMMS)
    .union(Regs::X87)
    .union(Regs::OTHER_VECTOR);

/// Registers a SysV x86-64 callee must give back unchanged: `rbx rsp rbp r12–r15`.
///
/// ```
/// use lp_core::clobber::{GPRS, SYSV_CALLEE_SAVED, SYSV_CALLER_SAVED};
/// assert_eq!(SYSV_CALLEE_SAVED | (SYSV_CALLER_SAVED & GPRS), GPRS);
/// ```
pub const SYSV_CALLEE_SAVED: Regs = Regs::RBX
    .union(Regs::RSP)
    .union(Regs::RBP)
    .union(Regs::R12)
    .union(Regs::R13)
    .union(Regs::R14)
    .union(Regs::R15);

impl Regs {
    /// The general-purpose register with hardware number `n` (0 = `rax` … 15 = `r15`); empty
    /// for other numbers.
    ///
    /// ```
    /// use lp_core::clobber::Regs;
    /// assert_eq!(Regs::gpr(15), Regs::R15);
    /// assert!(Regs::gpr(16).is_empty());
    /// ```
    pub const fn gpr(n: usize) -> Regs {
        if n < 16 {
            Regs::from_bits_truncate(1 << n)
        } else {
            Regs::empty()
        }
    }

    /// `xmm<n>` for n in 0..16; empty otherwise.
    ///
    /// ```
    /// use lp_core::clobber::Regs;
    /// assert_eq!(Regs::xmm(3), Regs::XMM3);
    /// ```
    pub const fn xmm(n: usize) -> Regs {
        if n < 16 {
            Regs::from_bits_truncate(1 << (17 + n))
        } else {
            Regs::empty()
        }
    }

    /// The set a write to iced-x86 register `reg` (or any of its sub-registers) touches.
    fn of(reg: Register) -> Regs {
        let full = reg.full_register();
        if full.is_gpr64() {
            Regs::gpr(full.number())
        } else if full.is_zmm() {
            match full.number() {
                n @ 0..=15 => Regs::xmm(n),
                _ => Regs::OTHER_VECTOR,
            }
        } else if full.is_st() || full.is_mm() {
            Regs::X87
        } else if full.is_k() || full.is_tmm() {
            Regs::OTHER_VECTOR
        } else {
            Regs::empty()
        }
    }
}

/// Why the analysis cannot run. `Display` is one line naming the problem.
///
/// ```
/// use lp_core::clobber::{clobbered_registers, ClobberError};
/// let err = clobbered_registers(&[0x90, 0xb8, 0x01], 0x1000).unwrap_err(); // mov eax,imm32 cut short
/// assert_eq!(err, ClobberError::TruncatedInstruction { addr: 0x1001 });
/// assert_eq!(err.to_string(), "instruction at 0x1001 runs past the end of the function");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ClobberError {
    /// No bytes were given.
    #[error("function at {entry:#x} has no bytes")]
    Empty {
        /// The function's entry.
        entry: u64,
    },
    /// An instruction iced-x86 cannot decode.
    #[error("undecodable instruction at {addr:#x}")]
    UndecodableInstruction {
        /// Its address.
        addr: u64,
    },
    /// An instruction runs past the end of the function.
    #[error("instruction at {addr:#x} runs past the end of the function")]
    TruncatedInstruction {
        /// Its address.
        addr: u64,
    },
}

/// The registers the function at `entry` (bytes `code`, the symbol's size) may leave changed
/// for its caller. Never contains [`Regs::RSP`].
///
/// ```
/// use lp_core::clobber::{clobbered_registers, Regs, SYSV_CALLER_SAVED};
/// // push rbx; mov ebx,edi; lea eax,[rbx+1]; xor edx,edx; pop rbx; ret
/// let code = [0x53, 0x89, 0xfb, 0x8d, 0x43, 0x01, 0x31, 0xd2, 0x5b, 0xc3];
/// let regs = clobbered_registers(&code, 0x1000).unwrap();
/// assert_eq!(regs, Regs::RAX | Regs::RDX | Regs::FLAGS); // rbx was saved and restored
/// // call elsewhere; ret
/// let code = [0xe8, 0x00, 0x10, 0x00, 0x00, 0xc3];
/// assert_eq!(clobbered_registers(&code, 0x1000).unwrap(), SYSV_CALLER_SAVED);
/// ```
pub fn clobbered_registers(code: &[u8], entry: u64) -> Result<Regs, ClobberError> {
    if code.is_empty() {
        return Err(ClobberError::Empty { entry });
    }
    let instrs = decode_all(code, entry)?;
    let mut analysis = Analysis::new(&instrs);
    if analysis.run().is_ok() {
        Ok(analysis.result())
    } else {
        Ok(linear_fallback(&instrs))
    }
}

/// The registers the function's own reachable instructions write, calls' effects left out: a
/// *lower* bound of the clobber set gcc recorded for it under `-fipa-ra` (gcc counts every
/// register its instructions set, plus its callees' sets). Use it for the function being
/// replaced, and [`clobbered_registers`] (an upper bound) for the replacement; see
/// [`registers_to_preserve`].
///
/// ```
/// use lp_core::clobber::{written_registers, Regs};
/// // mov edx,1; call elsewhere; ret
/// let code = [0xba, 1, 0, 0, 0, 0xe8, 0x00, 0x10, 0x00, 0x00, 0xc3];
/// assert_eq!(written_registers(&code, 0x1000).unwrap(), Regs::RDX);
/// ```
pub fn written_registers(code: &[u8], entry: u64) -> Result<Regs, ClobberError> {
    if code.is_empty() {
        return Err(ClobberError::Empty { entry });
    }
    let instrs = decode_all(code, entry)?;
    let mut analysis = Analysis::new(&instrs);
    // giving up (an indirect jump) leaves the instructions seen so far: still reachable, still
    // a lower bound
    let _ = analysis.run();
    Ok(analysis.own_writes - Regs::RSP)
}

/// The caller-saved registers a thunk around the replacement must save and restore so that
/// callers of the old function compiled with `-fipa-ra` keep what they rely on:
/// `(clobbered_registers(new) - written_registers(old)) ∩ SYSV_CALLER_SAVED`.
///
/// Over-approximating the new function's clobbers and under-approximating the old one's both err
/// towards saving more.
///
/// ```
/// use lp_core::clobber::{registers_to_preserve, Regs};
/// let old = [0x8d, 0x04, 0x37, 0xc3];         // lea eax,[rdi+rsi]; ret
/// let new = [0x89, 0xf8, 0x31, 0xd2, 0xc3];   // mov eax,edi; xor edx,edx; ret
/// assert_eq!(
///     registers_to_preserve(&old, 0x1000, &new, 0x2000).unwrap(),
///     Regs::RDX | Regs::FLAGS
/// );
/// ```
pub fn registers_to_preserve(
    old_code: &[u8],
    old_entry: u64,
    new_code: &[u8],
    new_entry: u64,
) -> Result<Regs, ClobberError> {
    let old = written_registers(old_code, old_entry)?;
    let new = clobbered_registers(new_code, new_entry)?;
    Ok((new - old) & SYSV_CALLER_SAVED)
}

fn decode_all(code: &[u8], entry: u64) -> Result<Vec<Instruction>, ClobberError> {
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let addr = decoder.ip();
        let instr = decoder.decode();
        if instr.is_invalid() {
            return Err(match decoder.last_error() {
                DecoderError::NoMoreBytes => ClobberError::TruncatedInstruction { addr },
                _ => ClobberError::UndecodableInstruction { addr },
            });
        }
        out.push(instr);
    }
    Ok(out)
}

/// Registers an instruction writes (full registers; `rsp` excluded), flags included.
fn written(factory: &mut InstructionInfoFactory, instr: &Instruction) -> Regs {
    let mut regs = Regs::empty();
    for used in factory.info(instr).used_registers() {
        if matches!(
            used.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        ) {
            regs |= Regs::of(used.register());
        }
    }
    if instr.rflags_modified() != 0 {
        regs |= Regs::FLAGS;
    }
    regs - Regs::RSP
}

/// The conservative answer: every write of every instruction, plus a call's clobbers.
fn linear_fallback(instrs: &[Instruction]) -> Regs {
    let mut factory = InstructionInfoFactory::new();
    let mut regs = SYSV_CALLER_SAVED;
    for instr in instrs {
        regs |= written(&mut factory, instr);
    }
    regs - Regs::RSP
}

const MAX_SLOTS: usize = 16;

/// What is known at one program point (a must-analysis: meets only lose knowledge).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct State {
    /// General-purpose registers still holding their entry value.
    intact: Regs,
    /// `rsp - rsp_at_entry`, when known.
    depth: Option<i64>,
    /// `rbp - rsp_at_entry` after `mov rbp, rsp`, when known.
    frame: Option<i64>,
    /// Stack slots (offset from the entry `rsp`) holding a register's entry value.
    slots: [Option<(i64, Regs)>; MAX_SLOTS],
}

impl State {
    fn entry() -> State {
        State {
            intact: GPRS,
            depth: Some(0),
            frame: None,
            slots: [None; MAX_SLOTS],
        }
    }

    fn meet(&self, other: &State) -> State {
        let mut slots = [None; MAX_SLOTS];
        let mut n = 0;
        for s in self.slots.iter().flatten() {
            if other.slots.contains(&Some(*s)) {
                slots[n] = Some(*s);
                n += 1;
            }
        }
        State {
            intact: self.intact & other.intact,
            depth: if self.depth == other.depth {
                self.depth
            } else {
                None
            },
            frame: if self.frame == other.frame {
                self.frame
            } else {
                None
            },
            slots,
        }
    }

    fn slot(&self, off: i64) -> Option<Regs> {
        self.slots
            .iter()
            .flatten()
            .find(|(o, _)| *o == off)
            .map(|(_, r)| *r)
    }

    fn forget_slots(&mut self, start: i64, len: i64) {
        for s in self.slots.iter_mut() {
            if let Some((off, _)) = *s {
                if off < start + len && start < off + 8 {
                    *s = None;
                }
            }
        }
    }

    fn save(&mut self, off: i64, reg: Regs) {
        self.forget_slots(off, 8);
        if let Some(free) = self.slots.iter_mut().find(|s| s.is_none()) {
            *free = Some((off, reg));
        }
    }
}

/// The analysis could not follow the control flow (an indirect jump).
struct GaveUp;

struct Analysis<'a> {
    instrs: &'a [Instruction],
    states: Vec<Option<State>>,
    factory: InstructionInfoFactory,
    writes: Regs,
    /// Writes by the function's own reachable instructions (no call effects).
    own_writes: Regs,
    /// Meet of the states at every exit (return or tail call); `None` before any exit is seen.
    at_exit: Option<Regs>,
}

impl<'a> Analysis<'a> {
    fn new(instrs: &'a [Instruction]) -> Self {
        Analysis {
            instrs,
            states: alloc::vec![None; instrs.len()],
            factory: InstructionInfoFactory::new(),
            writes: Regs::empty(),
            own_writes: Regs::empty(),
            at_exit: None,
        }
    }

    fn index_of(&self, addr: u64) -> Option<usize> {
        self.instrs.binary_search_by_key(&addr, |i| i.ip()).ok()
    }

    fn inside(&self, addr: u64) -> bool {
        let first = self.instrs[0].ip();
        let last = self.instrs[self.instrs.len() - 1].next_ip();
        (first..last).contains(&addr)
    }

    fn exit(&mut self, intact: Regs) {
        self.at_exit = Some(self.at_exit.map_or(intact, |e| e & intact));
    }

    fn run(&mut self) -> Result<(), GaveUp> {
        let mut work = Vec::new();
        self.states[0] = Some(State::entry());
        work.push(0usize);
        while let Some(i) = work.pop() {
            let Some(state) = self.states[i] else {
                continue;
            };
            let instr = self.instrs[i];
            let mut out = state;
            self.transfer(&instr, &mut out);
            let mut succ = |this: &mut Self, addr: u64, s: State| -> Result<(), GaveUp> {
                // a target between decoded boundaries: overlapping code we do not model
                let j = this.index_of(addr).ok_or(GaveUp)?;
                let merged = match this.states[j] {
                    None => s,
                    Some(old) => old.meet(&s),
                };
                if this.states[j] != Some(merged) {
                    this.states[j] = Some(merged);
                    work.push(j);
                }
                Ok(())
            };
            let next = instr.next_ip();
            match instr.flow_control() {
                FlowControl::Next | FlowControl::Interrupt => {
                    if self.inside(next) {
                        succ(self, next, out)?;
                    }
                }
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                    let target = instr.near_branch_target();
                    if self.inside(target) {
                        succ(self, target, out)?;
                    } else {
                        self.tail_call(out);
                    }
                    if instr.flow_control() == FlowControl::ConditionalBranch && self.inside(next) {
                        succ(self, next, out)?;
                    }
                }
                FlowControl::Call | FlowControl::IndirectCall => {
                    let target = instr.near_branch_target();
                    let mut after = out;
                    if instr.flow_control() == FlowControl::Call && self.inside(target) {
                        // a call into our own body: follow it as well
                        let mut callee = out;
                        callee.depth = callee.depth.map(|d| d - 8);
                        succ(self, target, callee)?;
                    }
                    after.intact -= SYSV_CALLER_SAVED;
                    self.writes |= SYSV_CALLER_SAVED;
                    if self.inside(next) {
                        succ(self, next, after)?;
                    }
                }
                FlowControl::Return => {
                    let intact = if out.depth == Some(0) {
                        out.intact
                    } else {
                        Regs::empty()
                    };
                    self.exit(intact);
                }
                FlowControl::XbeginXabortXend => {
                    if instr.op_count() > 0 && instr.op0_kind() == OpKind::NearBranch64 {
                        succ(self, instr.near_branch_target(), out)?;
                    }
                    if self.inside(next) {
                        succ(self, next, out)?;
                    }
                }
                FlowControl::IndirectBranch => return Err(GaveUp),
                FlowControl::Exception => {} // ud2 and friends: the path ends
            }
        }
        Ok(())
    }

    fn tail_call(&mut self, state: State) {
        self.writes |= SYSV_CALLER_SAVED;
        let intact = if state.depth == Some(0) {
            state.intact - SYSV_CALLER_SAVED
        } else {
            Regs::empty()
        };
        self.exit(intact);
    }

    /// The effect of one instruction on the state; records its writes.
    fn transfer(&mut self, instr: &Instruction, s: &mut State) {
        let w = written(&mut self.factory, instr);
        self.writes |= w;
        self.own_writes |= w;
        let reg0 = if instr.op_count() > 0 && instr.op0_kind() == OpKind::Register {
            instr.op0_register()
        } else {
            Register::None
        };
        let reg1 = if instr.op_count() > 1 && instr.op1_kind() == OpKind::Register {
            instr.op1_register()
        } else {
            Register::None
        };
        // stack-slot writes through rsp/rbp forget what those slots held
        for mem in self.factory.info(instr).used_memory() {
            if !matches!(
                mem.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                continue;
            }
            let base = match mem.base() {
                Register::RSP => s.depth,
                Register::RBP if s.frame.is_some() => s.frame,
                // rbp still holds the caller's frame pointer: not our slots
                Register::RBP if s.intact.contains(Regs::RBP) => continue,
                Register::RBP => None,
                _ => continue, // other pointers: assumed not to alias saved slots
            };
            match base {
                Some(b) if mem.index() == Register::None => {
                    let len = (mem.memory_size().size() as i64).max(1);
                    s.forget_slots(b.wrapping_add(mem.displacement() as i64), len)
                }
                _ => s.slots = [None; MAX_SLOTS],
            }
        }
        match instr.code() {
            Code::Push_r64 => {
                let r = Regs::of(reg0);
                s.depth = s.depth.map(|d| d - 8);
                if let Some(d) = s.depth {
                    if s.intact.contains(r) && !r.contains(Regs::RSP) {
                        s.save(d, r);
                    } else {
                        s.forget_slots(d, 8);
                    }
                }
                return;
            }
            Code::Pop_r64 => {
                let r = Regs::of(reg0);
                match s.depth {
                    Some(d) if s.slot(d) == Some(r) => s.intact |= r,
                    _ => s.intact -= r,
                }
                if let Some(d) = s.depth {
                    s.forget_slots(d, 8);
                }
                s.depth = s.depth.map(|d| d + 8);
                if r.contains(Regs::RBP) {
                    s.frame = None;
                }
                return;
            }
            Code::Leavew | Code::Leaved | Code::Leaveq => {
                s.depth = s.frame;
                match s.depth {
                    Some(d) if s.slot(d) == Some(Regs::RBP) => s.intact |= Regs::RBP,
                    _ => s.intact -= Regs::RBP,
                }
                if let Some(d) = s.depth {
                    s.forget_slots(d, 8);
                }
                s.depth = s.depth.map(|d| d + 8);
                s.frame = None;
                return;
            }
            Code::Pushq_imm8 | Code::Pushq_imm32 | Code::Push_rm64 | Code::Pushfq => {
                s.depth = s.depth.map(|d| d - 8);
                if let Some(d) = s.depth {
                    s.forget_slots(d, 8);
                }
                s.intact -= w;
                return;
            }
            Code::Popfq | Code::Pop_rm64 => {
                if let Some(d) = s.depth {
                    s.forget_slots(d, 8);
                }
                s.depth = s.depth.map(|d| d + 8);
                s.intact -= w;
                return;
            }
            _ => {}
        }
        if reg0 == Register::RSP {
            s.depth = match instr.code() {
                Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32 => s
                    .depth
                    .and_then(|d| d.checked_sub(instr.immediate(1) as i64)),
                Code::Add_rm64_imm8 | Code::Add_rm64_imm32 => s
                    .depth
                    .and_then(|d| d.checked_add(instr.immediate(1) as i64)),
                Code::Mov_r64_rm64 | Code::Mov_rm64_r64 if reg1 == Register::RBP => s.frame,
                Code::Lea_r64_m if instr.memory_index() == Register::None => {
                    let base = match instr.memory_base() {
                        Register::RSP => s.depth,
                        Register::RBP => s.frame,
                        _ => None,
                    };
                    base.map(|b| b.wrapping_add(instr.memory_displacement64() as i64))
                }
                _ => None,
            };
            if s.depth.is_none() {
                s.slots = [None; MAX_SLOTS];
            }
        } else if reg0 == Register::RBP
            && reg1 == Register::RSP
            && matches!(instr.code(), Code::Mov_r64_rm64 | Code::Mov_rm64_r64)
        {
            s.frame = s.depth;
        } else if w.contains(Regs::RBP) {
            s.frame = None;
        }
        s.intact -= w;
    }

    fn result(&self) -> Regs {
        let restored = match self.at_exit {
            Some(intact) => intact & GPRS,
            None => Regs::empty(), // never returns: whatever it writes stays written
        };
        (self.writes - restored) - Regs::RSP
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clobbers(code: &[u8]) -> Regs {
        clobbered_registers(code, 0x1000).unwrap()
    }

    #[test]
    fn sub_registers_count_for_the_full_register() {
        // mov al,1 ; mov r9w,2 ; ret
        assert_eq!(
            clobbers(&[0xb0, 0x01, 0x66, 0x41, 0xb9, 0x02, 0x00, 0xc3]),
            Regs::RAX | Regs::R9
        );
    }

    #[test]
    fn frame_pointer_with_leave_is_preserved() {
        // push rbp; mov rbp,rsp; mov [rbp-4],edi; mov eax,[rbp-4]; leave; ret
        let code = [
            0x55, 0x48, 0x89, 0xe5, 0x89, 0x7d, 0xfc, 0x8b, 0x45, 0xfc, 0xc9, 0xc3,
        ];
        assert_eq!(clobbers(&code), Regs::RAX);
    }

    #[test]
    fn pop_into_another_register_is_a_clobber() {
        // push rbx; pop rcx; ret
        assert_eq!(clobbers(&[0x53, 0x59, 0xc3]), Regs::RCX);
        // push rbx; mov ebx,1; pop rbx; ret  -> preserved
        assert_eq!(
            clobbers(&[0x53, 0xbb, 1, 0, 0, 0, 0x5b, 0xc3]),
            Regs::empty()
        );
    }

    #[test]
    fn a_path_that_skips_the_restore_clobbers() {
        // 0: push rbx; 1: mov ebx,edi; 3: test edi,edi; 5: je 9; 7: pop rbx; 8: ret; 9: add rsp,8; d: ret
        let code = [
            0x53, 0x89, 0xfb, 0x85, 0xff, 0x74, 0x02, 0x5b, 0xc3, 0x48, 0x83, 0xc4, 0x08, 0xc3,
        ];
        assert_eq!(clobbers(&code), Regs::RBX | Regs::FLAGS);
    }

    #[test]
    fn overwritten_save_slot_is_not_a_restore() {
        // push rbx; mov qword [rsp],0; mov ebx,1; pop rbx; ret
        let code = [
            0x53, 0x48, 0xc7, 0x04, 0x24, 0, 0, 0, 0, 0xbb, 1, 0, 0, 0, 0x5b, 0xc3,
        ];
        assert_eq!(clobbers(&code), Regs::RBX);
    }

    #[test]
    fn unreachable_code_does_not_count() {
        // xor eax,eax; ret; mov edx,1 (dead)
        assert_eq!(
            clobbers(&[0x31, 0xc0, 0xc3, 0xba, 1, 0, 0, 0]),
            Regs::RAX | Regs::FLAGS
        );
    }

    #[test]
    fn tail_call_and_indirect_jump_are_conservative() {
        // jmp far away (tail call)
        assert_eq!(clobbers(&[0xe9, 0, 0x10, 0, 0]), SYSV_CALLER_SAVED);
        // push rbx; mov ebx,edi; jmp rax; pop rbx; ret -> fallback keeps rbx
        let regs = clobbers(&[0x53, 0x89, 0xfb, 0xff, 0xe0, 0x5b, 0xc3]);
        assert!(regs.contains(SYSV_CALLER_SAVED | Regs::RBX));
    }

    #[test]
    fn vector_registers() {
        // pxor xmm3,xmm3; vzeroupper; ret
        let regs = clobbers(&[0x66, 0x0f, 0xef, 0xdb, 0xc5, 0xf8, 0x77, 0xc3]);
        assert!(regs.contains(Regs::XMM3));
        // movaps xmm15, xmm0 ; ret
        assert_eq!(clobbers(&[0x44, 0x0f, 0x28, 0xf8, 0xc3]), Regs::XMM15);
    }

    #[test]
    fn errors() {
        assert_eq!(
            clobbered_registers(&[], 7),
            Err(ClobberError::Empty { entry: 7 })
        );
        assert_eq!(
            clobbered_registers(&[0x06, 0xc3], 7),
            Err(ClobberError::UndecodableInstruction { addr: 7 })
        );
        assert_eq!(
            clobbered_registers(&[0x90, 0xb8, 1], 7),
            Err(ClobberError::TruncatedInstruction { addr: 8 })
        );
    }
}

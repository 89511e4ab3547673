//! A classic BPF interpreter for seccomp programs: what a thread's filter answers for one
//! system call, computed here instead of finding out inside the target.
//!
//! It runs the instruction subset the kernel's seccomp checker admits (`seccomp_check_filter`:
//! 32-bit loads from `struct seccomp_data`, its length, the scratch memory and immediates;
//! ALU with a constant or X; jumps; `ret`; `tax`/`txa`). Every access is bounds-checked: a
//! program outside that subset, a jump or load out of range, or one that runs off its end is
//! `None` ("unknown"), never a panic. Division or modulo by a zero X returns 0 from the
//! program, as the kernel's conversion of classic BPF does.

/// `AUDIT_ARCH_X86_64`: the `arch` field of a system call made by 64-bit code.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// seccomp actions (the upper 16 bits of a program's return value, `SECCOMP_RET_ACTION_FULL`).
pub mod action {
    /// Kill the whole process.
    pub const KILL_PROCESS: u32 = 0x8000_0000;
    /// Kill the calling thread.
    pub const KILL_THREAD: u32 = 0x0000_0000;
    /// Send SIGSYS to the calling thread.
    pub const TRAP: u32 = 0x0003_0000;
    /// Fail the call with the errno in the low 16 bits.
    pub const ERRNO: u32 = 0x0005_0000;
    /// Ask the supervisor listening on the filter's descriptor.
    pub const USER_NOTIF: u32 = 0x7fc0_0000;
    /// Ask the tracer (PTRACE_O_TRACESECCOMP; without it the call fails with ENOSYS).
    pub const TRACE: u32 = 0x7ff0_0000;
    /// Allow, and log.
    pub const LOG: u32 = 0x7ffc_0000;
    /// Allow.
    pub const ALLOW: u32 = 0x7fff_0000;
    /// The mask of the action part of a return value.
    pub const FULL_MASK: u32 = 0xffff_0000;
}

/// One instruction as the kernel stores it (`struct sock_filter`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump offset when the condition holds.
    pub jt: u8,
    /// Jump offset when it does not.
    pub jf: u8,
    /// Constant operand.
    pub k: u32,
}

impl Insn {
    /// An instruction with no jump offsets.
    pub const fn stmt(code: u16, k: u32) -> Insn {
        Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }

    /// A conditional jump.
    pub const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
        Insn { code, jt, jf, k }
    }
}

/// What a seccomp filter sees of a system call (`struct seccomp_data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeccompData {
    /// The system call number.
    pub nr: u32,
    /// `AUDIT_ARCH_*` of the calling convention.
    pub arch: u32,
    /// Where the `syscall` instruction is.
    pub instruction_pointer: u64,
    /// The six arguments.
    pub args: [u64; 6],
}

/// `sizeof(struct seccomp_data)`.
const DATA_LEN: u32 = 64;

impl SeccompData {
    /// The 32-bit word at byte offset `off` (little-endian halves of the 64-bit fields, as the
    /// kernel lays the structure out on x86-64); None unless aligned and inside.
    fn word(&self, off: u32) -> Option<u32> {
        if !off.is_multiple_of(4) || off >= DATA_LEN {
            return None;
        }
        let field = |v: u64| {
            if off.is_multiple_of(8) {
                v as u32
            } else {
                (v >> 32) as u32
            }
        };
        Some(match off {
            0 => self.nr,
            4 => self.arch,
            8 | 12 => field(self.instruction_pointer),
            _ => field(self.args[((off - 16) / 8) as usize]),
        })
    }
}

// Opcode parts (linux/filter.h, linux/bpf_common.h).
/// Load into A.
pub const LD: u16 = 0x00;
/// Load into X.
pub const LDX: u16 = 0x01;
/// Store A into scratch memory.
pub const ST: u16 = 0x02;
/// Store X into scratch memory.
pub const STX: u16 = 0x03;
/// Arithmetic on A.
pub const ALU: u16 = 0x04;
/// Jumps.
pub const JMP: u16 = 0x05;
/// Return.
pub const RET: u16 = 0x06;
/// tax / txa.
pub const MISC: u16 = 0x07;
/// 32-bit operand size.
pub const W: u16 = 0x00;
/// Immediate addressing.
pub const IMM: u16 = 0x00;
/// Absolute offset into the data.
pub const ABS: u16 = 0x20;
/// Scratch memory.
pub const MEM: u16 = 0x60;
/// The data's length.
pub const LEN: u16 = 0x80;
/// Operand is the constant k.
pub const K: u16 = 0x00;
/// Operand is X.
pub const X: u16 = 0x08;
/// Return A (with RET).
pub const A: u16 = 0x10;
/// Unconditional jump.
pub const JA: u16 = 0x00;
/// Jump if equal.
pub const JEQ: u16 = 0x10;
/// Jump if greater.
pub const JGT: u16 = 0x20;
/// Jump if greater or equal.
pub const JGE: u16 = 0x30;
/// Jump if any bit set.
pub const JSET: u16 = 0x40;
/// ALU operations.
pub const ADD: u16 = 0x00;
/// Subtraction.
pub const SUB: u16 = 0x10;
/// Multiplication.
pub const MUL: u16 = 0x20;
/// Division.
pub const DIV: u16 = 0x30;
/// Bitwise or.
pub const OR: u16 = 0x40;
/// Bitwise and.
pub const AND: u16 = 0x50;
/// Left shift.
pub const LSH: u16 = 0x60;
/// Right shift.
pub const RSH: u16 = 0x70;
/// Negation.
pub const NEG: u16 = 0x80;
/// Modulo.
pub const MOD: u16 = 0x90;
/// Exclusive or.
pub const XOR: u16 = 0xa0;
/// MISC: X = A.
pub const TAX: u16 = 0x00;
/// MISC: A = X.
pub const TXA: u16 = 0x80;

/// Scratch memory words (`BPF_MEMWORDS`).
const MEMWORDS: usize = 16;
/// The longest program the kernel accepts (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

/// Runs `prog` on `data`: the program's return value, or None when the program is not one the
/// kernel would have run (see the module documentation).
pub fn run(prog: &[Insn], data: &SeccompData) -> Option<u32> {
    if prog.is_empty() || prog.len() > MAX_INSNS {
        return None;
    }
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; MEMWORDS];
    let mut pc = 0usize;
    // Jumps only go forward: at most one step per instruction.
    for _ in 0..prog.len() {
        let insn = *prog.get(pc)?;
        let k = insn.k;
        pc += 1;
        match insn.code {
            c if c == LD | W | ABS => a = data.word(k)?,
            c if c == LD | W | LEN => a = DATA_LEN,
            c if c == LDX | W | LEN => x = DATA_LEN,
            c if c == LD | IMM => a = k,
            c if c == LDX | IMM => x = k,
            c if c == LD | MEM => a = *mem.get(k as usize)?,
            c if c == LDX | MEM => x = *mem.get(k as usize)?,
            c if c == ST => *mem.get_mut(k as usize)? = a,
            c if c == STX => *mem.get_mut(k as usize)? = x,
            c if c == RET | K => return Some(k),
            c if c == RET | A => return Some(a),
            c if c == MISC | TAX => x = a,
            c if c == MISC | TXA => a = x,
            c if c & 0x07 == ALU => {
                let operand = if c & X != 0 { x } else { k };
                a = match c & !(X | 0x07) {
                    ADD => a.wrapping_add(operand),
                    SUB => a.wrapping_sub(operand),
                    MUL => a.wrapping_mul(operand),
                    DIV | MOD if operand == 0 => return Some(0),
                    DIV => a / operand,
                    MOD => a % operand,
                    OR => a | operand,
                    AND => a & operand,
                    XOR => a ^ operand,
                    LSH => a.wrapping_shl(operand),
                    RSH => a.wrapping_shr(operand),
                    NEG if c & X == 0 => a.wrapping_neg(),
                    _ => return None,
                };
            }
            c if c == JMP | JA => pc = pc.checked_add(k as usize)?,
            c if c & 0x07 == JMP => {
                let operand = if c & X != 0 { x } else { k };
                let taken = match c & !(X | 0x07) {
                    JEQ => a == operand,
                    JGT => a > operand,
                    JGE => a >= operand,
                    JSET => a & operand != 0,
                    _ => return None,
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            _ => return None,
        }
    }
    // Ran off the end (a program without a final `ret`).
    None
}

/// How restrictive an action is: lower is more restrictive, as the kernel compares them
/// (`ACTION_ONLY`: the action bits as a signed number; KILL_PROCESS is negative).
fn rank(ret: u32) -> i32 {
    (ret & action::FULL_MASK) as i32
}

/// The stack's answer from its filters' answers: the most restrictive wins (the first of
/// equals, like the kernel, which keeps the earlier one on a tie). ALLOW for no filter.
pub fn combine(rets: impl IntoIterator<Item = u32>) -> u32 {
    rets.into_iter().fold(
        action::ALLOW,
        |acc, r| if rank(r) < rank(acc) { r } else { acc },
    )
}

/// What the action part of `ret` does to the thread, in words; unknown actions kill the
/// process (the kernel's `default:`).
pub fn describe(ret: u32) -> &'static str {
    match ret & action::FULL_MASK {
        action::KILL_THREAD => "kill the thread",
        action::TRAP => "send SIGSYS",
        action::ERRNO => "fail it with an errno",
        action::USER_NOTIF => "hand it to a supervisor (user notification)",
        action::TRACE => "fail it with ENOSYS (trace action, no seccomp tracer)",
        action::LOG | action::ALLOW => "allow",
        _ => "kill the process",
    }
}

/// Whether the call runs normally under `ret`.
pub fn allows(ret: u32) -> bool {
    matches!(ret & action::FULL_MASK, action::ALLOW | action::LOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NR: u32 = 0;
    const ARCH: u32 = 4;
    fn arg_lo(i: u32) -> u32 {
        16 + 8 * i
    }

    fn data(nr: i64, args: [u64; 6]) -> SeccompData {
        SeccompData {
            nr: nr as u32,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: 0x7f00_1234_5678,
            args,
        }
    }

    /// The usual shape: arch check, then kill on one number, allow the rest.
    fn kill_on(nr: i64) -> Vec<Insn> {
        vec![
            Insn::stmt(LD | W | ABS, ARCH),
            Insn::jump(JMP | JEQ | K, AUDIT_ARCH_X86_64, 1, 0),
            Insn::stmt(RET | K, action::KILL_PROCESS),
            Insn::stmt(LD | W | ABS, NR),
            Insn::jump(JMP | JEQ | K, nr as u32, 0, 1),
            Insn::stmt(RET | K, action::KILL_PROCESS),
            Insn::stmt(RET | K, action::ALLOW),
        ]
    }

    #[test]
    fn jeq_on_the_number_decides() {
        let p = kill_on(libc::SYS_mmap);
        assert_eq!(
            run(&p, &data(libc::SYS_mmap, [0; 6])),
            Some(action::KILL_PROCESS)
        );
        assert_eq!(
            run(&p, &data(libc::SYS_munmap, [0; 6])),
            Some(action::ALLOW)
        );
    }

    #[test]
    fn a_foreign_arch_is_killed() {
        let p = kill_on(libc::SYS_mmap);
        let mut d = data(libc::SYS_munmap, [0; 6]);
        d.arch = 0x4000_0003; // AUDIT_ARCH_I386
        assert_eq!(run(&p, &d), Some(action::KILL_PROCESS));
    }

    #[test]
    fn an_argument_test_sees_both_halves() {
        // clone: trap when CLONE_NEWUSER (0x10000000) is in the flags' low word; errno when the
        // high word of arg 1 is 1.
        let p = vec![
            Insn::stmt(LD | W | ABS, NR),
            Insn::jump(JMP | JEQ | K, libc::SYS_clone as u32, 0, 6),
            Insn::stmt(LD | W | ABS, arg_lo(0)),
            Insn::jump(JMP | JSET | K, 0x1000_0000, 0, 1),
            Insn::stmt(RET | K, action::TRAP),
            Insn::stmt(LD | W | ABS, arg_lo(1) + 4),
            Insn::jump(JMP | JEQ | K, 1, 0, 1),
            Insn::stmt(RET | K, action::ERRNO | 1),
            Insn::stmt(RET | K, action::ALLOW),
        ];
        let clone = libc::SYS_clone;
        assert_eq!(
            run(&p, &data(clone, [0x0001_0f00, 0, 0, 0, 0, 0])),
            Some(action::ALLOW)
        );
        assert_eq!(
            run(&p, &data(clone, [0x1000_0000, 0, 0, 0, 0, 0])),
            Some(action::TRAP)
        );
        assert_eq!(
            run(&p, &data(clone, [0, 1 << 32, 0, 0, 0, 0])),
            Some(action::ERRNO | 1)
        );
        assert_eq!(
            run(&p, &data(clone, [0, 1, 0, 0, 0, 0])),
            Some(action::ALLOW)
        );
    }

    #[test]
    fn alu_memory_and_x_work_like_the_kernel() {
        // A = nr; M[3] = A; A = (A + 1) * 2; X = A; A = M[3]; ret when X == 2 * (nr + 1).
        let p = vec![
            Insn::stmt(LD | W | ABS, NR),
            Insn::stmt(ST, 3),
            Insn::stmt(ALU | ADD | K, 1),
            Insn::stmt(ALU | MUL | K, 2),
            Insn::stmt(MISC | TAX, 0),
            Insn::stmt(LD | MEM, 3),
            Insn::stmt(ALU | LSH | K, 1),
            Insn::stmt(ALU | ADD | K, 2),
            Insn::jump(JMP | JEQ | X, 0, 0, 1),
            Insn::stmt(RET | A, 0),
            Insn::stmt(RET | K, action::KILL_THREAD),
        ];
        // 2 * 9 + 2 == (9 + 1) * 2, so A (= 20) is returned.
        assert_eq!(run(&p, &data(9, [0; 6])), Some(20));
        // Division by a zero X ends the program with 0.
        let div = vec![
            Insn::stmt(LDX | IMM, 0),
            Insn::stmt(LD | IMM, 7),
            Insn::stmt(ALU | DIV | X, 0),
            Insn::stmt(RET | K, action::ALLOW),
        ];
        assert_eq!(run(&div, &data(0, [0; 6])), Some(0));
        // The length loads give sizeof(struct seccomp_data).
        let len = vec![Insn::stmt(LD | W | LEN, 0), Insn::stmt(RET | A, 0)];
        assert_eq!(run(&len, &data(0, [0; 6])), Some(64));
    }

    #[test]
    fn malformed_programs_are_unknown() {
        let d = data(libc::SYS_mmap, [0; 6]);
        // Empty; no final ret; a jump past the end; an opcode outside seccomp's subset (a
        // byte load, BPF_LD|BPF_B|BPF_ABS); a scratch index out of range; a bad ALU op.
        let cases: Vec<Vec<Insn>> = vec![
            vec![],
            vec![Insn::stmt(LD | W | ABS, NR)],
            vec![Insn::jump(JMP | JEQ | K, 0, 5, 5), Insn::stmt(RET | K, 0)],
            vec![Insn::stmt(JMP | JA, u32::MAX), Insn::stmt(RET | K, 0)],
            vec![Insn::stmt(0x30, NR), Insn::stmt(RET | K, 0)],
            vec![Insn::stmt(LD | MEM, 16), Insn::stmt(RET | A, 0)],
            vec![Insn::stmt(ST, 99), Insn::stmt(RET | A, 0)],
            vec![Insn::stmt(ALU | 0xf0, 1), Insn::stmt(RET | A, 0)],
            vec![Insn::stmt(ALU | NEG | X, 0), Insn::stmt(RET | A, 0)],
            vec![Insn::stmt(0xffff, 0)],
            vec![Insn::stmt(RET | K, 0); MAX_INSNS + 1],
        ];
        for (i, p) in cases.iter().enumerate() {
            assert_eq!(run(p, &d), None, "case {i}");
        }
    }

    #[test]
    fn out_of_range_and_unaligned_loads_are_unknown() {
        let d = data(libc::SYS_mmap, [1, 2, 3, 4, 5, 6]);
        for off in [64, 65, 2, 1 << 31, u32::MAX] {
            let p = vec![Insn::stmt(LD | W | ABS, off), Insn::stmt(RET | A, 0)];
            assert_eq!(run(&p, &d), None, "offset {off}");
        }
        // The last word inside: args[5]'s high half.
        let p = vec![Insn::stmt(LD | W | ABS, 60), Insn::stmt(RET | A, 0)];
        assert_eq!(run(&p, &d), Some(0));
        let p = vec![Insn::stmt(LD | W | ABS, 56), Insn::stmt(RET | A, 0)];
        assert_eq!(run(&p, &d), Some(6));
        let p = vec![Insn::stmt(LD | W | ABS, 12), Insn::stmt(RET | A, 0)];
        assert_eq!(run(&p, &d), Some(0x7f00));
    }

    #[test]
    fn the_most_restrictive_action_wins() {
        use action::*;
        assert_eq!(combine([]), ALLOW);
        assert_eq!(combine([ALLOW, LOG]), LOG);
        assert_eq!(combine([ERRNO | 5, TRAP | 1, ALLOW]), TRAP | 1);
        assert_eq!(combine([KILL_THREAD, KILL_PROCESS]), KILL_PROCESS);
        assert_eq!(combine([TRACE, USER_NOTIF, ALLOW]), USER_NOTIF);
        assert_eq!(combine([ERRNO | 1, ERRNO | 2]), ERRNO | 1);
        assert!(allows(LOG) && allows(ALLOW | 3) && !allows(TRACE) && !allows(ERRNO));
        assert_eq!(describe(0x1234_0000), "kill the process");
    }
}

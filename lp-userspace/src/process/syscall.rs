//! System calls run inside the target by borrowing one of its stopped threads: its registers
//! are saved, it executes one `syscall` instruction found in the target's own code, and its
//! registers are restored exactly (the stepping itself is in `Tracee::syscall_raw`).

use super::error::{ProcessError, Result};
use super::mem::Memory;
use super::ptrace::Regs;

/// Finds the address of a `syscall` instruction (0f 05) in the target's executable mappings,
/// preferring the vDSO and libc, which every dynamically linked process has.
pub fn find_syscall_instruction(pid: i32, mem: &Memory) -> Result<u64> {
    let maps = super::proc_dir::maps(pid).map_err(|_| ProcessError::NoSuchProcess(pid))?;
    let mut ranges: Vec<(u8, u64, u64)> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.contains('x') {
            continue;
        }
        let path = fields.nth(3).unwrap_or("");
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let rank = if path == "[vdso]" {
            0
        } else if path.contains("libc") {
            1
        } else if path == "[vsyscall]" {
            3
        } else {
            2
        };
        if rank < 3 {
            ranges.push((rank, start, end));
        }
    }
    ranges.sort();
    for (_, start, end) in ranges {
        let mut addr = start;
        while addr < end {
            let len = ((end - addr) as usize).min(1 << 16);
            let Ok(chunk) = mem.read_vec(addr, len) else {
                break;
            };
            if let Some(pos) = chunk.windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(addr + pos as u64);
            }
            // Overlap by one byte so a pair split across chunks is still found.
            addr += len.saturating_sub(1).max(1) as u64;
        }
    }
    Err(ProcessError::NoSyscallInstruction(pid))
}

/// The registers that make a thread stopped with `saved` execute system call `nr` with `args`
/// at the `syscall` instruction `insn`.
pub fn prepare(saved: &Regs, insn: u64, nr: i64, args: [u64; 6]) -> Regs {
    let mut regs = *saved;
    regs.rip = insn;
    regs.rax = nr as u64;
    // orig_rax = -1: the kernel must not treat the stop we come from as an interrupted
    // syscall to restart, which would rewrite rax/rip under us.
    regs.orig_rax = u64::MAX;
    regs.rdi = args[0];
    regs.rsi = args[1];
    regs.rdx = args[2];
    regs.r10 = args[3];
    regs.r8 = args[4];
    regs.r9 = args[5];
    regs
}

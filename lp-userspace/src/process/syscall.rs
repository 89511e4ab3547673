//! System calls run inside the target by borrowing one of its stopped threads: its registers
//! are saved, it executes one `syscall` instruction found in the target's own code, and its
//! registers are restored exactly.

use super::error::{ProcessError, Result};
use super::mem::Memory;
use super::ptrace::{self, WaitStatus};
use std::io;

/// Finds the address of a `syscall` instruction (0f 05) in the target's executable mappings,
/// preferring the vDSO and libc, which every dynamically linked process has.
pub fn find_syscall_instruction(pid: i32, mem: &Memory) -> Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|_| ProcessError::NoSuchProcess(pid))?;
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

/// Runs system call `nr` with `args` on the stopped thread `tid`, returning the raw result
/// (a negative errno on failure). Signals that arrive meanwhile are returned in `deferred`
/// so the caller can deliver them when it resumes the thread.
pub fn run(
    pid: i32,
    tid: i32,
    insn: u64,
    nr: i64,
    args: [u64; 6],
    deferred: &mut Vec<i32>,
) -> Result<i64> {
    let pt = |op, err| ProcessError::from_ptrace(op, pid, tid, err);
    let saved = ptrace::get_regs(tid).map_err(|e| pt("GETREGS", e))?;
    let mut regs = saved;
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
    ptrace::set_regs(tid, &regs).map_err(|e| pt("SETREGS", e))?;
    let result = step_until_after(pid, tid, insn, deferred);
    // Restore whatever happened: the thread must continue exactly where it was.
    let after = match result {
        Ok(()) => ptrace::get_regs(tid).map_err(|e| pt("GETREGS", e)),
        Err(e) => Err(e),
    };
    let restore = ptrace::set_regs(tid, &saved).map_err(|e| pt("SETREGS", e));
    let after = after?;
    restore?;
    Ok(after.rax as i64)
}

fn step_until_after(pid: i32, tid: i32, insn: u64, deferred: &mut Vec<i32>) -> Result<()> {
    let pt = |op, err| ProcessError::from_ptrace(op, pid, tid, err);
    loop {
        ptrace::single_step(tid).map_err(|e| pt("SINGLESTEP", e))?;
        let status = ptrace::wait(tid, false).map_err(|e| pt("WAIT", e))?;
        match status {
            Some((_, WaitStatus::Signal(libc::SIGTRAP))) => {
                let rip = ptrace::get_regs(tid).map_err(|e| pt("GETREGS", e))?.rip;
                if rip == insn + 2 {
                    return Ok(());
                }
                if rip == insn {
                    // Stopped before executing (e.g. a trap stop we ate): step again.
                    continue;
                }
                return Err(ProcessError::Unexpected {
                    pid,
                    tid,
                    what: format!("remote syscall ended at {rip:#x}, expected {:#x}", insn + 2),
                });
            }
            Some((_, WaitStatus::Signal(sig))) => {
                // A signal arrived before our instruction ran: keep it for later.
                deferred.push(sig);
            }
            Some((_, WaitStatus::Gone)) => return Err(ProcessError::Exited(pid)),
            Some((_, WaitStatus::EventStop)) | Some((_, WaitStatus::OtherEvent(_))) => {}
            None => {
                return Err(pt("WAIT", io::Error::from_raw_os_error(libc::ECHILD)));
            }
        }
    }
}

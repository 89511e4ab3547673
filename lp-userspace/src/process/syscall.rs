//! System calls run inside the target by borrowing one of its stopped threads: its registers
//! are saved, it executes one `syscall` instruction found in the target's own code, and its
//! registers are restored exactly (the stepping itself is in `Tracee::syscall_raw`).

use super::error::{ProcessError, Result};
use super::mem::Memory;
use super::ptrace::Regs;

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

/// The registers `saved` (of a thread stopped where it was, possibly inside an interrupted
/// system call) as the kernel would resume them with no signal to deliver: a system call
/// interrupted by our stop is restarted (arch_do_signal_or_restart). Needed because remote
/// system calls leave the thread in a syscall-exit stop, from which the kernel resumes the
/// registers as they are: the interrupted call would otherwise return -ERESTART_RESTARTBLOCK
/// (errno 516) and friends to the program.
pub fn resumed(saved: &Regs) -> Regs {
    const ERESTARTSYS: i64 = 512;
    const ERESTARTNOINTR: i64 = 513;
    const ERESTARTNOHAND: i64 = 514;
    const ERESTART_RESTARTBLOCK: i64 = 516;
    let mut regs = *saved;
    if saved.orig_rax as i64 >= 0 {
        match -(saved.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                regs.rax = saved.orig_rax;
                regs.rip = saved.rip - 2;
            }
            ERESTART_RESTARTBLOCK => {
                regs.rax = libc::SYS_restart_syscall as u64;
                regs.rip = saved.rip - 2;
            }
            _ => {}
        }
        // Resumed in user mode, not as a system call to restart again.
        regs.orig_rax = u64::MAX;
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(orig_rax: i64, rax: i64, rip: u64) -> Regs {
        // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.orig_rax = orig_rax as u64;
        r.rax = rax as u64;
        r.rip = rip;
        r
    }

    #[test]
    fn interrupted_system_calls_restart_as_the_kernel_would() {
        let r = resumed(&regs(libc::SYS_read, -512, 0x1002));
        assert_eq!((r.rax, r.rip), (libc::SYS_read as u64, 0x1000));
        let r = resumed(&regs(libc::SYS_clock_nanosleep, -516, 0x1002));
        assert_eq!((r.rax, r.rip), (libc::SYS_restart_syscall as u64, 0x1000));
        assert_eq!(r.orig_rax, u64::MAX);
        // A finished call keeps its result; a thread stopped outside a call is untouched.
        let r = resumed(&regs(libc::SYS_read, 7, 0x1002));
        assert_eq!((r.rax, r.rip), (7, 0x1002));
        let r = resumed(&regs(-1, -516, 0x1002));
        assert_eq!(
            (r.rax, r.rip, r.orig_rax),
            ((-516i64) as u64, 0x1002, u64::MAX)
        );
    }
}

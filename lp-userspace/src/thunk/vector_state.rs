//! Which vector registers exist in the target, as its kernel enables them: a thunk saves each
//! vector register at the width the CPU gives it (a 128-bit save would lose the upper half of
//! a `ymm`/`zmm` value a caller keeps), and the AVX-512-only registers only where they exist.

/// The vector state the target's threads have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VectorState {
    /// `ymm` registers (AVX) are enabled.
    pub avx: bool,
    /// `zmm0`–`zmm31` and the mask registers `k0`–`k7` (AVX-512F) are enabled.
    pub avx512: bool,
    /// Mask registers are 64 bits wide (AVX-512BW); otherwise 16.
    pub avx512bw: bool,
    /// AMX tile registers are enabled.
    pub amx: bool,
}

impl VectorState {
    /// SSE only: `xmm0`–`xmm15`.
    pub const SSE: VectorState = VectorState {
        avx: false,
        avx512: false,
        avx512bw: false,
        amx: false,
    };

    /// The state of processes on this machine, from the kernel's `/proc/cpuinfo` flags. Linux
    /// lists `avx`, `avx512f`... only when it enables their register state (XCR0), so these
    /// flags are what `xgetbv` would say inside the target. Unreadable: SSE only.
    pub fn of_system() -> VectorState {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| VectorState::from_cpuinfo(&t))
            .unwrap_or(VectorState::SSE)
    }

    /// Parses the first `flags` line of a `/proc/cpuinfo` text.
    pub fn from_cpuinfo(text: &str) -> VectorState {
        let flags: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        let has = |f: &str| flags.contains(&f);
        let avx512 = has("avx512f");
        VectorState {
            avx: has("avx") || avx512,
            avx512,
            avx512bw: avx512 && has("avx512bw"),
            amx: has("amx_tile"),
        }
    }

    /// Bytes a thunk saves per `xmm`/`ymm`/`zmm` register.
    pub fn vector_width(&self) -> u32 {
        if self.avx512 {
            64
        } else if self.avx {
            32
        } else {
            16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_flags_line() {
        let text = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw\nbugs\t: x\n";
        let v = VectorState::from_cpuinfo(text);
        assert!(v.avx && v.avx512 && v.avx512bw && !v.amx);
        assert_eq!(v.vector_width(), 64);
        let v = VectorState::from_cpuinfo("flags\t: fpu sse2 avx avx2 amx_tile\n");
        assert!(v.avx && !v.avx512 && v.amx);
        assert_eq!(v.vector_width(), 32);
        assert_eq!(VectorState::from_cpuinfo("nothing"), VectorState::SSE);
        assert_eq!(VectorState::SSE.vector_width(), 16);
        // avx512f without avx512bw: 16-bit masks
        let v = VectorState::from_cpuinfo("flags : avx avx512f\n");
        assert!(v.avx512 && !v.avx512bw);
    }

    #[test]
    fn this_machine_agrees_with_its_cpuinfo() {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let v = VectorState::of_system();
        assert_eq!(v.avx512, text.contains(" avx512f"));
    }
}

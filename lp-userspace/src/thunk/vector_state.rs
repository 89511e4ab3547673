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

    /// The state of processes on this machine: what the CPU has (`cpuid`) and the kernel
    /// enabled (`xgetbv`: XCR0 is one value for every process, so the target's too). Linux
    /// lists `avx`, `avx512f`... in `/proc/cpuinfo` on the same condition, but generating that
    /// text costs tens of microseconds.
    ///
    /// Asked once per process: in a virtual machine each `cpuid` is a trap to the hypervisor
    /// (16–20 µs on the development VM; std's first feature test makes several), so an apply's
    /// warm-up thread asks first, off the tracer's path ([`VectorState::warm`]).
    pub fn of_system() -> VectorState {
        static SYSTEM: std::sync::OnceLock<VectorState> = std::sync::OnceLock::new();
        *SYSTEM.get_or_init(VectorState::detect)
    }

    /// Runs [`VectorState::of_system`]'s detection now, so that a later call returns at once.
    pub fn warm() {
        VectorState::of_system();
    }

    fn detect() -> VectorState {
        use std::arch::is_x86_feature_detected as has;
        // std's detection checks XCR0 for AVX and AVX-512 state, as the kernel's flags do.
        let avx512 = has!("avx512f");
        VectorState {
            avx: has!("avx") || avx512,
            avx512,
            avx512bw: avx512 && has!("avx512bw"),
            amx: amx_enabled(),
        }
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

/// AMX tiles: the CPU has them (CPUID.7.0:EDX bit 24, AMX-TILE) and the kernel enabled their
/// state (XCR0 bits 17 and 18, XTILECFG and XTILEDATA). std cannot say yet (unstable).
fn amx_enabled() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    const OSXSAVE: u32 = 1 << 27;
    const AMX_TILE: u32 = 1 << 24;
    const XTILE: u64 = (1 << 17) | (1 << 18);
    // SAFETY: cpuid exists on every x86_64 CPU; leaf 7 is read only when leaf 0 says it exists.
    // (Safe to call since Rust 1.87; the workspace's rust-version is older.)
    #[allow(unused_unsafe)]
    let (max_leaf, osxsave, leaf7_edx) = unsafe {
        let max = __cpuid(0).eax;
        let edx = if max >= 7 { __cpuid_count(7, 0).edx } else { 0 };
        (max, __cpuid(1).ecx & OSXSAVE != 0, edx)
    };
    if max_leaf < 7 || !osxsave || leaf7_edx & AMX_TILE == 0 {
        return false;
    }
    // SAFETY: xgetbv is available when CPUID says the OS enabled XSAVE (OSXSAVE, checked above).
    let xcr0 = unsafe { xgetbv0() };
    xcr0 & XTILE == XTILE
}

/// XCR0. Only call when CPUID.1:ECX.OSXSAVE is set.
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    // SAFETY: the caller checked OSXSAVE; register 0 always exists then.
    unsafe { std::arch::x86_64::_xgetbv(0) }
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

    /// What the CPU says equals what the kernel lists in /proc/cpuinfo (the source before).
    #[test]
    fn this_machine_agrees_with_its_cpuinfo() {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        assert_eq!(VectorState::of_system(), VectorState::from_cpuinfo(&text));
    }
}

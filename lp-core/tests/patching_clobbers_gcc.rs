//! Clobber analysis on real gcc output, checked against execution: an assembly probe loads
//! every general-purpose register with a known value, calls the function, and records what came
//! back. Every register the function really changed must be in the analysis (soundness), and
//! registers gcc saves and restores must not be (usefulness).

mod sites_support;

use std::ffi::CString;

use lp_core::clobber::{
    clobbered_registers, registers_to_preserve, written_registers, Regs, GPRS, SYSV_CALLEE_SAVED,
    SYSV_CALLER_SAVED,
};
use sites_support::{function, gcc_files, Compiled};

const C_SOURCE: &str = r#"
int add(int a, int b) { return a + b; }
long sum(const long *p, long n) {
    long s = 0;
    for (long i = 0; i < n; i++) s += p[i] * (i + 1);
    return s;
}
__attribute__((noinline)) long ext(long x) { return x * 7 + 3; }
long keep(long x) { long a = ext(x); long b = ext(a); return a + b + x; }
long many(long a, long b, long c, long d, long e, long f) {
    long g = a * b + c, h = d * e + f, i = a ^ f, j = b - e;
    for (long k = 0; k < (c & 7); k++) { g += h * k; h ^= i + k; i += j; }
    return g + h + i + j;
}
double mix(double a, double b) { return a * b + a / (b + 1.0); }
int pick(int x, int y) {
    switch (x) {
    case 0: return y + 1; case 1: return y * 3; case 2: return y - 7; case 3: return y << 2;
    case 4: return y ^ 0x55; case 5: return y / 3; case 6: return y % 5; default: return 0;
    }
}
"#;

/// `probe(regs)`: loads rax..r15 from regs[0..16] (regs[4], the rsp slot, holds the function to
/// call), calls it, and stores the registers it returns with back into regs.
const PROBE_SOURCE: &str = r#"
    .text
    .globl probe
    .type probe, @function
probe:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    push %rdi
    pushq 32(%rdi)
    sub $8, %rsp
    mov 0(%rdi), %rax
    mov 8(%rdi), %rcx
    mov 16(%rdi), %rdx
    mov 24(%rdi), %rbx
    mov 40(%rdi), %rbp
    mov 48(%rdi), %rsi
    mov 64(%rdi), %r8
    mov 72(%rdi), %r9
    mov 80(%rdi), %r10
    mov 88(%rdi), %r11
    mov 96(%rdi), %r12
    mov 104(%rdi), %r13
    mov 112(%rdi), %r14
    mov 120(%rdi), %r15
    mov 56(%rdi), %rdi
    call *8(%rsp)
    push %rdi
    mov 24(%rsp), %rdi
    mov %rax, 0(%rdi)
    mov %rcx, 8(%rdi)
    mov %rdx, 16(%rdi)
    mov %rbx, 24(%rdi)
    mov %rbp, 40(%rdi)
    mov %rsi, 48(%rdi)
    pop %rax
    mov %rax, 56(%rdi)
    mov %r8, 64(%rdi)
    mov %r9, 72(%rdi)
    mov %r10, 80(%rdi)
    mov %r11, 88(%rdi)
    mov %r12, 96(%rdi)
    mov %r13, 104(%rdi)
    mov %r14, 112(%rdi)
    mov %r15, 120(%rdi)
    add $24, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret
    .size probe, .-probe
    .section .note.GNU-stack,"",@progbits
"#;

struct Lib {
    obj: Compiled,
    handle: *mut libc::c_void,
}

impl Lib {
    fn build(opt: &str) -> Lib {
        let obj = gcc_files(
            &[("funcs.c", C_SOURCE), ("probe.s", PROBE_SOURCE)],
            &[opt, "-shared", "-fPIC", "-fcf-protection=none"],
        );
        let path = CString::new(obj.path.to_str().unwrap()).unwrap();
        // SAFETY: dlopen of a library we just built; it has no constructors.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null());
        Lib { obj, handle }
    }

    fn addr(&self, name: &str) -> u64 {
        let cname = CString::new(name).unwrap();
        // SAFETY: symbol lookup in our own handle.
        let a = unsafe { libc::dlsym(self.handle, cname.as_ptr()) } as u64;
        assert_ne!(a, 0, "{name}");
        a
    }

    fn analysis(&self, name: &str) -> Regs {
        let f = function(&self.obj.bytes, name);
        clobbered_registers(&f.code, self.addr(name)).unwrap()
    }

    /// Registers (general-purpose) that really changed across a call with `args` in rdi, rsi, ...
    fn observed(&self, name: &str, args: &[u64]) -> Regs {
        const ARG_REGS: [usize; 6] = [7, 6, 2, 1, 8, 9];
        let mut regs = [0u64; 16];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = 0x5a5a_0000_0000_0000 | (i as u64) << 8 | 0x11;
        }
        for (a, &r) in args.iter().zip(ARG_REGS.iter()) {
            regs[r] = *a;
        }
        let before = regs;
        regs[4] = self.addr(name);
        let probe = self.addr("probe");
        // SAFETY: probe follows the C ABI (void probe(uint64_t *)); the function it calls gets
        // arguments valid for its C signature (pointers point at live arrays).
        let probe: extern "C" fn(*mut u64) = unsafe { std::mem::transmute(probe as usize) };
        probe(regs.as_mut_ptr());
        let mut changed = Regs::empty();
        for i in 0..16 {
            if i != 4 && regs[i] != before[i] {
                changed |= Regs::gpr(i);
            }
        }
        changed
    }
}

fn check(lib: &Lib, name: &str, args: &[u64]) -> Regs {
    let analysis = lib.analysis(name);
    let observed = lib.observed(name, args);
    assert!(
        analysis.contains(observed),
        "{name}: changed {observed:?} but the analysis says {analysis:?}"
    );
    assert!(!analysis.contains(Regs::RSP));
    // the lower bound (own writes) never exceeds the upper bound on caller-saved registers
    let f = function(&lib.obj.bytes, name);
    let written = written_registers(&f.code, lib.addr(name)).unwrap();
    assert!(
        analysis.contains(written & SYSV_CALLER_SAVED),
        "{name}: writes {written:?}, may change {analysis:?}"
    );
    analysis
}

/// For a function that calls nothing, every register it really changed is one its own
/// instructions wrote: the lower bound must contain what execution shows.
fn check_call_free(lib: &Lib, name: &str, args: &[u64]) {
    let f = function(&lib.obj.bytes, name);
    let written = written_registers(&f.code, lib.addr(name)).unwrap();
    let observed = lib.observed(name, args);
    assert!(
        written.contains(observed),
        "{name}: changed {observed:?}, own writes {written:?}"
    );
}

fn all_functions(lib: &Lib) {
    let data = [3i64, -4, 5, 6, 7, 8, 9, 10];
    let p = data.as_ptr() as u64;
    let add = check(lib, "add", &[2, 3]);
    let sum = check(lib, "sum", &[p, 8]);
    let keep = check(lib, "keep", &[11]);
    let many = check(lib, "many", &[1, 2, 7, 4, 5, 6]);
    let mix = check(lib, "mix", &[]);
    let pick = check(lib, "pick", &[3, 9]);
    // gcc keeps the ABI: callee-saved registers are restored, and the analysis proves it
    for (name, regs) in [
        ("add", add),
        ("sum", sum),
        ("keep", keep),
        ("many", many),
        ("mix", mix),
    ] {
        assert_eq!(regs & SYSV_CALLEE_SAVED, Regs::empty(), "{name}: {regs:?}");
    }
    // a call to elsewhere clobbers every caller-saved register
    assert!(keep.contains(SYSV_CALLER_SAVED));
    // floating point lands in xmm registers
    assert!(mix.contains(Regs::XMM0));
    // no call, no vectors: far from the whole caller-saved set
    assert!(!sum.contains(Regs::XMM0));
    assert!((sum & GPRS).bits().count_ones() < 8, "sum: {sum:?}");
    let _ = pick;
    check_call_free(lib, "add", &[2, 3]);
    check_call_free(lib, "sum", &[p, 8]);
    check_call_free(lib, "many", &[1, 2, 7, 4, 5, 6]);

    // replacing `add` by `keep` (which calls out) must preserve every caller-saved register
    // `add` provably left alone
    let code = |n: &str| function(&lib.obj.bytes, n).code;
    let preserve = registers_to_preserve(
        &code("add"),
        lib.addr("add"),
        &code("keep"),
        lib.addr("keep"),
    )
    .unwrap();
    assert!(preserve.contains(Regs::RCX | Regs::RSI | Regs::R8 | Regs::R11 | Regs::XMM0));
    assert!(
        !preserve.contains(Regs::RAX),
        "add returns in rax: callers expect it changed"
    );
    assert!(!preserve.intersects(SYSV_CALLEE_SAVED));
    // replacing a function by itself needs nothing saved
    assert_eq!(
        registers_to_preserve(&code("sum"), lib.addr("sum"), &code("sum"), lib.addr("sum"))
            .unwrap(),
        Regs::empty()
    );
}

#[test]
fn o2_functions() {
    let lib = Lib::build("-O2");
    all_functions(&lib);
    // `lea (%rdi,%rsi),%eax; ret`: exactly rax, no flags
    assert_eq!(lib.analysis("add"), Regs::RAX);
    // the -O2 switch uses a jump table: the conservative fallback
    assert!(lib.analysis("pick").contains(SYSV_CALLER_SAVED));
}

#[test]
fn o0_functions() {
    let lib = Lib::build("-O0");
    all_functions(&lib);
    // push rbp; mov rbp,rsp; ... pop rbp: rbp is preserved
    assert!(!lib.analysis("add").contains(Regs::RBP));
    assert_eq!(lib.analysis("add") & GPRS, Regs::RAX | Regs::RDX);
}

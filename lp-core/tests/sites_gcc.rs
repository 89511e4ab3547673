//! Patch sites taken from real compiler output: gcc compiles small functions at test time, the
//! test reads them out of the object file and checks `validate_site`'s verdict. Instruction
//! boundaries are checked against objdump, an oracle independent of iced-x86.

mod sites_support;

use lp_core::jump::{ABS_JUMP_LEN, REL32_JUMP_LEN};
use lp_core::site::{validate_site, Site, SiteError, ENDBR64};
use sites_support::{expected_displaced, function, gcc, objdump_boundaries, Compiled};

/// Where the tests pretend the object's text section is loaded.
const BASE: u64 = 0x40_0000;

const C_SOURCE: &str = r#"
int add(int a, int b) { return a + b; }
void nothing(void) {}
long fact(long n, long acc) { if (n <= 1) return acc; return fact(n - 1, acc * n); }
long sum(const long *p, long n) {
    long s = 0;
    for (long i = 0; i < n; i++) s += p[i] * (i + 1);
    return s;
}
void spin(volatile int *p) { while (*p) ; }
"#;

/// Hand-written functions whose loops branch back into their first bytes.
const ASM_SOURCE: &str = r#"
    .text
    .globl loop_to_entry
    .type loop_to_entry, @function
loop_to_entry:              # the loop head is the entry itself: allowed
    dec %edi
    jnz loop_to_entry
    xor %eax, %eax
    ret
    .size loop_to_entry, .-loop_to_entry

    .globl loop_into_head
    .type loop_into_head, @function
loop_into_head:             # the loop head is 2 bytes into the entry: refused
    xor %eax, %eax
1:  add $1, %eax
    cmp %edi, %eax
    jne 1b
    ret
    .size loop_into_head, .-loop_into_head

    .globl has_garbage
    .type has_garbage, @function
has_garbage:                # 0x06 (push es) does not exist in 64-bit mode
    push %rbp
    mov %rsp, %rbp
    mov $1, %eax
    .byte 0x06
    pop %rbp
    ret
    .size has_garbage, .-has_garbage
    .section .note.GNU-stack,"",@progbits
"#;

fn compile(flags: &[&str]) -> Compiled {
    let mut all = vec!["-c"];
    all.extend_from_slice(flags);
    gcc("funcs.c", C_SOURCE, &all)
}

fn site_of(obj: &Compiled, name: &str, jump_len: usize) -> (Result<Site, SiteError>, u64) {
    let f = function(&obj.bytes, name);
    let entry = BASE + f.value;
    (validate_site(&f.code, entry, jump_len), entry)
}

/// Asserts an accepted site against objdump's instruction boundaries.
fn assert_ok(obj: &Compiled, name: &str, jump_len: usize, patch_off: u64) -> Site {
    let f = function(&obj.bytes, name);
    let (verdict, entry) = site_of(obj, name, jump_len);
    let site = verdict.unwrap_or_else(|e| panic!("{name}: {e}"));
    let bounds = objdump_boundaries(&obj.path, name);
    assert_eq!(site.entry, entry);
    assert_eq!(site.patch_addr, entry + patch_off, "{name}: patch address");
    assert_eq!(
        site.displaced_len as u64,
        expected_displaced(&bounds, f.size, patch_off, jump_len as u64),
        "{name}: displaced length"
    );
    assert!(site.displaced_len >= jump_len);
    assert_eq!(
        site.displaced(),
        &f.code[patch_off as usize..patch_off as usize + site.displaced_len]
    );
    site
}

#[test]
fn o0_functions_patch_at_the_entry() {
    let obj = compile(&["-O0", "-fcf-protection=none"]);
    for name in ["add", "nothing", "fact", "sum", "spin"] {
        let site = assert_ok(&obj, name, REL32_JUMP_LEN, 0);
        assert!(!site.endbr64);
        // -O0 always starts with push %rbp; mov %rsp,%rbp
        assert_eq!(&site.displaced()[..4], &[0x55, 0x48, 0x89, 0xe5]);
    }
    // room for the absolute jump too in a function with a body
    assert_ok(&obj, "sum", ABS_JUMP_LEN, 0);
}

#[test]
fn o2_verdicts() {
    let obj = compile(&["-O2", "-fcf-protection=none"]);
    // `lea (%rdi,%rsi),%eax; ret` is 4 bytes: shorter than the jump
    let (verdict, entry) = site_of(&obj, "add", REL32_JUMP_LEN);
    assert_eq!(
        verdict,
        Err(SiteError::TooShort {
            entry,
            available: 4,
            needed: 5
        })
    );
    // the self-tail-call became a loop; its head is past the displaced bytes
    let fact = assert_ok(&obj, "fact", REL32_JUMP_LEN, 0);
    assert_eq!(fact.branches_to_patch_addr, 0);
    let sum = assert_ok(&obj, "sum", REL32_JUMP_LEN, 0);
    assert_eq!(
        sum.relative_in_displaced, 1,
        "the jle over the loop is displaced"
    );
    // `spin`'s loop head is the entry itself: allowed, and counted
    let spin = assert_ok(&obj, "spin", REL32_JUMP_LEN, 0);
    assert_eq!(spin.branches_to_patch_addr, 1);
}

#[test]
fn one_byte_function_is_refused() {
    let obj = compile(&["-O2", "-fcf-protection=none"]);
    let f = function(&obj.bytes, "nothing");
    assert_eq!(f.code, [0xc3], "gcc -O2 makes `nothing` a lone ret");
    let (verdict, entry) = site_of(&obj, "nothing", REL32_JUMP_LEN);
    let err = verdict.unwrap_err();
    assert_eq!(
        err,
        SiteError::TooShort {
            entry,
            available: 1,
            needed: 5
        }
    );
    assert!(err.to_string().contains("too short"));
}

#[test]
fn endbr64_is_kept_and_the_redirect_follows_it() {
    let obj = compile(&["-O0", "-fcf-protection=full"]);
    for name in ["add", "fact", "sum"] {
        let f = function(&obj.bytes, name);
        assert_eq!(f.code[..4], ENDBR64);
        let site = assert_ok(&obj, name, REL32_JUMP_LEN, 4);
        assert!(site.endbr64);
        assert_eq!(site.patch_offset(), 4);
    }
    // at -O2 `endbr64; lea; ret` leaves 4 bytes after the endbr64: too short
    let obj = compile(&["-O2", "-fcf-protection=full"]);
    let (verdict, entry) = site_of(&obj, "add", REL32_JUMP_LEN);
    assert_eq!(
        verdict,
        Err(SiteError::TooShort {
            entry,
            available: 4,
            needed: 5
        })
    );
    // gcc 12 aligns spin's loop head with a 4-byte NOP after the endbr64:
    //   0: endbr64; 4: nopl 0(%rax); 8: mov (%rdi),%eax; a: test; c: jne 8; e: ret
    // the loop head is 4 bytes into the would-be redirect: a correct refusal from real code
    let f = function(&obj.bytes, "spin");
    assert_eq!(
        f.code[4..8],
        [0x0f, 0x1f, 0x40, 0x00],
        "gcc's layout changed"
    );
    let (verdict, entry) = site_of(&obj, "spin", REL32_JUMP_LEN);
    assert_eq!(
        verdict,
        Err(SiteError::BranchIntoPatchedBytes {
            from: entry + 0xc,
            to: entry + 8
        })
    );
}

#[test]
fn patchable_function_entry_nops_give_room() {
    let obj = compile(&[
        "-O2",
        "-fcf-protection=none",
        "-fpatchable-function-entry=16,14",
    ]);
    // nop; nop; lea; ret: the two entry NOPs make the 4-byte function patchable
    let site = assert_ok(&obj, "add", REL32_JUMP_LEN, 0);
    assert_eq!(site.entry_nops, 2);
    assert_eq!(site.displaced_len, 5);
    // still refused: `nop; nop; ret`
    let (verdict, _) = site_of(&obj, "nothing", REL32_JUMP_LEN);
    assert!(matches!(
        verdict,
        Err(SiteError::TooShort { available: 3, .. })
    ));

    let obj = compile(&[
        "-O2",
        "-fcf-protection=full",
        "-fpatchable-function-entry=16,14",
    ]);
    let site = assert_ok(&obj, "add", REL32_JUMP_LEN, 4);
    assert!(site.endbr64);
    assert_eq!(site.entry_nops, 2);
}

#[test]
fn kernel_style_fentry_entries() {
    // the kernel's ftrace entry: `call __fentry__` (5 bytes, unrelocated here) heads every
    // function; with -mnop-mcount it is a 5-byte NOP. Either is exactly one displaced instruction,
    // which makes even gcc -O2's 4-byte `lea; ret` patchable.
    let obj = compile(&[
        "-O2",
        "-fno-pic",
        "-mcmodel=kernel",
        "-pg",
        "-mfentry",
        "-fcf-protection=none",
    ]);
    for name in ["add", "fact", "sum"] {
        let f = function(&obj.bytes, name);
        assert_eq!(f.code[0], 0xe8, "{name} starts with call __fentry__");
        let site = assert_ok(&obj, name, REL32_JUMP_LEN, 0);
        assert_eq!(site.displaced_len, 5);
        assert_eq!(site.displaced_count, 1);
        assert_eq!(
            site.relative_in_displaced, 1,
            "the call is relocated in a trampoline"
        );
    }
    let obj = compile(&[
        "-O2",
        "-fno-pic",
        "-pg",
        "-mfentry",
        "-mnop-mcount",
        "-fcf-protection=none",
    ]);
    let site = assert_ok(&obj, "add", REL32_JUMP_LEN, 0);
    assert_eq!(site.entry_nops, 5);
    assert_eq!(site.displaced_len, 5);
}

#[test]
fn loops_into_the_entry() {
    let obj = gcc("loops.s", ASM_SOURCE, &["-c"]);
    let site = assert_ok(&obj, "loop_to_entry", REL32_JUMP_LEN, 0);
    assert_eq!(site.branches_to_patch_addr, 1);

    let (verdict, entry) = site_of(&obj, "loop_into_head", REL32_JUMP_LEN);
    assert_eq!(
        verdict,
        Err(SiteError::BranchIntoPatchedBytes {
            from: entry + 7,
            to: entry + 2
        })
    );
    let msg = verdict.unwrap_err().to_string();
    assert!(
        msg.contains("inside the bytes the redirect overwrites"),
        "{msg}"
    );
}

#[test]
fn undecodable_instruction_is_refused() {
    let obj = gcc("loops.s", ASM_SOURCE, &["-c"]);
    let (verdict, entry) = site_of(&obj, "has_garbage", REL32_JUMP_LEN);
    assert_eq!(
        verdict,
        Err(SiteError::UndecodableInstruction { addr: entry + 9 })
    );
}

//! Registers the callers rely on, AVX-512 edition: a caller compiled `gcc -O2 -mavx512f`
//! keeps an accumulator in zmm20, a mask in k5 and a 256-bit constant in ymm3 across a call
//! to a function that never writes them (checked with objdump); the replacement writes all
//! three. The register-preserving thunk must save zmm20 and k5 (AVX-512-only state, which
//! lp-core reports as one bit) and ymm3 whole (a 128-bit save loses its upper half).
//!
//! On a CPU without AVX-512 the target cannot run: the test says so and returns (the gating,
//! "those registers do not exist, nothing to save", is unit-tested in thunk.rs).

mod common;
use common::*;
use std::process::Command;

fn disassemble(exe: &std::path::Path, name: &str) -> String {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", exe.to_str().unwrap()])
        .output()
        .expect("objdump");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text
        .find(&format!("<{name}>:\n"))
        .unwrap_or_else(|| panic!("{name} not in objdump output"));
    let body = &text[start..];
    body[..body.find("\n\n").unwrap_or(body.len())].to_string()
}

#[test]
fn e2e_avx512_state_survives_replacement() {
    let vectors = lp_userspace::thunk::VectorState::of_system();
    let dir = tempfile::tempdir().unwrap();
    let replacement = object(dir.path(), "new_avx512_ra.c", "new.o", &["-mavx512f"]);
    if !vectors.avx512 {
        // Without AVX-512 nothing could keep a value in zmm20/k5: thunk::plan leaves them out
        // (unit-tested in thunk.rs); the target itself cannot run here.
        eprintln!("this CPU has no AVX-512: the AVX-512 target cannot run here (gating unit-tested in thunk.rs)");
        return;
    }
    let exe = executable(dir.path(), &["avx512_ra.c"], "avx512_ra", &["-mavx512f"]);
    // The premise: the loop keeps zmm20, k5 and ymm3 in registers across the call to twice
    // (no spill of them around the call).
    let run_loop = disassemble(&exe, "run_loop");
    let call = run_loop.find("<twice>").expect("run_loop calls twice");
    let around_call = &run_loop[call.saturating_sub(200)..(call + 200).min(run_loop.len())];
    assert!(
        run_loop.contains("%zmm20") && run_loop.contains("%k5") && run_loop.contains("%ymm3"),
        "{run_loop}"
    );
    assert!(
        !around_call.contains("(%rsp)") && !around_call.contains("(%rbp)"),
        "run_loop spills around the call:\n{run_loop}"
    );
    let (patch, _) = pack(dir.path(), &exe, &replacement, &[], "p.lp");

    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    const OLD: &str = "sum=158400 mask=16 upper=-4";
    // Without the AVX-512 saves the line would be "sum=0 mask=0 upper=0".
    const NEW: &str = "sum=160000 mask=16 upper=-4";
    // Runs a livepatch command, waits for the first line showing `then` (lines printed before
    // the command returned may still be in the pipe), then for steady output.
    let switch = |args: &[&str], then: &str| -> String {
        let mark = target.count();
        let out = livepatch_ok(args);
        target.wait_line_after(mark, |l| l == then);
        target.expect_steady(4, |l| l == then);
        out
    };
    target.expect_steady(2, |l| l == OLD);
    let out = switch(&["apply", &pid, patch.to_str().unwrap()], NEW);
    assert!(out.contains("via register-saving thunk"), "{out}");
    switch(&["revert", &pid], OLD);
    // Nonstop mode builds the same thunk.
    switch(
        &["apply", &pid, patch.to_str().unwrap(), "--mode", "nonstop"],
        NEW,
    );
    switch(&["revert", &pid], OLD);
}

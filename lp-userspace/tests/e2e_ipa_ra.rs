//! Registers the callers rely on (-fipa-ra): a caller compiled -O2 keeps its loop state in
//! caller-saved registers across a call to a function of the executable that never writes them
//! (checked with objdump); the replacement writes every caller-saved register. The patch must
//! route the call through a register-preserving thunk so that the caller still computes right.

mod common;
use common::*;
use std::process::Command;

/// The disassembly of function `name` in `exe`.
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
fn e2e_caller_saved_registers_survive_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["ipa_ra.c"], "ipa_ra", &[]);
    // The premise: run_loop calls twice in a loop with no stack frame and no callee-saved
    // register, so its loop counter, bound and sum live in caller-saved registers across
    // the call — legal only because gcc saw that twice does not write them.
    let run_loop = disassemble(&exe, "run_loop");
    assert!(
        run_loop.contains("call") && run_loop.contains("<twice>"),
        "{run_loop}"
    );
    assert!(
        !run_loop.contains("push"),
        "run_loop saves registers:\n{run_loop}"
    );
    assert!(
        !run_loop.contains("(%rsp)"),
        "run_loop uses the stack:\n{run_loop}"
    );
    let replacement = object(dir.path(), "new_ipa_ra.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &replacement, &[], "p.lp");

    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "sum=9900");
    let out = livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    assert!(out.contains("via register-saving thunk"), "{out}");
    target.expect_steady(5, |l| l == "sum=10000");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(3, |l| l == "sum=9900");
}

//! The code livepatch generates around a patch — each function's trampoline, its dispatch
//! (nonstop mode), its register-preserving thunk, its callers' trampolines — has names in
//! `/tmp/perf-PID.map` and for gdb (review session 5, #4): a perf map line with the exact
//! address (the one `livepatch status --json` or the state reports) and length (the bytes in
//! the process decode to exactly that piece: the dispatch's three instructions, a
//! trampoline's relocated instructions ending in its jump back, a thunk ending in its `ret`),
//! and gdb, given the script, names those addresses and nothing past their ends. A revert
//! removes the lines and the symbol file as it does the new functions'.

mod common;
use common::*;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic};
use lp_userspace::process::Memory;
use std::collections::HashMap;
use std::process::Command;

/// The lines of `/tmp/perf-PID.map` tagged with patch `id`: name → (address, length).
fn perf_lines(pid: &str, id: &str) -> HashMap<String, (u64, u64)> {
    let text = std::fs::read_to_string(format!("/tmp/perf-{pid}.map")).unwrap_or_default();
    let tag = format!(" [livepatch {id}]");
    text.lines()
        .filter_map(|l| l.strip_suffix(&tag))
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let addr = u64::from_str_radix(parts.next().unwrap(), 16).unwrap();
            let len = u64::from_str_radix(parts.next().unwrap(), 16).unwrap();
            (parts.next().unwrap().to_string(), (addr, len))
        })
        .collect()
}

fn hex(v: &serde_json::Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

/// The instructions of `[addr, addr + len)` in the process; panics unless they end exactly
/// at `addr + len`.
fn code(pid: &str, addr: u64, len: u64) -> Vec<Instruction> {
    let bytes = Memory::open(pid.parse().unwrap())
        .unwrap()
        .read_vec(addr, len as usize)
        .unwrap();
    let mut d = Decoder::with_ip(64, &bytes, addr, DecoderOptions::NONE);
    let all: Vec<_> = d.iter().collect();
    assert!(
        all.iter().all(|i| !i.is_invalid()),
        "{addr:#x}+{len}: not code"
    );
    assert_eq!(all.last().unwrap().next_ip(), addr + len, "{addr:#x}+{len}");
    all
}

/// The named piece `name` in `lines`, at `addr`; returns its length.
fn named_at(lines: &HashMap<String, (u64, u64)>, name: &str, addr: u64) -> u64 {
    let &(at, len) = lines
        .get(name)
        .unwrap_or_else(|| panic!("no perf map line `{name}` in {lines:#x?}"));
    assert_eq!(at, addr, "{name}");
    len
}

/// A trampoline: the displaced instructions, then the jump back into the code after them
/// (`back_from..back_to`).
fn assert_trampoline(pid: &str, addr: u64, len: u64, back_from: u64, back_to: u64) {
    let code = code(pid, addr, len);
    let last = code.last().unwrap();
    assert_eq!(last.mnemonic(), Mnemonic::Jmp, "{addr:#x}: {code:?}");
    let back = last.near_branch_target();
    assert!(
        back > back_from && back <= back_to,
        "{addr:#x} jumps to {back:#x}"
    );
}

/// What gdb, loading the livepatch script, says about each address.
fn gdb_info_symbol(pid: &str, addrs: &[u64]) -> Vec<String> {
    let script = format!("/tmp/livepatch-{pid}.gdb");
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-p", pid, "-x", &script]);
    for a in addrs {
        cmd.args(["-ex", &format!("info symbol {a:#x}")]);
    }
    let out = cmd.output().expect("run gdb");
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<String> = text
        .lines()
        .filter(|l| l.contains(" in section ") || l.starts_with("No symbol matches"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        answers.len(),
        addrs.len(),
        "gdb said:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    answers
}

/// The lines, symbol file and gdb command of patch `id` are gone after its revert.
fn assert_forgotten(pid: &str, id: &str) {
    assert!(perf_lines(pid, id).is_empty(), "perf map lines left");
    let stubs = format!("/tmp/livepatch-{pid}-{id}-stubs.o");
    assert!(!std::path::Path::new(&stubs).exists(), "{stubs} left");
    let script = std::fs::read_to_string(format!("/tmp/livepatch-{pid}.gdb")).unwrap_or_default();
    assert!(!script.contains(&stubs), "{script}");
}

const ORIGINAL: &str = "direct=42 tail=100021 pointer=42";
const NEW: &str = "direct=1041 tail=101020 pointer=1041";

/// work() with two direct callers (main's call, tail's jmp): a trampoline for the entry and
/// one per caller, and in nonstop mode the entry's dispatch.
fn trampolines_and_dispatch(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "new.o", &[]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == ORIGINAL);
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap(), "--mode", mode]);
    target.expect_steady(2, |l| l == NEW);

    let json = status_json(&pid);
    let p = &json[0]["patches"][0];
    let f = &p["functions"][0];
    let (old, new, tramp) = (hex(&f["old"]), hex(&f["new"]), hex(&f["trampoline"]));
    let lines = perf_lines(&pid, &id);

    // The new function, as before; then the generated code.
    named_at(&lines, "work", new);
    let tramp_len = named_at(&lines, "livepatch trampoline work", tramp);
    assert_trampoline(&pid, tramp, tramp_len, old, old + 16);
    let mut named = vec![(tramp, tramp_len, "livepatch trampoline work".to_string())];

    let dispatch = f.get("dispatch").map(hex);
    assert_eq!(dispatch.is_some(), mode == "nonstop", "{f}");
    match dispatch {
        Some(d) => {
            let len = named_at(&lines, "livepatch dispatch work", d);
            assert_eq!(len, 18);
            let code = code(&pid, d, len);
            let m: Vec<_> = code.iter().map(Instruction::mnemonic).collect();
            assert_eq!(m, [Mnemonic::Test, Mnemonic::Jne, Mnemonic::Jmp]);
            assert_eq!(code[1].near_branch_target(), new, "jnz to the new code");
            assert_eq!(code[2].near_branch_target(), tramp, "jmp to the trampoline");
            named.push((d, len, "livepatch dispatch work".into()));
        }
        None => assert!(!lines.keys().any(|n| n.contains("dispatch")), "{lines:?}"),
    }

    // The callers' trampolines, at the addresses the state records.
    let st = lp_userspace::state::read(pid.parse().unwrap()).unwrap();
    let work = &st.patches[0].functions[0];
    assert_eq!(work.call_sites.len(), 2);
    for c in &work.call_sites {
        let name = format!("livepatch trampoline work at {}", c.caller);
        let len = named_at(&lines, &name, c.trampoline);
        // The caller's branch to work relocated, then the jump back past the site (never
        // reached after a tail call's jmp); a call as the push of its return address (past
        // the site: imm32, then the upper half) and a jmp.
        let code = code(&pid, c.trampoline, len);
        let to: Vec<_> = code
            .iter()
            .map(|i| (i.mnemonic(), i.near_branch_target()))
            .collect();
        let after = c.addr + c.original.len() as u64;
        if c.original[0] == 0xe9 {
            assert_eq!(
                to,
                [(Mnemonic::Jmp, old), (Mnemonic::Jmp, after)],
                "{}",
                c.caller
            );
        } else {
            assert_eq!(
                to,
                [
                    (Mnemonic::Push, 0),
                    (Mnemonic::Mov, 0),
                    (Mnemonic::Jmp, old)
                ],
                "{}",
                c.caller
            );
            let ret = (u64::from(code[1].immediate32()) << 32) | u64::from(code[0].immediate32());
            assert_eq!(ret, after, "{}", c.caller);
        }
        named.push((c.trampoline, len, name));
    }
    assert_eq!(
        lines.len(),
        named.len() + 1,
        "one line per piece and the new function: {lines:#x?}"
    );

    // gdb with the script (as the README says) names each piece from its first to its last
    // byte, and not the byte after it (padding up to the next piece).
    let cmd = p["gdb_stubs_command"].as_str().expect("gdb_stubs_command");
    let script = std::fs::read_to_string(format!("/tmp/livepatch-{pid}.gdb")).unwrap();
    assert!(script.lines().any(|l| l == cmd), "{script}");
    let mut addrs = Vec::new();
    for (at, len, _) in &named {
        addrs.extend([*at, at + len - 1, at + len]);
    }
    let said = gdb_info_symbol(&pid, &addrs);
    for (i, (_, len, name)) in named.iter().enumerate() {
        let stubs = format!("in section .livepatch of /tmp/livepatch-{pid}-{id}-stubs.o");
        assert_eq!(said[3 * i], format!("{name} {stubs}"));
        assert_eq!(said[3 * i + 1], format!("{name} + {} {stubs}", len - 1));
        assert!(
            !said[3 * i + 2].starts_with(name.as_str()),
            "past the end of {name}: {}",
            said[3 * i + 2]
        );
    }

    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.expect_steady(2, |l| l == ORIGINAL);
    assert_forgotten(&pid, &id);
}

#[test]
fn e2e_trampolines_have_names_stop() {
    trampolines_and_dispatch("stop");
}

#[test]
fn e2e_trampolines_and_dispatches_have_names_nonstop() {
    trampolines_and_dispatch("nonstop");
}

/// A register-preserving thunk (the ipa_ra fixture's replacement writes registers its
/// callers keep values in) is named from its first instruction to its `ret`.
#[test]
fn e2e_thunks_have_names() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["ipa_ra.c"], "ipa_ra", &[]);
    let obj = object(dir.path(), "new_ipa_ra.c", "new.o", &[]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "sum=9900");
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.expect_steady(2, |l| l == "sum=10000");

    let json = status_json(&pid);
    let f = &json[0]["patches"][0]["functions"][0];
    let thunk = hex(f.get("thunk").expect("a thunk in the status"));
    let lines = perf_lines(&pid, &id);
    let len = named_at(&lines, "livepatch thunk twice", thunk);
    let code = code(&pid, thunk, len);
    assert_eq!(code.last().unwrap().flow_control(), FlowControl::Return);
    assert!(
        code.iter()
            .any(|i| i.mnemonic() == Mnemonic::Call && i.near_branch_target() == hex(&f["new"])),
        "the thunk calls the new function"
    );
    let said = gdb_info_symbol(&pid, &[thunk + len - 1]);
    assert!(
        said[0].starts_with(&format!("livepatch thunk twice + {} in section", len - 1)),
        "{said:?}"
    );

    livepatch_ok(&["revert", &pid]);
    target.expect_steady(2, |l| l == "sum=9900");
    assert_forgotten(&pid, &id);
}

/// ipa_ra.c's target with a replacement of twice() that sleeps: it writes every caller-saved
/// register (a call), so it runs through a thunk, and the thread is nearly always inside it.
const SLEEPY_TWICE: &str = r#"
#include <unistd.h>
int twice(int x) {
    usleep(2000);
    return x + x + 1;
}
"#;

/// gdb, given the script, unwinds from the new function through its thunk (with the thunk's
/// CFI from the symbol file) up to the caller and main: without it gdb would guess the
/// thunk's frame (registers it pushed taken for the return address).
#[test]
fn e2e_gdb_unwinds_through_a_thunk() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["ipa_ra.c"], "ipa_ra", &[]);
    let src = dir.path().join("sleepy.c");
    std::fs::write(&src, SLEEPY_TWICE).unwrap();
    let obj = dir.path().join("sleepy.o");
    let (s, o) = (src.to_str().unwrap(), obj.to_str().unwrap());
    cc("gcc", &["-O2", "-c", "-fPIC", s, "-o", o]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "sum=9900");
    let out = livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    assert!(out.contains("via register-saving thunk"), "{out}");
    target.expect_steady(2, |l| l == "sum=10000");
    let cmd = status_json(&pid)[0]["patches"][0]["gdb_stubs_command"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(cmd.contains(" -s .eh_frame 0x"), "{cmd}");

    // The thread sleeps in twice ~90% of the time: a few tries find it there.
    let script = format!("/tmp/livepatch-{pid}.gdb");
    let mut last = String::new();
    for _ in 0..20 {
        let out = Command::new("gdb")
            .args(["-batch", "-nx", "-p", &pid, "-x", &script, "-ex", "bt"])
            .output()
            .expect("run gdb");
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        let frames: Vec<&str> = last.lines().filter(|l| l.starts_with('#')).collect();
        let Some(at) = frames
            .iter()
            .position(|f| f.contains("livepatch thunk twice"))
        else {
            continue;
        };
        assert!(
            frames[at - 1].contains(" twice "),
            "the new twice called by the thunk:\n{last}"
        );
        let rest: Vec<_> = frames[at + 1..].to_vec();
        assert!(
            rest.len() >= 2 && rest[0].contains(" run_loop ") && rest[1].contains(" main "),
            "the thunk's caller and main after it:\n{last}"
        );
        livepatch_ok(&["revert", &pid]);
        return;
    }
    panic!("never stopped inside the thunk:\n{last}");
}

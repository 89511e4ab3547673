//! Call-site rewriting on live processes: a gcc -O2 target calls work() directly from main
//! (`call`), as a tail call from tail() (`jmp`) and through a function pointer. After apply
//! every line shows the new work() and the two branches in the process's memory go straight
//! to the new code (its effective destination); the pointer call still reaches it through the
//! redirect. After revert the branches are the file's bytes again. Stacking re-points them at
//! the patch on top and back. A caller changed by someone else is left alone with a warning
//! (the fix applies); one that a patch below retargeted refuses the next patch with nothing
//! written. Stop and nonstop mode.

mod common;
use common::*;
use lp_userspace::elf::Module;
use lp_userspace::patchfile::Patch;
use lp_userspace::process::Memory;
use lp_userspace::state::{self, AppliedFunction};

const ORIGINAL: &str = "direct=42 tail=100021 pointer=42";
const NEW: &str = "direct=1041 tail=101020 pointer=1041";
const NEW2: &str = "direct=2041 tail=102020 pointer=2041";

struct Fixture {
    _dir: tempfile::TempDir,
    exe: std::path::PathBuf,
    p1: std::path::PathBuf,
    p2: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let o1 = object(dir.path(), "new_work.c", "n1.o", &[]);
    let o2 = object(dir.path(), "new_work2.c", "n2.o", &[]);
    let (p1, _) = pack(dir.path(), &exe, &o1, &[], "p1.lp");
    let (p2, _) = pack(dir.path(), &exe, &o2, &[], "p2.lp");
    Fixture {
        _dir: dir,
        exe,
        p1,
        p2,
    }
}

/// The version in the header of the in-target state.
/// work's record in the newest applied patch.
fn top_work(pid: i32) -> AppliedFunction {
    let st = state::read(pid).unwrap();
    st.patches.last().expect("a patch applied").functions[0].clone()
}

/// Where the branch at each of the patch's call sites goes now, in the process's memory.
fn targets_in_memory(pid: i32, patch: &Patch, bias: u64) -> Vec<u64> {
    let mem = Memory::open(pid).unwrap();
    patch.functions[0]
        .call_sites
        .iter()
        .map(|c| {
            let addr = bias + c.vaddr;
            let now = mem.read_vec(addr, c.bytes.len()).unwrap();
            lp_core::call_site::decode(addr, &now).unwrap().target
        })
        .collect()
}

/// Every call site and work() itself hold the file's bytes.
fn assert_original_bytes(pid: i32, patch: &Patch, bias: u64) {
    let mem = Memory::open(pid).unwrap();
    let f = &patch.functions[0];
    for c in &f.call_sites {
        assert_eq!(
            mem.read_vec(bias + c.vaddr, c.bytes.len()).unwrap(),
            c.bytes,
            "call site {}",
            c.caller
        );
    }
    assert_eq!(
        mem.read_vec(bias + f.old_vaddr, f.old_bytes.len()).unwrap(),
        f.old_bytes
    );
}

fn call_sites(mode: &str) {
    let fx = fixture();
    let patch = Patch::load(&fx.p1).unwrap();
    assert_eq!(
        patch.functions[0].call_sites.len(),
        2,
        "main's call and tail's jmp"
    );
    let target = Target::spawn(&fx.exe, &[]);
    let pid = target.pid();
    let ipid: i32 = pid.parse().unwrap();
    let bias = bias(ipid, &fx.exe);
    target.expect_steady(2, |l| l == ORIGINAL);

    let out = livepatch_ok(&["apply", &pid, fx.p1.to_str().unwrap(), "--mode", mode]);
    target.expect_steady(3, |l| l == NEW);
    let work = top_work(ipid);
    assert_eq!(work.call_sites.len(), 2, "{out}");
    // Straight to the new code (its thunk when it has one), not to the old entry: in nonstop
    // mode too, once the apply is done (its callers lead to the dispatch until the commit).
    let dest = work.via;
    assert_eq!(work.dispatch.is_some(), mode == "nonstop");
    assert_ne!(dest, work.old);
    assert_eq!(targets_in_memory(ipid, &patch, bias), vec![dest, dest]);
    // A tool that does not know call sites must not read (and revert) this state.
    assert_eq!(state_version(ipid), 2);
    let status = livepatch_ok(&["status", &pid]);
    assert!(status.contains("(2 direct callers rewritten)"), "{status}");
    assert_eq!(
        status_json(&pid)[0]["patches"][0]["functions"][0]["call_sites"],
        2
    );

    // Each call site's trampoline (what a thread trapping there runs) has unwind information.
    let mut unwinder = lp_userspace::unwind::Unwinder::new();
    lp_userspace::debug_info::add_patch_cfi(ipid, &mut unwinder);
    for c in &work.call_sites {
        let covered = unwinder
            .sources()
            .iter()
            .any(|s| s.start <= c.trampoline && c.trampoline < s.end);
        // A tail call's trampoline is never returned into: CFI is optional there.
        assert!(covered || c.original[0] == 0xe9, "no CFI for {}", c.caller);
    }

    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.expect_steady(3, |l| l == ORIGINAL);
    assert_original_bytes(ipid, &patch, bias);
    assert_eq!(state_version(ipid), 1);
}

#[test]
fn e2e_call_sites_point_at_the_new_code_stop() {
    call_sites("stop");
}

#[test]
fn e2e_call_sites_point_at_the_new_code_nonstop() {
    call_sites("nonstop");
}

fn stacked(mode: &str) {
    let fx = fixture();
    let patch = Patch::load(&fx.p1).unwrap();
    let target = Target::spawn(&fx.exe, &[]);
    let pid = target.pid();
    let ipid: i32 = pid.parse().unwrap();
    let bias = bias(ipid, &fx.exe);

    livepatch_ok(&["apply", &pid, fx.p1.to_str().unwrap(), "--mode", mode]);
    target.expect_steady(2, |l| l == NEW);
    let first = top_work(ipid).via;
    livepatch_ok(&["apply", &pid, fx.p2.to_str().unwrap(), "--mode", mode]);
    target.expect_steady(2, |l| l == NEW2);
    let second = top_work(ipid);
    assert_ne!(second.via, first);
    assert_eq!(targets_in_memory(ipid, &patch, bias), vec![second.via; 2]);
    // What the second patch replaced at each site is the first patch's branch.
    for c in &second.call_sites {
        let before = lp_core::call_site::decode(c.addr, &c.saved).unwrap().target;
        assert_eq!(before, first, "{}", c.caller);
    }

    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.expect_steady(2, |l| l == NEW);
    assert_eq!(targets_in_memory(ipid, &patch, bias), vec![first; 2]);
    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.expect_steady(2, |l| l == ORIGINAL);
    assert_original_bytes(ipid, &patch, bias);
}

#[test]
fn e2e_call_sites_follow_stacked_patches_stop() {
    stacked("stop");
}

#[test]
fn e2e_call_sites_follow_stacked_patches_nonstop() {
    stacked("nonstop");
}

/// Runs `f` with process `pid` stopped (SIGSTOP), so a write to its code cannot race it.
fn while_stopped(pid: i32, f: impl FnOnce()) {
    // SAFETY: kill(2) with a pid we started; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let state = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap()
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    while state() != "T" {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    f();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

#[test]
fn e2e_a_caller_changed_by_someone_else_is_left_alone() {
    let fx = fixture();
    let patch = Patch::load(&fx.p1).unwrap();
    let target = Target::spawn(&fx.exe, &[]);
    let pid = target.pid();
    let ipid: i32 = pid.parse().unwrap();
    let bias = bias(ipid, &fx.exe);
    // Someone else points main's call of work() at tail(): direct=tail(41).
    let main_site = patch.functions[0]
        .call_sites
        .iter()
        .find(|c| c.caller.starts_with("main+"))
        .unwrap()
        .clone();
    let tail = Module::open(&fx.exe).unwrap().lookup("tail").unwrap().value;
    let addr = bias + main_site.vaddr;
    let theirs =
        lp_core::call_site::encode(lp_core::call_site::BranchKind::Call, addr, bias + tail)
            .unwrap()[..5]
            .to_vec();
    while_stopped(ipid, || {
        Memory::open(ipid).unwrap().write(addr, &theirs).unwrap()
    });
    target.wait_line_after(target.count(), |l| {
        l == "direct=100042 tail=100021 pointer=42"
    });

    for mode in ["stop", "nonstop"] {
        // A call site is an optimisation: the fix applies, that caller is left as they made
        // it (its calls reach the redirect), with a warning naming it.
        let out = livepatch(&["apply", &pid, fx.p1.to_str().unwrap(), "--mode", mode]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("warning: call site main+") && stderr.contains("left alone"),
            "{stderr}"
        );
        target.expect_steady(2, |l| l == "direct=101041 tail=101020 pointer=1041");
        let work = top_work(ipid);
        assert_eq!(work.call_sites.len(), 1, "tail's jmp only");
        let mem = Memory::open(ipid).unwrap();
        assert_eq!(mem.read_vec(addr, 5).unwrap(), theirs);
        livepatch_ok(&["revert", &pid, "--mode", mode]);
        target.expect_steady(2, |l| l == "direct=100042 tail=100021 pointer=42");
        assert_eq!(mem.read_vec(addr, 5).unwrap(), theirs);
        let f = &patch.functions[0];
        for c in f.call_sites.iter().filter(|c| c.vaddr != main_site.vaddr) {
            assert_eq!(
                mem.read_vec(bias + c.vaddr, c.bytes.len()).unwrap(),
                c.bytes
            );
        }
    }
}

#[test]
fn e2e_a_retargeted_caller_changed_by_someone_else_refuses_the_next_patch() {
    // A caller the first patch retargeted must follow the second: if someone changed it, the
    // second patch cannot leave it (it would keep calling the first's version) and is refused
    // with nothing written.
    let fx = fixture();
    let patch = Patch::load(&fx.p1).unwrap();
    let target = Target::spawn(&fx.exe, &[]);
    let pid = target.pid();
    let ipid: i32 = pid.parse().unwrap();
    livepatch_ok(&["apply", &pid, fx.p1.to_str().unwrap()]);
    target.expect_steady(2, |l| l == NEW);
    let work = top_work(ipid);
    let site = work
        .call_sites
        .iter()
        .find(|c| c.caller.starts_with("main+"))
        .unwrap()
        .clone();
    // Pointed back at the old entry by someone else: still the first patch's behaviour.
    while_stopped(ipid, || {
        Memory::open(ipid)
            .unwrap()
            .write(site.addr, &site.original)
            .unwrap()
    });
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for mode in ["stop", "nonstop"] {
        let (code, line) = livepatch_err(&["apply", &pid, fx.p2.to_str().unwrap(), "--mode", mode]);
        assert_eq!(code, 4, "{line}");
        assert!(
            line.contains(&site.caller) && line.contains("nothing written"),
            "{line}"
        );
        target.expect_steady(2, |l| l == NEW);
        let mem = Memory::open(ipid).unwrap();
        assert_eq!(mem.read_vec(site.addr, 5).unwrap(), site.original);
        let f = &patch.functions[0];
        let redirect = mem.read_vec(work.patch_addr, work.written.len()).unwrap();
        assert_eq!(redirect, work.written, "{}", f.old_name);
        let maps_after = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert_eq!(maps_after, maps_before);
    }
}

/// A C target whose work() has `n` direct callers c0..c(n-1), each calling it twice (the
/// second call is a call site; the first lies among c's entry bytes), all run from main.
fn many_callers_source(n: usize) -> String {
    let mut s = String::from(
        "#include <stdio.h>\n#include <time.h>\n#include <unistd.h>\n\
         int __attribute__((noipa)) work(int x) { int r = x + 1; if (x > 1000000) r = x * 7; return r; }\n",
    );
    for i in 0..n {
        s += &format!(
            "int __attribute__((noipa)) c{i}(int x) {{ int r = work(x); return work(r) + {i}; }}\n"
        );
    }
    s += "int (*volatile callers[])(int) = {";
    for i in 0..n {
        s += &format!("c{i},");
    }
    s += "};\nint main(void) {\n setvbuf(stdout, NULL, _IOLBF, 0);\n printf(\"ready %d\\n\", getpid());\n\
          struct timespec ts = {0, 20000000L};\n for (;;) { int sum = 0;\n\
          for (unsigned i = 0; i < sizeof callers / sizeof *callers; i++) sum += callers[i](1);\n\
          printf(\"sum=%d\\n\", sum); nanosleep(&ts, NULL); }\n}\n";
    s
}

#[test]
fn e2e_many_callers_are_capped() {
    let n = 100;
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "many", &many_callers_source(n), &[]);
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (p1, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let patch = Patch::load(&p1).unwrap();
    assert!(
        patch.functions[0].call_sites.len() >= n - 1,
        "pack records them (c0's tail call lies among its entry bytes): {}",
        patch.functions[0].call_sites.len()
    );
    let original: usize = (0..n).map(|i| 3 + i).sum();
    let new: usize = (0..n).map(|i| 2001 + i).sum();
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    let ipid: i32 = pid.parse().unwrap();
    let bias = bias(ipid, &exe);
    target.expect_steady(2, |l| l == format!("sum={original}"));
    for mode in ["stop", "nonstop"] {
        livepatch_ok(&["apply", &pid, p1.to_str().unwrap(), "--mode", mode]);
        target.expect_steady(2, |l| l == format!("sum={new}"));
        // Apply retargets a bounded number: the rest go through the redirect, still new.
        let work = top_work(ipid);
        assert_eq!(work.call_sites.len(), 32);
        livepatch_ok(&["revert", &pid, "--mode", mode]);
        target.expect_steady(2, |l| l == format!("sum={original}"));
        assert_original_bytes(ipid, &patch, bias);
    }
}

/// `(old, new, caught)` from a catcher.cpp line.
fn catcher_counts(line: &str) -> (u64, u64, u64) {
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|kv| kv.split_once('=').unwrap().1.parse().unwrap())
        .collect();
    (v[0], v[1], v[2])
}

#[test]
fn e2e_nonstop_traps_on_a_call_site_keep_the_callers_catch() {
    // 4 threads call caller() → work() (a call site, inside caller's try) in a tight loop, and
    // work() throws for odd numbers. Nonstop apply and revert put int3s on that call site:
    // threads hitting them run the original call from a trampoline, and every exception must
    // still reach caller()'s catch (else std::terminate kills the target).
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("catcher");
    let obj = dir.path().join("new_work.o");
    let src = common::fixture("catcher.cpp").display().to_string();
    let new_src = common::fixture("new_catcher_work.cpp")
        .display()
        .to_string();
    cc(
        "g++",
        &[
            "-O2",
            "-g",
            "-Wl,--build-id",
            &src,
            "-o",
            exe.to_str().unwrap(),
            "-lpthread",
        ],
    );
    cc(
        "g++",
        &["-O2", "-c", "-fPIC", &new_src, "-o", obj.to_str().unwrap()],
    );
    let (p, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = Patch::load(&p).unwrap();
    assert_eq!(
        patch.functions[0].call_sites.len(),
        1,
        "caller's call of work"
    );
    let mut target = Target::spawn_niced(&exe, &[]);
    let pid = target.pid();
    let mut traps = 0;
    for _ in 0..8 {
        let out = livepatch_ok(&[
            "apply",
            &pid,
            p.to_str().unwrap(),
            "--mode",
            "nonstop",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["functions"][0]["call_sites"], 1);
        traps += v["stats"]["traps"].as_u64().unwrap();
        let mark = target.count();
        let (_, new0, _) = catcher_counts(&target.wait_line_after(mark, |_| true));
        target.wait_line_after(mark + 1, |l| catcher_counts(l).1 > new0);
        let out = livepatch_ok(&["revert", &pid, "--mode", "nonstop", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        traps += v["stats"]["traps"].as_u64().unwrap();
        assert!(target.alive(), "the target died");
    }
    assert!(
        traps > 0,
        "no thread reached a temporary int3: the test proves nothing"
    );
    // Still running, still catching, back to the old results.
    let mark = target.count();
    let (old0, _, caught0) = catcher_counts(&target.wait_line_after(mark, |_| true));
    target.wait_line_after(mark + 1, |l| {
        let (old, _, caught) = catcher_counts(l);
        old > old0 && caught > caught0
    });
    assert!(target.alive());
}

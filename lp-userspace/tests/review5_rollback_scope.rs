//! Review session 5, finding 9: a nonstop switch whose later window finds a site changed by
//! someone else fails ("changed while we prepared the switch") and rolls back — only what it
//! wrote. The other party's change stays as it is, and so do the sites of windows that never
//! began.
//!
//! A nonstop revert of callers.c's patch is stopped at its first sync (the callers' window);
//! meanwhile "someone else" points work()'s entry at the patch's trampoline of work (valid
//! code: the old version). The revert then fails at the entries' window: the callers' branches
//! are put back to the dispatch, the flag set again, the record unchanged — and the entry keeps
//! the other party's jump (direct calls run the patch, the pointer call the old version).

mod common;
use common::*;
use lp_userspace::process::Memory;
use lp_userspace::state;

const ORIGINAL: &str = "direct=42 tail=100021 pointer=42";
const NEW: &str = "direct=1041 tail=101020 pointer=1041";
/// Direct and tail calls through the dispatches (flag set), the pointer call through the
/// entry, which now jumps to the old version's trampoline.
const MIXED: &str = "direct=1041 tail=101020 pointer=42";

/// Kills the stopped tool however the test ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn review5_9_a_failed_window_rolls_back_only_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "n1.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p1.lp");
    let patch = patch.display().to_string();
    let mut target = Target::spawn(&exe, &["2"]);
    let pid = target.pid();
    let ipid: i32 = pid.parse().unwrap();
    target.expect_steady(3, |l| l == ORIGINAL);
    livepatch_ok(&["apply", &pid, &patch, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == NEW);
    let st = state::read(ipid).unwrap();
    let p = st.patches[0].clone();
    let work = p.functions[0].clone();
    let flag = p.flag.expect("a nonstop patch has a flag");
    let mem = Memory::open(ipid).unwrap();

    // The revert's callers' window: its int3s written, the tool stopped before the sync
    // (callers.c's only thread is the one it borrowed: nothing runs meanwhile).
    let mut tool = Stopped(stop_tool_at(
        &["revert", &pid, "--mode", "nonstop"],
        "nonstop-sync:1",
    ));
    // Someone else: work's entry -> jmp to work's trampoline (the old version).
    let rel = work.trampoline.wrapping_sub(work.patch_addr + 5) as i64;
    let rel = i32::try_from(rel).expect("the trampoline is within reach");
    let mut theirs = vec![0xe9];
    theirs.extend_from_slice(&rel.to_le_bytes());
    assert_eq!(theirs.len(), work.written.len());
    mem.write(work.patch_addr, &theirs).unwrap();
    // SAFETY: SIGCONT to the tool this test started.
    unsafe { libc::kill(tool.0.id() as i32, libc::SIGCONT) };
    let status = tool.0.wait().unwrap();
    assert!(!status.success(), "the revert must fail: a site changed");
    let mut stderr = String::new();
    std::io::Read::read_to_string(tool.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("changed"), "{stderr}");

    assert!(target.alive());
    assert_eq!(
        mem.read_vec(work.patch_addr, theirs.len()).unwrap(),
        theirs,
        "the other party's change to the entry was overwritten by the rollback"
    );
    assert_eq!(mem.read_vec(flag, 1).unwrap(), [1], "the flag is set again");
    let after = state::read(ipid).unwrap();
    assert_eq!(after.patches.len(), 1);
    assert!(after.unfinished.is_none(), "{:?}", after.unfinished);
    target.expect_steady(3, |l| l == MIXED);

    // The other party takes its change back; the patch then reverts as usual.
    mem.write(work.patch_addr, &work.written).unwrap();
    target.expect_steady(3, |l| l == NEW);
    livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
    target.expect_steady(3, |l| l == ORIGINAL);
}

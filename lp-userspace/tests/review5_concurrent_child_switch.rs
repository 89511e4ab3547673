//! Review session 5, finding 10: a parent and a child forked long before (a prefork server's
//! master and worker) patched at the same time with the same patch. The parent's switch
//! must leave the child's own switch alone: while the child's tool is stopped at its entries'
//! first sync (int3s written, the settle not yet run, nothing committed), the parent's apply
//! must neither write the rest of the child's sites nor set the child's flag.
//!
//! Fails at 42b8350: `finish_children` takes the child for a copy forked mid-switch — its
//! half-way bytes match the parent's plan, its patch memory being at the same address — writes
//! its tails and first bytes without its settle and sets its flag (00 -> 01).

mod common;
use common::*;
use lp_userspace::process::Memory;
use lp_userspace::state;

/// Kills the stopped tool however the test ends (a stopped tracer would keep the child
/// traced).
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILLs the target's child however the test ends.
struct Kill(i32);

impl Drop for Kill {
    fn drop(&mut self) {
        // SAFETY: a signal to the child of the target this test started.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// (entry bytes, flag byte) of the newest patch in `pid`'s state.
fn entry_and_flag(pid: i32) -> (Vec<u8>, u8) {
    let st = state::read(pid).unwrap();
    let p = st.patches.last().expect("a patch recorded (applying)");
    let f = &p.functions[0];
    let mem = Memory::open(pid).unwrap();
    let entry = mem.read_vec(f.patch_addr, f.written.len()).unwrap();
    let flag = mem.read_vec(p.flag.expect("a nonstop patch"), 1).unwrap()[0];
    (entry, flag)
}

#[test]
fn review5_10_a_parents_switch_leaves_a_childs_own_switch_alone() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["fork_on_usr1.c"], "fk", &[]);
    let patch = compute_patch(dir.path(), &exe);
    let target = Target::spawn(&exe, &[]);
    let parent = target.pid();
    target.wait_line(|l| l == "parent value=42");
    // SAFETY: a signal to the process this test started.
    unsafe { libc::kill(parent.parse().unwrap(), libc::SIGUSR1) };
    let line = target.wait_line(|l| l.starts_with("child "));
    let child: String = line.split_whitespace().nth(1).unwrap().to_string();
    let ichild: i32 = child.parse().unwrap();
    let _child = Kill(ichild);
    target.wait_line(|l| l == "child value=42");

    // The child's own switch: callers done, the entries' int3s written, stopped before the
    // sync (so before the settle and the commit).
    let _tool = Stopped(stop_tool_at(
        &["apply", &child, &patch, "--mode", "nonstop"],
        "nonstop-sync:4",
    ));
    let (entry, flag) = entry_and_flag(ichild);
    assert_eq!(
        entry[0], 0xcc,
        "the child's entry has its int3: {entry:02x?}"
    );
    assert_eq!(flag, 0);

    // Meanwhile the parent is patched (and processes fork elsewhere on the machine, as they
    // do on any busy one: finish_children only looks when some fork happened).
    let forks = std::thread::spawn(|| {
        for _ in 0..300 {
            let _ = std::process::Command::new("true").status();
        }
    });
    livepatch_ok(&["apply", &parent, &patch, "--mode", "nonstop"]);
    forks.join().unwrap();
    target.wait_line(|l| l == "parent value=1041");

    let (after, flag) = entry_and_flag(ichild);
    assert_eq!(
        (after.clone(), flag),
        (entry.clone(), 0),
        "the parent's switch changed the child's half-way entry ({entry:02x?} -> {after:02x?}) or its flag"
    );
}

//! Nonstop mode's in-target trap handler, observed from outside on real gcc-compiled targets:
//! a process with its own SIGTRAP action keeps every one of its traps and gets its action
//! back; during a nonstop apply of a busy target no thread but the borrowed one is ever traced.

mod common;
use common::*;
use lp_userspace::apply::{apply, ApplyOptions, Mode};
use lp_userspace::patchfile::Patch;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .to_string()
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key).parse().unwrap()
}

/// SIGTRAP's bit in mask `name` (SigCgt, SigIgn) of /proc/PID/status.
fn sigtrap_in(pid: &str, name: &str) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    mask & (1 << (libc::SIGTRAP - 1)) != 0
}

/// Applies and reverts in nonstop mode several times while the trapper raises its own traps;
/// after each step, the process's action is its own again and its traps all reached it.
fn own_traps_survive(arg: &str, mask: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["trapper.c"], "trapper", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn_niced(&exe, &[arg]);
    let pid = target.pid();
    assert!(sigtrap_in(&pid, mask));
    let mut last_raised = 0;
    for round in 0..4 {
        // A generous timeout: on a loaded machine a `nice 19` thread runs rarely, and each must
        // be seen to run past the bytes the switch overwrites.
        let out = livepatch_ok(&[
            "apply",
            &pid,
            &patch,
            "--mode",
            "nonstop",
            "--timeout",
            "60",
        ]);
        assert!(out.contains("nonstop"), "{out}");
        let mark = target.count();
        let line = target.wait_line_after(mark + 1, |l| num(l, "new") > 0);
        assert_eq!(
            field(&line, "action"),
            "own",
            "round {round} after apply: {line}"
        );
        assert!(sigtrap_in(&pid, mask), "round {round}: {mask} lost");
        livepatch_ok(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);
        let mark = target.count();
        let line = target.wait_line_after(mark + 1, |_| true);
        assert_eq!(
            field(&line, "action"),
            "own",
            "round {round} after revert: {line}"
        );
        assert!(sigtrap_in(&pid, mask));
        // Its traps kept coming (the trapping thread aborts on a trap that did not reach
        // its handler at once).
        assert!(num(&line, "raised") > last_raised, "{line}");
        last_raised = num(&line, "raised");
        if arg == "handler" {
            assert!(num(&line, "handled") >= last_raised, "{line}");
        } else {
            assert_eq!(num(&line, "handled"), 0, "{line}");
        }
        assert!(target.alive(), "target died in round {round}");
    }
}

#[test]
fn e2e_nonstop_process_handler_gets_all_its_traps_and_its_action_back() {
    own_traps_survive("handler", "SigCgt");
}

#[test]
fn e2e_nonstop_ignored_sigtrap_stays_ignored() {
    own_traps_survive("ignore", "SigIgn");
}

#[test]
fn e2e_nonstop_a_foreign_trap_under_sig_dfl_kills_with_sigtrap() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["trapper.c"], "trapper", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn_niced(&exe, &["dfl"]);
    let pid = target.pid();
    // One of its threads executes an int3 of its own as soon as our handler is installed:
    // chained to SIG_DFL, the process dies of SIGTRAP, as it would have without us.
    let (code, msg) = livepatch_err(&[
        "apply",
        &pid,
        &patch,
        "--mode",
        "nonstop",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, 5, "{msg}");
    assert!(msg.contains("exited"), "{msg}");
    let status = target.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTRAP), "{status:?}");
}

/// A nonstop apply of the trapper started with `arg` is refused with `reason`; the process is
/// left as it was (old code, its own action, no patch) and stop mode can still patch it.
fn refused(arg: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["trapper.c"], "trapper", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn_niced(&exe, &[arg]);
    let pid = target.pid();
    let (code, msg) = livepatch_err(&[
        "apply",
        &pid,
        &patch,
        "--mode",
        "nonstop",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, 10, "{msg}");
    assert!(msg.contains(reason), "{msg}");
    let mark = target.count();
    let line = target.wait_line_after(mark + 1, |_| true);
    assert_eq!(num(&line, "new"), 0, "{line}");
    assert_eq!(field(&line, "action"), "own", "{line}");
    assert!(sigtrap_in(&pid, "SigCgt"));
    let st = lp_userspace::status::status(Some(target.child.id() as i32)).unwrap();
    assert!(st.iter().all(|p| p.patches.is_empty()), "{st:?}");
    livepatch_ok(&["apply", &pid, &patch, "--timeout", "60"]);
    let mark = target.count();
    target.wait_line_after(mark + 1, |l| num(l, "new") > 0);
    assert!(target.alive());
}

#[test]
fn e2e_nonstop_refuses_a_thread_that_keeps_sigtrap_blocked() {
    refused("blocker", "keeps SIGTRAP blocked");
}

#[test]
fn e2e_nonstop_refuses_a_one_shot_sigtrap_handler() {
    refused("resethand", "SA_RESETHAND");
}

#[test]
fn e2e_nonstop_busy_threads_are_never_traced() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["stress.c"], "stress", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch_path, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = Patch::load(&patch_path).unwrap();
    let mut target = Target::spawn_niced(&exe, &["8"]);
    let pid = target.child.id() as i32;
    // Another thread samples every thread's TracerPid while an apply runs.
    let applying = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let traced = Arc::new(Mutex::new(BTreeSet::new()));
    let samples = Arc::new(Mutex::new(0u64));
    let sampler = {
        let (applying, done, traced, samples) = (
            applying.clone(),
            done.clone(),
            traced.clone(),
            samples.clone(),
        );
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if !applying.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                    continue;
                };
                for e in dir.flatten() {
                    let tid = e.file_name().to_string_lossy().into_owned();
                    let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                    else {
                        continue;
                    };
                    let tracer = st
                        .lines()
                        .find_map(|l| l.strip_prefix("TracerPid:"))
                        .map(|v| v.trim().to_string())
                        .unwrap_or_default();
                    if applying.load(Ordering::Acquire) && tracer != "0" {
                        traced.lock().unwrap().insert(tid.parse::<i32>().unwrap());
                    }
                }
                *samples.lock().unwrap() += 1;
            }
        })
    };
    let opts = ApplyOptions {
        mode: Mode::Nonstop,
        timeout: Duration::from_secs(60),
    };
    for cycle in 0..10 {
        applying.store(true, Ordering::Release);
        let r = apply(pid, &patch, opts);
        applying.store(false, Ordering::Release);
        let applied = r.unwrap_or_else(|e| panic!("cycle {cycle}: apply: {e}"));
        assert!(!applied.stats.trap_handler_kept);
        let mark = target.count();
        target.wait_line_after(mark + 1, |l| num(l, "new") > 0);
        lp_userspace::revert::revert(pid, None, Mode::Nonstop, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("cycle {cycle}: revert: {e}"));
        // Every call returned the old or the new value (the fixture aborts otherwise).
        assert!(target.alive(), "target died in cycle {cycle}");
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(*samples.lock().unwrap() > 10, "the sampler hardly ran");
    // The main thread sleeps in nanosleep between its prints: it is the one borrowed.
    let traced = traced.lock().unwrap().clone();
    assert!(
        traced.iter().all(|&tid| tid == pid),
        "threads other than the borrowed main thread {pid} were traced: {traced:?}"
    );
}

/// Review N3: a thread blocked in a signal handler whose interrupted context lies between the
/// instructions a nonstop switch overwrites is not past them: it resumes there when the
/// handler returns. The switch must wait for it (busy at the timeout, everything put back),
/// not rewrite the bytes under it. Released, the thread finishes the original instructions;
/// then the apply goes through.
#[test]
fn e2e_nonstop_waits_for_a_handler_interrupting_the_displaced_bytes() {
    handler_interrupting_the_displaced_bytes("block");
}

/// Review R5: the same with a handler that keeps *running* (it polls for the byte): its CPU
/// time once passed for "moved on", the bytes were rewritten under it, and the thread died of
/// SIGILL when the handler returned.
#[test]
fn e2e_nonstop_waits_for_a_running_handler_interrupting_the_displaced_bytes() {
    handler_interrupting_the_displaced_bytes("spin");
}

/// R5's gap: the same running handler installed with SA_NODEFER and an empty mask — while it
/// runs, the thread blocks no signal, so its mask tells nothing (the thread died of SIGILL).
#[test]
fn e2e_nonstop_waits_for_a_running_handler_that_blocks_nothing() {
    handler_interrupting_the_displaced_bytes("spin-nodefer");
}

/// Review session 4, S11: the same blocked handler with 64 KiB of locals: its signal frame
/// (the interrupted rip) lies that far above its stack pointer, beyond the 32 KiB once searched.
#[test]
fn e2e_nonstop_waits_for_a_deep_handler_interrupting_the_displaced_bytes() {
    handler_interrupting_the_displaced_bytes("deep");
}

/// `how`: the handler waits for the test's byte blocked in read() ("block", "deep"), or polling
/// ("spin"), or polling with SA_NODEFER and an empty mask ("spin-nodefer").
fn handler_interrupting_the_displaced_bytes(how: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["parked.c"], "parked", &["-pthread"]);
    let obj = object(dir.path(), "new_parked.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = patch.display().to_string();
    let fifo = dir.path().join("release");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c_fifo is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let mut target = Target::spawn(&exe, &[fifo.to_str().unwrap(), how]);
    let pid = target.pid();
    target.wait_line(|l| l == "parked");
    std::thread::sleep(Duration::from_millis(100)); // in the handler's read() (or its loop)
    let (code, err) =
        livepatch_err(&["apply", &pid, &patch, "--mode", "nonstop", "--timeout", "1"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("busy"), "{err}");
    // Released: the add at compute + 3 runs from the original bytes (8, not a crash).
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    std::io::Write::write_all(&mut w, b"x").unwrap();
    target.wait_line(|l| l == "compute 8");
    livepatch_ok(&["apply", &pid, &patch, "--mode", "nonstop"]);
    // No thread of the target is left with another scheduling policy (only the tool's own
    // thread runs SCHED_FIFO during the window; review R1).
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        let policy = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(38);
        assert_eq!(policy, Some("0"), "{stat}");
    }
    let mark = target.count();
    std::io::Write::write_all(&mut w, b"x").unwrap();
    let line = target.wait_line_after(mark, |l| l.starts_with("compute "));
    assert_eq!(line, "compute 1008");
    assert!(target.alive());
}

/// Review N6: a process forked by the target while a nonstop switch has its int3s in place
/// gets the switch's final bytes too — its calls keep working after later switches, and no
/// int3 of ours stays in its code. The fixture forks a child every millisecond through 10
/// apply/revert cycles; each child checks its results and its code, and the reaper reports
/// any child that did not end well.
#[test]
fn e2e_nonstop_finishes_the_switch_in_children_forked_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["forker.c"], "forker", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let patch = Patch::load(&patch).unwrap();
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.child.id() as i32;
    let opts = ApplyOptions {
        mode: Mode::Nonstop,
        timeout: Duration::from_secs(30),
    };
    for cycle in 0..10 {
        apply(pid, &patch, opts).unwrap_or_else(|e| panic!("cycle {cycle}: apply: {e}"));
        std::thread::sleep(Duration::from_millis(30));
        lp_userspace::revert::revert(pid, None, Mode::Nonstop, opts.timeout)
            .unwrap_or_else(|e| panic!("cycle {cycle}: revert: {e}"));
        std::thread::sleep(Duration::from_millis(30));
    }
    // Every child forked during the cycles has ended (they live ~120 ms, or up to 5 s while
    // an int3 stays in their code).
    std::thread::sleep(Duration::from_millis(5500));
    let mark = target.count();
    target.wait_line_after(mark, |l| l.starts_with("reaped "));
    let bad: Vec<String> = target
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("bad "))
        .collect();
    assert!(bad.is_empty(), "children that did not end well: {bad:?}");
    assert!(target.alive());
}

/// Runs `livepatch args...` until it stops itself at `point` (its `LIVEPATCH_DEBUG_STOP`
/// hook), calls `while_stopped`, then SIGKILLs it.
fn kill_tool_at(args: &[&str], point: &str, while_stopped: impl FnOnce()) {
    let mut tool = stop_tool_at(args, point);
    while_stopped();
    tool.kill().unwrap();
    tool.wait().unwrap();
}

fn tasks(pid: &str) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The tool killed (SIGKILL) inside a nonstop switch's int3 window, at each of its three
/// syncs, again and again, with 4 threads calling the function being switched: the target
/// keeps running and every call returns the old or the new value (the fixture aborts
/// otherwise; int3s left in place are handled inside the target); the sync agent, a thread of
/// ours in the target, exits by itself (the thread list is the program's own again); no thread
/// is left with another scheduling policy; and the next livepatch finishes the job.
#[test]
fn e2e_nonstop_tool_killed_inside_the_window_leaves_the_target_running() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["stress.c"], "stress", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn(&exe, &["4"]);
    let pid = target.pid();
    let threads = tasks(&pid);
    assert_eq!(threads.len(), 5);
    for round in 0..3 {
        for point in ["nonstop-sync:1", "nonstop-sync:2", "nonstop-sync:3"] {
            kill_tool_at(&["apply", &pid, &patch, "--mode", "nonstop"], point, || {
                // The sync agent runs in the target: one thread more.
                assert_eq!(tasks(&pid).len(), threads.len() + 1, "{point}: no agent");
            });
            assert!(
                target.alive(),
                "round {round}: died after a kill at {point}"
            );
            // The agent notices within its 10 ms futex timeout and exits.
            let deadline = std::time::Instant::now() + PATIENCE;
            while tasks(&pid) != threads {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}, {point}: threads {:?}, not {threads:?}",
                    tasks(&pid)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            for tid in &threads {
                // SAFETY: a plain system call on a thread id.
                let policy = unsafe { libc::sched_getscheduler(*tid) };
                assert_eq!(policy, libc::SCHED_OTHER, "thread {tid} after {point}");
            }
            // Still computing, right (two more reports).
            let mark = target.count();
            target.wait_line_after(mark + 1, |l| l.starts_with("old="));
            // The next livepatch takes the half-done switch out and applies (or, killed with
            // every redirect written, records it as applied: then "already applied").
            let out = livepatch(&["apply", &pid, &patch, "--mode", "nonstop"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || err.contains("already applied"),
                "{point}: {err}"
            );
            let mark = target.count();
            let new0 = num(&target.wait_line_after(mark, |_| true), "new");
            target.wait_line_after(mark + 1, |l| num(l, "new") > new0);
            livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
            assert!(target.alive(), "round {round}: died after {point}");
        }
    }
}

/// A process that carries the trap area of an earlier livepatch layout (a memfd mapping named
/// `livepatch-trap` with other bytes) is switched in nonstop mode all the same: the earlier
/// area is left alone and one of this layout is made beside it (it was refused as "changed by
/// someone else", and nonstop mode was unusable on that process for good).
#[test]
fn e2e_nonstop_leaves_an_earlier_layouts_area_alone() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["old_area.c"], "old_area", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    for _ in 0..2 {
        livepatch_ok(&["apply", &pid, &patch, "--mode", "nonstop"]);
        target.expect_steady(2, |l| l == "value=1041");
        livepatch_ok(&["revert", &pid, "--mode", "nonstop"]);
        target.expect_steady(2, |l| l == "value=42");
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("/memfd:livepatch-trap (deleted)"), "{maps}");
    assert!(maps.contains("/memfd:livepatch-trap.4."), "{maps}");
    assert!(target.alive());
}

/// A process that carries an area of this layout made by another build of livepatch (here as
/// session 8's livepatch named it, `livepatch-trap.4`, its code page other bytes, its owner
/// words naming the process): the tool upgraded between an apply and its revert. Nonstop mode
/// makes an area of its own beside it (named with its code's hash) and works. Before, the
/// other build's area was found by its name and refused as "changed by someone else": nonstop
/// mode was unusable on that process for good (review 7, finding 7).
#[test]
fn e2e_nonstop_leaves_another_builds_area_alone() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["old_area.c"], "old_area", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let mut target = Target::spawn(&exe, &["same-layout"]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("/memfd:livepatch-trap.4 (deleted)"), "{maps}");
    for _ in 0..2 {
        livepatch_ok(&nonstop_apply(&pid, &patch));
        target.expect_steady(2, |l| l == "value=1041");
        livepatch_ok(&["revert", &pid, "--mode", "nonstop", "--timeout", "60"]);
        target.expect_steady(2, |l| l == "value=42");
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("/memfd:livepatch-trap.4 (deleted)"), "{maps}");
    let ours: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains("/memfd:livepatch-trap.4.") && l.contains(" r-xs "))
        .collect();
    assert_eq!(ours.len(), 1, "one area of this build, reused: {maps}");
    assert!(target.alive());
}

/// Review S10: workers forked after the master's first nonstop switch map the master's trap
/// area (a shared mapping). Worker 1's switch stopped inside its int3 window while worker 2
/// is switched whole: with one area for all, worker 2's tables and phase were what worker 1's
/// trapping thread read, and it jumped into worker 2's patch memory (SIGSEGV). Each process
/// switches through an area of its own (its owner recorded in it).
#[test]
fn e2e_nonstop_forked_workers_switch_through_areas_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["prefork.c"], "prefork", &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    // Worker 2's patch replaces other() too: its compute sits elsewhere in its patch memory.
    let obj2 = object(dir.path(), "new_prefork_other.c", "new2.o", &[]);
    let (patch2, _) = pack(dir.path(), &exe, &obj2, &[], "p2.lp");
    let patch2 = patch2.display().to_string();
    let target = Target::spawn(&exe, &[]);
    let master = target.pid();
    livepatch_ok(&["apply", &master, &patch, "--mode", "nonstop"]);
    livepatch_ok(&["revert", &master, "--mode", "nonstop"]);
    // SAFETY: kill sends a signal to the process we spawned.
    unsafe { libc::kill(master.parse().unwrap(), libc::SIGUSR1) };
    let deadline = std::time::Instant::now() + PATIENCE;
    let workers: Vec<String> = loop {
        let w: Vec<String> = target
            .lines()
            .iter()
            .filter_map(|l| l.strip_prefix("worker ").map(str::to_string))
            .collect();
        if w.len() == 2 {
            break w;
        }
        assert!(std::time::Instant::now() < deadline, "no workers: {w:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let (w1, w2) = (&workers[0], &workers[1]);
    let alive = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
    };
    for _ in 0..3 {
        // Worker 1's tool stops itself inside the window (after its first sync), worker 2 is
        // switched meanwhile, then worker 1's tool goes on.
        let tool = stop_tool_at(
            &["apply", w1, &patch, "--mode", "nonstop"],
            "nonstop-sync:2",
        );
        livepatch_ok(&["apply", w2, &patch2, "--mode", "nonstop"]);
        // SAFETY: kill sends a signal to the tool we spawned.
        unsafe { libc::kill(tool.id() as i32, libc::SIGCONT) };
        let out = tool.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for w in [w1, w2] {
            let mark = target.count();
            target.wait_line_after(mark, |l| l.starts_with(&format!("w {w} value=1041 ")));
            assert!(alive(w), "worker {w} died");
            livepatch_ok(&["revert", w, "--mode", "nonstop"]);
            assert!(alive(w), "worker {w} died");
        }
    }
    for w in [w1, w2] {
        // SAFETY: kill sends a signal to a worker of the process we spawned.
        unsafe { libc::kill(w.parse().unwrap(), libc::SIGKILL) };
    }
}

/// Two worker threads print compute(41); on SIGUSR1 one of them forks (in a child the forking
/// worker is the only thread, and forks again on the child's SIGUSR1), the child printing
/// "child PID" and then "child value=N".
const FORKS: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) { int r = x + 1; if (x > 1000000) r = x * 5; return r; }
static volatile sig_atomic_t fork_asked;
static void on_usr1(int sig) { (void)sig; fork_asked = 1; }
static void *loop(void *arg) {
    (void)arg;
    const char *who = "parent";
    struct timespec ts = {0, 5000000L};
    pthread_setname_np(pthread_self(), "worker");
    for (;;) {
        /* One fork per request, whichever worker sees it first. */
        if (__atomic_exchange_n(&fork_asked, 0, __ATOMIC_SEQ_CST)) {
            if (fork() == 0) { who = "child"; printf("child %d\n", getpid()); }
        }
        printf("%s value=%d\n", who, compute(41));
        nanosleep(&ts, NULL);
    }
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGUSR1, on_usr1);
    pthread_t t;
    pthread_create(&t, NULL, loop, NULL);
    pthread_create(&t, NULL, loop, NULL);
    printf("ready %d\n", getpid());
    for (;;) pause();
}
"#;

/// A child and a grandchild forked while a nonstop apply is between its last site and its
/// commit store (the dispatches' flag): each has every site written and a copy of the flag
/// still clear, so it runs the old code. The switch finishes them too — the grandchild
/// included (session 4's review: only the target's own children were looked at) — and both
/// run the new code, as the target does. The forks come from one of two worker threads: the
/// tool keeps the thread it borrowed stopped for the whole switch, and which one it borrows
/// (the main thread or a worker) is its choice; the other worker forks. (Checked with each:
/// `LIVEPATCH_BORROW_COMM=forks` borrows the main thread, `=worker` a worker.)
#[test]
fn e2e_nonstop_apply_finishes_children_and_grandchildren_forked_before_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "forks", FORKS, &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "parent value=42");
    let mut tool = KilledOnDrop(stop_tool_at(
        &["apply", &pid, &patch, "--mode", "nonstop"],
        "dispatch-flag",
    ));
    // SIGUSR1 goes to a thread that is not stopped (the borrowed one is), whose handler asks
    // the workers for a fork; in a child the forking worker is the only thread.
    let fork_of = |parent: &str| -> String {
        let mark = target.count();
        // SAFETY: a signal to a process of this test.
        unsafe { libc::kill(parent.parse().unwrap(), libc::SIGUSR1) };
        let line = target.wait_line_after(mark, |l| l.starts_with("child ") && !l.contains('='));
        line["child ".len()..].to_string()
    };
    let child = fork_of(&pid);
    let grandchild = fork_of(&child);
    assert_ne!(child, grandchild);
    // Before the commit: the old code everywhere.
    target.expect_steady(3, |l| l.ends_with("value=42"));
    // SAFETY: SIGCONT to the tool this test started.
    unsafe { libc::kill(tool.0.id() as i32, libc::SIGCONT) };
    assert!(tool.0.wait().unwrap().success());
    // Parent, child and grandchild: the new code.
    target.expect_steady(9, |l| l.ends_with("value=1041"));
    for p in [&child, &grandchild] {
        let st = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
        assert!(!st.contains(") Z"), "process {p} ended");
        // SAFETY: a signal to a process this test made fork.
        unsafe { libc::kill(p.parse().unwrap(), libc::SIGKILL) };
    }
}

/// Review 11, L6: a grandchild forked mid-switch whose parent, a child forked mid-switch,
/// exited is reparented (to init or a subreaper): no longer in the target's tree of parent
/// links, it has the half-switched code all the same, and is finished too (found by the area
/// it shares with the target). The child is killed and left unreaped by the target (a zombie:
/// the target still has a child, so its descendants are looked for).
#[test]
fn review11_a_grandchild_whose_parent_exited_mid_switch_is_finished_too() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable_from_source(dir.path(), "forks", FORKS, &["-pthread"]);
    let patch = compute_patch(dir.path(), &exe);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "parent value=42");
    let mut tool = KilledOnDrop(stop_tool_at(
        &["apply", &pid, &patch, "--mode", "nonstop"],
        "dispatch-flag",
    ));
    let fork_of = |parent: &str| -> String {
        let mark = target.count();
        // SAFETY: a signal to a process of this test.
        unsafe { libc::kill(parent.parse().unwrap(), libc::SIGUSR1) };
        let line = target.wait_line_after(mark, |l| l.starts_with("child ") && !l.contains('='));
        line["child ".len()..].to_string()
    };
    let child = fork_of(&pid);
    let grandchild = fork_of(&child);
    // SAFETY: a signal to a process this test made fork.
    unsafe { libc::kill(child.parse().unwrap(), libc::SIGKILL) };
    let deadline = std::time::Instant::now() + PATIENCE;
    while task_stat(&grandchild, &grandchild, 4).as_deref() == Some(child.as_str())
        || task_stat(&child, &child, 3).as_deref() != Some("Z")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the child did not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    target.expect_steady(3, |l| l.ends_with("value=42"));
    // SAFETY: SIGCONT to the tool this test started.
    unsafe { libc::kill(tool.0.id() as i32, libc::SIGCONT) };
    assert!(tool.0.wait().unwrap().success());
    // Parent and grandchild: the new code.
    target.expect_steady(9, |l| l.ends_with("value=1041"));
    let st = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap();
    assert!(!st.contains(") Z"), "the grandchild ended");
    // SAFETY: a signal to a process this test made fork.
    unsafe { libc::kill(grandchild.parse().unwrap(), libc::SIGKILL) };
}

/// A tool stopped at a debug stop point, killed when the test ends, failed or not: left
/// stopped, it would keep the target's borrowed thread stopped with it.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! Which thread nonstop mode borrows (`Tracee::attach_one`, `process/borrow.rs`), asked many
//! times in a row, as the borrow tests do.

use super::PATIENCE;
use lp_userspace::process::{with_tracer_thread, ProcessError, Tracee};
use std::time::{Duration, Instant};

/// The thread a nonstop tracee borrows from `pid` (attached, then let go at once).
pub fn borrowed(pid: i32) -> i32 {
    with_tracer_thread(|| {
        let t = Tracee::attach_one(pid)?;
        let tids = t.threads();
        t.detach()?;
        Ok::<_, ProcessError>(tids[0])
    })
    .expect("attach_one")
}

/// Waits until thread `tid` of `pid` is blocked in a system call again. A borrowed thread is
/// woken by the seize and the detach, and on a loaded machine may wait long for a CPU to go
/// back to its wait (`restart_syscall` then): meanwhile it runs, and is no thread to borrow
/// (the CI probe at load ~20 and session 9 at load ~15: a busy thread borrowed 1 of 40 so).
pub fn wait_blocked(pid: i32, tid: i32) {
    let deadline = Instant::now() + PATIENCE;
    let path = format!("/proc/{pid}/task/{tid}/syscall");
    let blocked = |s: String| {
        s.split(' ')
            .next()
            .is_some_and(|nr| nr.parse::<u32>().is_ok())
    };
    while !std::fs::read_to_string(&path).is_ok_and(blocked) {
        assert!(Instant::now() < deadline, "thread {tid} not blocked again");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The threads borrowed from `pid` in `rounds` borrows, each after `before()` and a pause
/// of `step_us` × the round's number modulo `cycle_us`: the looks fall at moments spread over
/// a program's cycle of `cycle_us` (a pause of 0 when `cycle_us` is 0).
pub fn borrow_picks(
    pid: i32,
    rounds: usize,
    (step_us, cycle_us): (u64, u64),
    mut before: impl FnMut(),
) -> Vec<i32> {
    (0..rounds)
        .map(|i| {
            before();
            let pause = (step_us * i as u64).checked_rem(cycle_us).unwrap_or(0);
            std::thread::sleep(Duration::from_micros(pause));
            borrowed(pid)
        })
        .collect()
}

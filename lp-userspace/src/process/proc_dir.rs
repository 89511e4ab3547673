//! Which /proc directory to read a process through. /proc/PID is its main thread, and a main
//! thread may exit before the others: `pthread_exit` at the end of `main`, a common server
//! pattern. It then stays a zombie until the whole process ends. Its `stat` and `status` still
//! give the process's identity (start time, parent, NSpid) and its process-wide signal state.
//! But what the main thread no longer holds reads as empty or fails there: the address space
//! (`maps` reads empty, `mem` reads nothing, `map_files` is empty), the descriptors (`fd`) and
//! the namespaces (`ns`). The threads share all of these, so they are read through a live
//! thread's directory, /proc/PID/task/TID ([`dir`]). The process has exited only once every
//! thread has ([`exited`]), and such a main thread is never a thread to trace or to borrow.
//!
//! `map_files` exists at the process level only (a thread's directory has none), so what is
//! opened through it cannot be then: a module deleted from disk (refused: it cannot be read),
//! and the nonstop sync agent's page (the agent is not started, and the switch syncs through
//! ptrace instead: slower, as for a process whose seccomp filters refuse the agent).

/// Whether a /proc `stat` text is that of a task that has exited: state Z (a zombie), X or x
/// (dead). The state is the first field after the command name, which may hold spaces and
/// parentheses itself.
pub(crate) fn stat_says_exited(stat: &str) -> bool {
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_none_or(|state| matches!(state, "Z" | "X" | "x"))
}

/// Whether thread `tid` of process `pid` has exited: a zombie, dead, or gone.
pub(crate) fn thread_exited(pid: i32, tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .map_or(true, |s| stat_says_exited(&s))
}

/// Whether the main thread of `pid` has exited (the process may run on in its other threads),
/// or is on its way out, or the process is gone: it has no address space any more. Told by its
/// `statm`, whose sizes are 0 then (a live address space is never empty), at half the cost of
/// its `stat` (it is read at every listing of the threads): read through the descriptor kept
/// while an operation on `pid` runs ([`KeptStatm`]), else opened.
pub(crate) fn main_exited(pid: i32) -> bool {
    if let Some(exited) = kept_statm_says_exited(pid) {
        return exited;
    }
    std::fs::read_to_string(format!("/proc/{pid}/statm")).map_or(true, |s| statm_says_exited(&s))
}

/// Whether a `statm` text is that of a task without an address space (sizes 0, or nothing).
fn statm_says_exited(statm: &str) -> bool {
    statm
        .split_whitespace()
        .next()
        .is_none_or(|size| size == "0")
}

/// The `statm` of each process an operation of ours runs on, open, with the number of
/// [`KeptStatm`]s holding it.
static KEPT_STATM: std::sync::Mutex<std::collections::BTreeMap<i32, (usize, std::fs::File)>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn kept_statm(
) -> std::sync::MutexGuard<'static, std::collections::BTreeMap<i32, (usize, std::fs::File)>> {
    KEPT_STATM.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`main_exited`] through the kept descriptor of `pid`'s `statm`; `None` when none is kept.
fn kept_statm_says_exited(pid: i32) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    let kept = kept_statm();
    let (_, file) = kept.get(&pid)?;
    let mut buf = [0u8; 128];
    Some(match file.read_at(&mut buf, 0) {
        Ok(n) => std::str::from_utf8(&buf[..n]).map_or(true, statm_says_exited),
        Err(_) => true, // the process is gone (reaped)
    })
}

/// Process `pid`'s main-thread `statm` kept open while this lives (an attach and its tracee: an
/// operation lists the threads a dozen times, each listing asking [`main_exited`]; a read
/// through a kept descriptor costs a `pread`, not a path walk, an open and a close). It reads
/// what a fresh open would: the file names the main thread, whose address space each read
/// looks at anew (gone once it has exited), and fails once the process is reaped — where a
/// fresh open could find a new process given the same pid.
pub(crate) struct KeptStatm {
    pid: i32,
    held: bool,
}

impl KeptStatm {
    /// Keeps `pid`'s `statm` open (or counts one more holder); nothing when it cannot be
    /// opened (the process is gone: [`main_exited`] opens it at each call, as without this).
    pub(crate) fn open(pid: i32) -> KeptStatm {
        let mut kept = kept_statm();
        let held = match kept.get_mut(&pid) {
            Some((holders, _)) => {
                *holders += 1;
                true
            }
            None => match std::fs::File::open(format!("/proc/{pid}/statm")) {
                Ok(file) => {
                    kept.insert(pid, (1, file));
                    true
                }
                Err(_) => false,
            },
        };
        KeptStatm { pid, held }
    }
}

impl Drop for KeptStatm {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let mut kept = kept_statm();
        if let Some((holders, _)) = kept.get_mut(&self.pid) {
            *holders -= 1;
            if *holders == 0 {
                kept.remove(&self.pid);
            }
        }
    }
}

/// How many times a look through the threads is made again when the threads it chose came and
/// went meanwhile (review 10: a process whose threads each hand over to a new one every few
/// milliseconds).
const TRIES: usize = 4;

/// Whether the task whose /proc directory is `dir` still has its address space (its `statm`
/// sizes are not 0). An address space once let go never comes back: true after a file was
/// opened there means that the file holds it.
fn has_address_space(pid: i32, dir: &str) -> bool {
    if dir == format!("/proc/{pid}") {
        return !main_exited(pid);
    }
    std::fs::read_to_string(format!("{dir}/statm")).is_ok_and(|s| !statm_says_exited(&s))
}

/// The threads process `pid` counts (`num_threads` of its `stat`): its main thread among them,
/// even exited, until the process is reaped; 0 when it cannot be read.
fn threads_counted(pid: i32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.split_whitespace().nth(17)?.parse().ok()
        })
        .unwrap_or(0)
}

/// A live thread of `pid` other than its main thread, if one is left. Exiting threads are
/// skipped (a traced one stays a zombie until its tracer reaps it).
fn live_other_thread(pid: i32) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&tid| tid != pid && !thread_exited(pid, tid))
}

/// Whether process `pid` no longer runs: gone, or every thread of it has exited (a zombie
/// waiting to be reaped). A process whose main thread alone has exited still runs. (By the
/// threads' states: a kernel thread, which has no address space either, runs.)
///
/// A listing races with threads that come and go: every thread it lists may have exited by the
/// time its state is read while others started meanwhile. So a listing that finds no live
/// thread is believed when the process counts no thread beside its main one, or else after a
/// few more listings (threads that exited while traced stay counted until reaped) that list no
/// thread not listed before: a process that exited starts none, one whose threads exit before
/// they are read while others start is listed again (up to [`SHARED_ROUNDS`] times).
pub(crate) fn exited(pid: i32) -> bool {
    // A main thread with its address space has not exited (it lets it go on its way out,
    // before it is a zombie): its `statm`, kept open by an operation, is cheaper than its `stat`.
    if !main_exited(pid) || !thread_exited(pid, pid) {
        return false;
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut unchanged = 0;
    for _ in 0..SHARED_ROUNDS {
        let listed = other_threads(pid);
        if listed.iter().any(|&tid| !thread_exited(pid, tid)) {
            return false;
        }
        if threads_counted(pid) <= 1 {
            return true;
        }
        let started = listed.into_iter().filter(|&tid| seen.insert(tid)).count();
        unchanged = if started == 0 { unchanged + 1 } else { 0 };
        if unchanged == TRIES {
            return true;
        }
    }
    true
}

/// The threads of `pid` listed now, but its main thread.
fn other_threads(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&tid| tid != pid)
        .collect()
}

/// The directory to read what the threads of `pid` share through — its address space (`maps`,
/// `mem`), descriptors (`fd`) and namespaces (`ns`): /proc/PID while its main thread lives,
/// else /proc/PID/task/TID of a live thread. /proc/PID when none is left: reads there fail or
/// find nothing, as for any process that exited.
pub(crate) fn dir(pid: i32) -> String {
    if main_exited(pid) {
        if let Some(tid) = live_other_thread(pid) {
            return format!("/proc/{pid}/task/{tid}");
        }
    }
    format!("/proc/{pid}")
}

/// Whether process `pid` has no address space left — no `VmSize` in its status, through
/// [`dir`]: it is on its way out (even before it is a zombie), or gone. A thread picked that
/// exits before its status is read says nothing of the process (review 10, H1: threads that
/// live a few milliseconds): another is tried.
pub(crate) fn no_address_space(pid: i32) -> bool {
    for _ in 0..TRIES {
        let through = dir(pid);
        let status = std::fs::read_to_string(format!("{through}/status"));
        if status.is_ok_and(|s| s.lines().any(|l| l.starts_with("VmSize:"))) {
            return false;
        }
        let thread = through
            .rsplit_once("/task/")
            .and_then(|(_, tid)| tid.parse().ok());
        if !thread.is_some_and(|tid| thread_exited(pid, tid)) {
            return true;
        }
    }
    true
}

/// The text of process `pid`'s `maps`, through [`dir`]. A live address space always has
/// mappings, so /proc/PID/maps is read first and the main thread's state only looked at when
/// it reads empty: no cost for a process whose main thread runs.
/// A thread that exits before its file is opened reads empty (or is gone): another is tried.
/// Empty is never the answer for a process that runs: when every thread a listing found has
/// exited by the time it is read (threads that each live a few milliseconds), the threads are
/// listed again, for as long as the process lives (review 10, H1: an apply said "has no module
/// mapped" once in 1000 pairs on such a process).
pub(crate) fn maps(pid: i32) -> std::io::Result<String> {
    let own = format!("/proc/{pid}");
    let text = std::fs::read_to_string(format!("{own}/maps"))?;
    if !text.is_empty() {
        return Ok(text);
    }
    let mut last = Ok(text);
    for round in 0.. {
        for _ in 0..TRIES {
            let through = dir(pid);
            if through == own {
                break;
            }
            match std::fs::read_to_string(format!("{through}/maps")) {
                Ok(text) if !text.is_empty() => return Ok(text),
                other => last = other,
            }
        }
        if round == SHARED_ROUNDS || exited(pid) {
            break;
        }
    }
    match last {
        Ok(text) if text.is_empty() && !exited(pid) => Err(std::io::Error::other(
            "its threads exit before their maps can be read",
        )),
        last => last,
    }
}

/// Rounds of [`TRIES`] listings of the threads [`maps`] and [`open_shared`] make, at most,
/// before they give up on a process that runs but whose every listed thread exits before it is
/// read.
const SHARED_ROUNDS: usize = 100;

/// Opens file `name` of what the threads of `pid` share (`mem`) through [`dir`]. A file opened
/// through a thread that was exiting holds no address space (its reads find nothing): the
/// thread's `statm` read after the open tells, and another thread is tried.
pub(crate) fn open_shared(
    pid: i32,
    name: &str,
    options: &std::fs::OpenOptions,
) -> std::io::Result<std::fs::File> {
    // /proc/PID first, without asking [`dir`] (the main thread's `statm` read twice): the
    // check after the open tells all the same.
    let own = format!("/proc/{pid}");
    let file = options.open(format!("{own}/{name}"));
    if file.is_ok() && has_address_space(pid, &own) {
        return file;
    }
    let mut last = file;
    for _ in 0..=SHARED_ROUNDS {
        for _ in 0..TRIES {
            let through = dir(pid);
            let file = options.open(format!("{through}/{name}"));
            if file.is_ok() && has_address_space(pid, &through) {
                return file;
            }
            last = file;
        }
        // Every thread picked exited before its file was opened while the process lives on
        // in threads started since (review 10, H1: "does not exist" once in 1000 reverts of
        // such a process): listed again, as in `maps`.
        if !main_exited(pid) || exited(pid) {
            break;
        }
    }
    last
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds and starts, in `dir`, a program whose main thread starts a worker (blocked in
    /// `pause`) and calls pthread_exit; returns it once its main thread has exited (a zombie).
    pub(crate) fn spawn_with_exited_main_thread(dir: &std::path::Path) -> std::process::Child {
        let src = dir.join("z.c");
        let exe = dir.join("z");
        std::fs::write(
            &src,
            "#include <pthread.h>\n#include <unistd.h>\n\
             static void *w(void *a) { (void)a; for (;;) pause(); return 0; }\n\
             int main(void) { pthread_t t; pthread_create(&t, 0, w, 0); pthread_exit(0); }\n",
        )
        .unwrap();
        let built = std::process::Command::new("gcc")
            .args(["-pthread", "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .expect("gcc");
        assert!(built.success());
        let child = std::process::Command::new(&exe).spawn().expect("start");
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !thread_exited(pid, pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the main thread never exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child
    }

    /// A process whose main thread has exited runs on: read through its worker's directory,
    /// which shows its mappings, its memory and its descriptors; the main thread is not
    /// listed among its threads. Once the worker is gone too (killed, not reaped), the
    /// process has exited, and its own directory is the one left.
    #[test]
    fn a_process_whose_main_thread_exited_is_read_through_a_live_thread() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = spawn_with_exited_main_thread(tmp.path());
        let pid = child.id() as i32;
        let worker = super::super::observe::tasks(pid);
        assert_eq!(worker.len(), 1, "{worker:?}");
        assert_ne!(worker[0], pid);
        assert!(!thread_exited(pid, worker[0]));
        assert!(!exited(pid));
        assert!(!no_address_space(pid));
        assert_eq!(dir(pid), format!("/proc/{pid}/task/{}", worker[0]));
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(),
            "",
            "the main thread's maps (else this test tests nothing)"
        );
        let text = maps(pid).unwrap();
        assert!(text.contains("[stack]"), "{text}");
        let mem = super::super::Memory::open(pid).unwrap();
        let vdso = text.lines().find(|l| l.ends_with("[vdso]")).unwrap();
        let start = u64::from_str_radix(vdso.split('-').next().unwrap(), 16).unwrap();
        assert_eq!(mem.read_vec(start, 4).unwrap(), b"\x7fELF");
        assert!(std::fs::read_dir(format!("{}/fd", dir(pid)))
            .unwrap()
            .next()
            .is_some());

        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !exited(pid) {
            assert!(std::time::Instant::now() < deadline, "still runs");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "reaped"
        );
        assert_eq!(dir(pid), format!("/proc/{pid}"));
        assert!(no_address_space(pid));
        assert_eq!(maps(pid).unwrap(), "");
        assert!(super::super::observe::tasks(pid).is_empty());
        let _ = child.wait();
        assert!(exited(pid));
    }

    #[test]
    fn states_of_exited_tasks() {
        assert!(stat_says_exited("12 (a) b) Z 1 12"));
        assert!(stat_says_exited("12 (x) X 1 12"));
        assert!(!stat_says_exited("12 (Z) Z) S 1 12"));
        assert!(!stat_says_exited("12 (w) R 1 12"));
        assert!(stat_says_exited(""));
    }

    /// A `statm` kept open reads what a fresh open would: the address space while the main
    /// thread lives, none once it has exited (killed, not reaped: a zombie), nothing once the
    /// process is reaped; the descriptor is closed with its last holder.
    #[test]
    fn a_kept_statm_follows_the_main_thread_out() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let pid = child.id() as i32;
        let kept = KeptStatm::open(pid);
        let again = KeptStatm::open(pid);
        assert_eq!(kept_statm_says_exited(pid), Some(false));
        assert!(!main_exited(pid) && !exited(pid));
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !thread_exited(pid, pid) {
            assert!(std::time::Instant::now() < deadline, "never exited");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(kept_statm_says_exited(pid), Some(true));
        assert!(main_exited(pid) && exited(pid));
        let _ = child.wait();
        assert_eq!(kept_statm_says_exited(pid), Some(true), "reaped");
        drop(again);
        assert!(kept_statm().contains_key(&pid), "closed with a holder left");
        drop(kept);
        assert_eq!(kept_statm_says_exited(pid), None, "still open");
    }

    /// This process (its main thread alive) is read through /proc/PID, and runs.
    #[test]
    fn a_process_whose_main_thread_runs_is_read_through_its_own_directory() {
        let pid = std::process::id() as i32;
        assert_eq!(dir(pid), format!("/proc/{pid}"));
        assert!(!main_exited(pid));
        assert!(!exited(pid));
        assert!(maps(pid).unwrap().contains("[stack]"));
    }
}

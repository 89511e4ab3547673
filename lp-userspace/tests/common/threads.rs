//! What /proc says about a target's threads: which there are, who traces them, their seccomp
//! mode. A thread (or the whole process) may be gone by the time it is read: these answer for
//! what is still there.

/// The thread ids of process `pid` (none once it is gone).
pub fn tasks(pid: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The `field:` line of thread `tid`'s /proc status, trimmed (None once the thread is gone).
pub fn task_status(pid: &str, tid: &str, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    Some(value.trim().to_string())
}

/// The pid of the tracer holding thread `tid`, if one does.
pub fn tracer_of(pid: &str, tid: &str) -> Option<String> {
    task_status(pid, tid, "TracerPid").filter(|t| t != "0")
}

/// Thread `tid`'s seccomp mode as /proc shows it: "0" none, "1" strict, "2" filter.
pub fn seccomp_of(pid: &str, tid: &str) -> String {
    task_status(pid, tid, "Seccomp").expect("a thread with a Seccomp: line")
}

/// Field `n` (numbered as in proc(5), 3 being the state) of thread `tid`'s /proc stat (None
/// once the thread is gone).
pub fn task_stat(pid: &str, tid: &str, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces and parentheses itself.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n - 3).map(str::to_string)
}

/// Whether a thread of `pid` is in a job-control stop (state T).
pub fn job_stopped(pid: &str) -> bool {
    tasks(pid)
        .iter()
        .any(|t| task_stat(pid, t, 3).is_some_and(|s| s.starts_with('T')))
}

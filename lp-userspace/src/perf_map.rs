//! Names for patch code in profilers and debuggers.
//!
//! perf: the JIT map convention, one `START SIZE name` line (hex, no 0x) per function in
//! `/tmp/perf-PID.map`, and per trampoline, thunk and dispatch (`livepatch dispatch F`, see
//! `debug_info::stub_names`). perf reads the file when it resolves samples of an anonymous
//! executable mapping in process PID, so the lines must exist while the patch is applied;
//! [`forget`] removes them on revert.
//!
//! `/tmp` is writable by everyone and the tool runs as root: the map file is never opened
//! through a symbolic link (`O_NOFOLLOW`), so a link planted at the well-known name cannot make
//! us append to, or rewrite, another file.
//!
//! The file is named by pid, and pids are reused (pid_max is 32768 on many systems): a map
//! left by a dead process that had the same pid must not be appended to, or perf would name
//! code of this process after the dead one's symbols. perf's format has no comment line to
//! mark whose file it is (the gdb script has one), so its age tells: a map last modified
//! before the process started was not written for it, and is started afresh ([`record`]). A
//! map modified since — by a JIT runtime inside the process, or by an earlier apply — is
//! appended to. See [`left_by_earlier_process`] for the clock this relies on.
//!
//! gdb: the patch object itself carries the symbols and debug info; [`gdb_add_symbol_file`]
//! gives the `add-symbol-file` command that places each of its sections where it was linked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::link::{LinkedImage, LinkedSymbol};

/// The map file of process `pid`.
pub fn path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/tmp/perf-{pid}.map"))
}

/// The lines for `symbols` (functions with a size only), each tagged `[livepatch <tag>]`.
pub fn lines(symbols: &[LinkedSymbol], tag: &str) -> String {
    let mut out = String::new();
    for s in symbols.iter().filter(|s| s.function && s.size > 0) {
        out.push_str(&format!(
            "{:x} {:x} {} [livepatch {}]\n",
            s.addr, s.size, s.name, tag
        ));
    }
    out
}

/// Appends the functions of a linked patch to `/tmp/perf-PID.map`, or writes them to a new
/// map when the one there was left by an earlier process with the same pid.
pub fn record(pid: i32, symbols: &[LinkedSymbol], tag: &str) -> std::io::Result<()> {
    record_with(pid, symbols, "", tag)
}

/// [`record`], with more lines (`extra`, already tagged: the trampolines, thunks and dispatches
/// of `debug_info::stub_names`) in the same write.
pub fn record_with(
    pid: i32,
    symbols: &[LinkedSymbol],
    extra: &str,
    tag: &str,
) -> std::io::Result<()> {
    let text = lines(symbols, tag) + extra;
    if text.is_empty() {
        return Ok(());
    }
    let p = path(pid);
    let append = !left_by_earlier_process(&p, pid);
    // The process's own JIT may have written it (as the process's user).
    let (mut f, _) = open_own(&p, append, process_uid(pid))?;
    // One write: concurrent appenders (another JIT in the process) never interleave within it.
    f.write_all(text.as_bytes())
}

/// How much older than the process a map must be to count as another process's: file times
/// come from a coarse clock (up to a scheduler tick behind), and the process's start time in
/// wall-clock terms is derived from the boot-time clock (see [`process_started`]), which a
/// small step of the wall clock (an NTP correction) shifts.
const STALE_MARGIN: Duration = Duration::from_secs(1);

/// Whether the map at `map` was last modified before process `pid` started (by more than
/// [`STALE_MARGIN`]): then a dead process that had the same pid left it. Unknown (no file, no
/// process, unreadable times): false, i.e. append as before.
///
/// Limits: a map left by a process that died less than a second before its pid was reused is
/// taken as current (appended to, as before this check); a forward step of the wall clock by
/// more than a second after the process started makes a map it wrote before the step look
/// older than the process (it is then started afresh, losing those lines).
pub fn left_by_earlier_process(map: &Path, pid: i32) -> bool {
    let Ok(modified) = std::fs::symlink_metadata(map).and_then(|m| m.modified()) else {
        return false;
    };
    process_started(pid).is_some_and(|started| modified + STALE_MARGIN < started)
}

/// When process `pid` started, on the wall clock (to within a scheduler tick). The kernel gives
/// the start as clock ticks since boot on the boot-time clock (field 22 of /proc/PID/stat); its
/// distance from now on that clock, taken from the wall clock's now, is the start in the
/// terms file times use.
pub(crate) fn process_started(pid: i32) -> Option<SystemTime> {
    let ticks = start_ticks(pid)?;
    // SAFETY: sysconf has no memory arguments.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&hz| hz > 0)?;
    let since_boot =
        Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    let now = SystemTime::now();
    let boot_now = Duration::new(u64::try_from(ts.tv_sec).ok()?, ts.tv_nsec as u32);
    now.checked_sub(boot_now.checked_sub(since_boot)?)
}

/// Process `pid`'s start time in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid, it names one process among all that ever had that pid.
pub(crate) fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: count after it.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the lines a [`record`] with the same `tag` wrote (after a revert). Missing file: Ok.
pub fn forget(pid: i32, tag: &str) -> std::io::Result<()> {
    let p = path(pid);
    let mut text = String::new();
    match open_no_follow(OpenOptions::new().read(true), &p) {
        Ok(mut f) => f.read_to_string(&mut text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let marker = format!("[livepatch {tag}]");
    let kept: String = text
        .lines()
        .filter(|l| !l.ends_with(&marker))
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.is_empty() {
        // remove_file unlinks a link itself, never its target
        std::fs::remove_file(&p)
    } else {
        open_own(&p, false, process_uid(pid))?
            .0
            .write_all(kept.as_bytes())
    }
}

/// The user process `pid` runs as (the owner of /proc/PID).
fn process_uid(pid: i32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

/// Opens `p` for writing (appending when `append`, else emptied), creating it if needed, such
/// that what we write lands in a file only we (or `also_uid`) own, under that one name:
/// /tmp is writable by everyone and we usually run as root, and these files have well-known
/// names. A symbolic link there is refused (`O_NOFOLLOW`); a regular file of another user (it
/// could rewrite what we wrote: a gdb script runs `shell` lines as whoever loads it) or with a
/// second name (a hard link: we would write into that other file) is unlinked — the name only —
/// and created afresh (`O_EXCL`: a name planted again meanwhile fails). Returns the file and
/// whether it is new (empty).
pub(crate) fn open_own(
    p: &Path,
    append: bool,
    also_uid: Option<u32>,
) -> std::io::Result<(File, bool)> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    match open_no_follow(OpenOptions::new().write(true).append(append), p) {
        Ok(f) => {
            let m = f.metadata()?;
            let owner_ok = m.uid() == me || Some(m.uid()) == also_uid;
            if m.file_type().is_file() && m.nlink() == 1 && owner_ok {
                if !append {
                    f.set_len(0)?;
                }
                return Ok((f, false));
            }
            drop(f);
            std::fs::remove_file(p)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = open_no_follow(OpenOptions::new().write(true).create_new(true), p)?;
    Ok((f, true))
}

/// Opens `p` with `options`, refusing a symbolic link: our files in /tmp have well-known names
/// (by pid) and we usually run as root, so a link planted at such a name must not make us write
/// through it (the gdb files in debug_info use this too).
pub(crate) fn open_no_follow(options: &mut OpenOptions, p: &Path) -> std::io::Result<File> {
    options.custom_flags(libc::O_NOFOLLOW).open(p)
}

/// The gdb command that loads the symbols (and debug info, if compiled with -g) of the patch
/// object saved at `object_path`, with every section at the address it was linked to.
pub fn gdb_add_symbol_file(object_path: &Path, image: &LinkedImage) -> String {
    let mut cmd = format!("add-symbol-file {}", object_path.display());
    for (name, addr) in &image.sections {
        cmd.push_str(&format!(" -s {name} 0x{addr:x}"));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A file in a fresh temporary folder, last modified at `when`.
    fn file_modified_at(dir: &Path, when: SystemTime) -> PathBuf {
        let p = dir.join("perf-test.map");
        let f = File::create(&p).unwrap();
        f.set_modified(when).unwrap();
        p
    }

    #[test]
    fn a_map_older_than_the_process_was_left_by_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let started = process_started(me).expect("our own start time");
        let before = file_modified_at(dir.path(), started - Duration::from_secs(3600));
        assert!(left_by_earlier_process(&before, me));
    }

    #[test]
    fn a_map_written_since_the_process_started_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let now = file_modified_at(dir.path(), SystemTime::now());
        assert!(!left_by_earlier_process(&now, me));
        // Written in the process's first moments: the coarse file clock may put it a tick
        // before the start.
        let started = process_started(me).unwrap();
        let early = file_modified_at(dir.path(), started - Duration::from_millis(20));
        assert!(!left_by_earlier_process(&early, me));
    }

    #[test]
    fn our_start_time_is_in_the_past_and_after_boot() {
        let me = std::process::id() as i32;
        let started = process_started(me).unwrap();
        let now = SystemTime::now();
        assert!(started <= now);
        // This test process started at most a few minutes ago (a test run).
        assert!(now.duration_since(started).unwrap() < Duration::from_secs(3600));
    }

    /// A file of another user, or with a second name, is replaced, never written into; our own
    /// is appended to or emptied as asked.
    #[test]
    fn open_own_writes_only_into_a_file_of_ours_with_one_name() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("livepatch-1.gdb");
        std::fs::write(&p, "ours\n").unwrap();
        let (mut f, fresh) = open_own(&p, true, None).unwrap();
        f.write_all(b"more\n").unwrap();
        assert!(!fresh);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ours\nmore\n");
        let (_, fresh) = open_own(&p, false, None).unwrap();
        assert!(!fresh);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "", "emptied");

        // A second name (hard link) to another file: that file keeps its content.
        let other = dir.path().join("precious");
        std::fs::write(&other, "keep\n").unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::hard_link(&other, &p).unwrap();
        let (mut f, fresh) = open_own(&p, true, None).unwrap();
        f.write_all(b"ours\n").unwrap();
        assert!(fresh);
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ours\n");

        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            return; // cannot give a file away without root
        }
        // Another user's file (with the content it wants us to append to): replaced.
        let nobody = 65534;
        std::fs::write(&p, "shell id\n").unwrap();
        std::os::unix::fs::chown(&p, Some(nobody), Some(nobody)).unwrap();
        let (mut f, fresh) = open_own(&p, true, None).unwrap();
        f.write_all(b"ours\n").unwrap();
        assert!(fresh);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(
            (m.uid(), std::fs::read_to_string(&p).unwrap().as_str()),
            (0, "ours\n")
        );
        // ... unless it is the user named as acceptable (the target process's own perf map).
        std::os::unix::fs::chown(&p, Some(nobody), Some(nobody)).unwrap();
        let (mut f, fresh) = open_own(&p, true, Some(nobody)).unwrap();
        f.write_all(b"jit\n").unwrap();
        assert!(!fresh);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ours\njit\n");
        // A symbolic link is refused, not followed.
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&other, &p).unwrap();
        assert!(open_own(&p, true, None).is_err());
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep\n");
    }

    #[test]
    fn no_file_or_no_process_is_not_stale() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        assert!(!left_by_earlier_process(&dir.path().join("none.map"), me));
        let old = file_modified_at(dir.path(), SystemTime::UNIX_EPOCH);
        assert!(!left_by_earlier_process(&old, i32::MAX), "no such process");
    }
}

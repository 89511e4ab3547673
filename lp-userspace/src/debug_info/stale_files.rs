//! gdb files of processes that are gone.
//!
//! An apply saves `/tmp/livepatch-PID-ID.o`, `/tmp/livepatch-PID-ID-stubs.o` and
//! `/tmp/livepatch-PID.gdb`; a revert removes them, but a patched process that exits (or is
//! killed) keeps its patches to the end, and nothing removed its files: they piled up in /tmp
//! (thousands on a test machine). [`sweep`] removes those whose process is gone, or whose pid
//! now names another process, at a later apply (on its warm-up thread, off the tracer's path;
//! one apply in eight, see `remove_stale_files`).
//!
//! /tmp is shared, and we usually run as root (who may unlink anybody's file there):
//! only regular files owned by our own user, named exactly as we name them, are considered
//! (never what a link points to: unlink removes the link itself). A file is stale when:
//! - a script's pid has no process (a script of an earlier process with a pid now reused is
//!   started afresh by the next apply to the new one, and goes once that one is gone);
//! - an object's pid has no process, or that process started after the object was last
//!   written (more than [`MARGIN`] after: file times are coarse), so an earlier one left it.
//!
//! A process being patched right now keeps its files: it exists, and the objects an apply
//! writes for it are newer than it. (Scripts are not judged by their header for that reason:
//! an apply to a process that reused a pid may be rewriting its stale script at this moment.)

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Slack between file times (coarse) and a process's start time.
const MARGIN: Duration = Duration::from_secs(1);

/// What a file name in the gdb directory is, if it is one of ours.
#[derive(Debug, PartialEq, Eq)]
enum Ours {
    /// `livepatch-PID.gdb`
    Script(i32),
    /// `livepatch-PID-ID.o` (ID: 16 hex digits), or `livepatch-PID-ID-stubs.o` (the
    /// generated code's symbol file)
    Object(i32),
}

fn classify(name: &str) -> Option<Ours> {
    let rest = name.strip_prefix("livepatch-")?;
    let pid = |s: &str| {
        s.parse::<i32>()
            .ok()
            .filter(|&p| p > 0 && s.bytes().all(|b| b.is_ascii_digit()))
    };
    if let Some(p) = rest.strip_suffix(".gdb") {
        return pid(p).map(Ours::Script);
    }
    let object = rest.strip_suffix(".o")?;
    let (p, id) = object
        .strip_suffix("-stubs")
        .unwrap_or(object)
        .split_once('-')?;
    let hex = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    pid(p).filter(|_| hex).map(Ours::Object)
}

/// Removes the stale gdb files in `dir` (see the module doc); returns how many went.
pub(crate) fn sweep(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(kind) = name.to_str().and_then(classify) else {
            continue;
        };
        // The entry itself, never what a link points to.
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if !meta.file_type().is_file() || meta.uid() != me {
            continue;
        }
        let stale = match kind {
            Ours::Script(pid) => !process_alive(pid),
            Ours::Object(pid) => {
                !process_alive(pid) || meta.modified().is_ok_and(|m| written_before_start(m, pid))
            }
        };
        if stale {
            removed += usize::from(std::fs::remove_file(e.path()).is_ok());
        }
    }
    removed
}

fn process_alive(pid: i32) -> bool {
    crate::perf_map::start_ticks(pid).is_some()
}

/// The file was last written more than [`MARGIN`] before process `pid` started.
fn written_before_start(modified: SystemTime, pid: i32) -> bool {
    crate::perf_map::process_started(pid).is_some_and(|s| modified + MARGIN < s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::path::PathBuf;

    #[test]
    fn only_our_names_are_ours() {
        assert_eq!(classify("livepatch-42.gdb"), Some(Ours::Script(42)));
        assert_eq!(
            classify("livepatch-42-0123456789abcdef.o"),
            Some(Ours::Object(42))
        );
        assert_eq!(
            classify("livepatch-42-0123456789abcdef-stubs.o"),
            Some(Ours::Object(42))
        );
        for other in [
            "livepatch-42.gdb.bak",
            "livepatch-+42.gdb",
            "livepatch-0.gdb",
            "livepatch-42-0123.o",
            "livepatch-42-0123456789abcdeg.o",
            "livepatch-42-0123456789abcdef-stub.o",
            "livepatch-42-stubs.o",
            "livepatch-x-0123456789abcdef.o",
            "livepatch-lock",
            "perf-42.map",
        ] {
            assert_eq!(classify(other), None, "{other}");
        }
    }

    /// A pid with no process (a child that has been reaped).
    fn dead_pid() -> i32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id() as i32
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The files of a dead process, and objects a process with a reused pid left, go; those
    /// of a live process, other people's names and links stay.
    #[test]
    fn stale_files_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let me = std::process::id() as i32;
        let dead = dead_pid();
        let id = "0123456789abcdef";
        // Ours, current: a script (header with our start time), an object written now.
        let live_script = write(
            d,
            &format!("livepatch-{me}.gdb"),
            &format!(
                "{}add-symbol-file x\n",
                crate::debug_info::gdb_script_header(me)
            ),
        );
        let live_object = write(d, &format!("livepatch-{me}-{id}.o"), "obj");
        // An object of our pid older than our process: left by an earlier one.
        let reused = write(d, &format!("livepatch-{me}-fedcba9876543210.o"), "old");
        File::options()
            .write(true)
            .open(&reused)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3 * 24 * 3600))
            .unwrap();
        // A dead process's script and object.
        let dead_script = write(
            d,
            &format!("livepatch-{dead}.gdb"),
            "# livepatch: symbols of process 1 started at 1\n",
        );
        let dead_object = write(d, &format!("livepatch-{dead}-{id}.o"), "obj");
        // Not ours: other names, a link named like ours (to a file that must survive).
        let other = write(d, "livepatch-notes.txt", "keep");
        let target = write(d, "precious", "keep");
        let link = d.join(format!("livepatch-{dead}-aaaaaaaaaaaaaaaa.o"));
        std::os::unix::fs::symlink(&target, &link).unwrap();

        assert_eq!(sweep(d), 3);
        for gone in [&reused, &dead_script, &dead_object] {
            assert!(!gone.exists(), "{} left", gone.display());
        }
        for kept in [&live_script, &live_object, &other, &target] {
            assert!(kept.exists(), "{} removed", kept.display());
        }
        assert!(link.symlink_metadata().is_ok(), "a link was removed");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(sweep(d), 0, "nothing more is stale");
    }
}

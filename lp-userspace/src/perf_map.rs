//! Names for patch code in profilers and debuggers.
//!
//! perf: the JIT map convention, one `START SIZE name` line (hex, no 0x) per function in
//! `/tmp/perf-PID.map`. perf reads the file when it resolves samples of an anonymous executable
//! mapping in process PID, so the lines must exist while the patch is applied; [`forget`]
//! removes them on revert.
//!
//! `/tmp` is writable by everyone and the tool runs as root: the map file is never opened
//! through a symbolic link (`O_NOFOLLOW`), so a link planted at the well-known name cannot make
//! us append to, or rewrite, another file.
//!
//! gdb: the patch object itself carries the symbols and debug info; [`gdb_add_symbol_file`]
//! gives the `add-symbol-file` command that places each of its sections where it was linked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

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

/// Appends the functions of a linked patch to `/tmp/perf-PID.map`.
pub fn record(pid: i32, symbols: &[LinkedSymbol], tag: &str) -> std::io::Result<()> {
    let text = lines(symbols, tag);
    if text.is_empty() {
        return Ok(());
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path(pid))?;
    // One write: concurrent appenders (another JIT in the process) never interleave within it.
    f.write_all(text.as_bytes())
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
        open_no_follow(OpenOptions::new().write(true).truncate(true), &p)?
            .write_all(kept.as_bytes())
    }
}

fn open_no_follow(options: &mut OpenOptions, p: &std::path::Path) -> std::io::Result<File> {
    options.custom_flags(libc::O_NOFOLLOW).open(p)
}

/// The gdb command that loads the symbols (and debug info, if compiled with -g) of the patch
/// object saved at `object_path`, with every section at the address it was linked to.
pub fn gdb_add_symbol_file(object_path: &std::path::Path, image: &LinkedImage) -> String {
    let mut cmd = format!("add-symbol-file {}", object_path.display());
    for (name, addr) in &image.sections {
        cmd.push_str(&format!(" -s {name} 0x{addr:x}"));
    }
    cmd
}

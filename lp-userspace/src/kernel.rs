//! `livepatch kernel pack|status`: the host side of the kernel adapter (lp-kernel/).
//!
//! - [`pack`] builds a patch module (`NAME.ko`) from one C file written with `livepatch.h`,
//!   against the installed headers of a kernel (kbuild, out of tree). The header is embedded
//!   in this binary, so a source file needs nothing but `#include "livepatch.h"`.
//! - [`status`] / [`read_status`] read what lpcore publishes under `/sys/kernel/lp/`:
//!   one directory per registered patch with `enabled`, `id` and `functions`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// The header patch modules include (the ABI between a patch module and lpcore).
pub const LIVEPATCH_H: &str = include_str!("../../lp-kernel/include/livepatch.h");

/// Where lpcore publishes its patches.
pub const SYSFS_ROOT: &str = "/sys/kernel/lp";

/// Why `livepatch kernel ...` failed. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The patch source could not be read.
    #[error("cannot read patch source {path}: {source}")]
    Source {
        /// The file given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The module name is not a valid kernel module name.
    #[error("bad patch name '{0}': use letters, digits and '_' (at most 55 characters)")]
    BadName(String),
    /// No kernel headers to build against.
    #[error(
        "no kernel headers at {0}: install the headers package of the target kernel or pass --kdir"
    )]
    NoHeaders(PathBuf),
    /// kbuild failed; the first compiler/linker error line is quoted.
    #[error("building the patch module failed: {0}")]
    Build(String),
    /// lpcore is not loaded (no sysfs tree).
    #[error("lpcore is not loaded ({0} does not exist): insmod lpcore.ko first")]
    NotLoaded(PathBuf),
    /// A sysfs file had unexpected content.
    #[error("unexpected content in {path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// Any other I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Io { context, source }
}

/// What to pack: `livepatch kernel pack SOURCE [--name NAME] [-o OUTPUT] [--kdir KDIR]`.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// The C file with the new functions and `LP_PATCH_MODULE(...)`.
    pub source: PathBuf,
    /// Module name; default: the source file's stem.
    pub name: Option<String>,
    /// Output `.ko`; default: `NAME.ko` in the current directory.
    pub output: Option<PathBuf>,
    /// Kernel build directory (headers); default: `$LIVEPATCH_KDIR`, else
    /// `/lib/modules/$(uname -r)/build`.
    pub kdir: Option<PathBuf>,
}

/// A module name kbuild and the kernel accept (`KBUILD_MODNAME`, `MODULE_NAME_LEN` - 1).
pub fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 55
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

fn default_kdir() -> PathBuf {
    if let Some(k) = std::env::var_os("LIVEPATCH_KDIR") {
        return PathBuf::from(k);
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    PathBuf::from(format!("/lib/modules/{}/build", release.trim()))
}

/// The first line of kbuild's output that names an error, else its last non-empty line.
fn first_error(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("error:") || l.contains("ERROR:"))
        .or_else(|| log.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("make failed without output")
        .trim()
        .to_string()
}

/// A private kbuild directory under the temp dir, removed when dropped.
struct BuildDir(PathBuf);

impl BuildDir {
    fn create() -> Result<BuildDir, KernelError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "livepatch-kernel-pack-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir(&path).map_err(io(format!("cannot create {}", path.display())))?;
        Ok(BuildDir(path))
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Build a patch module from `opts.source`; returns the path of the `.ko` written.
///
/// The source is compiled in a temporary kbuild directory together with the embedded
/// `livepatch.h` and any `.h` files next to the source. Nothing is written at the output path
/// unless the build succeeds.
pub fn pack(opts: &PackOptions) -> Result<PathBuf, KernelError> {
    let code = fs::read(&opts.source).map_err(|source| KernelError::Source {
        path: opts.source.clone(),
        source,
    })?;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => opts
            .source
            .file_stem()
            .map(|s| s.to_string_lossy().replace('-', "_"))
            .unwrap_or_default(),
    };
    if !valid_module_name(&name) {
        return Err(KernelError::BadName(name));
    }
    let kdir = opts.kdir.clone().unwrap_or_else(default_kdir);
    if !kdir.join("Makefile").is_file() {
        return Err(KernelError::NoHeaders(kdir));
    }
    let output = opts
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.ko")));

    let work = BuildDir::create()?;
    let dir = work.0.as_path();
    if let Some(src_dir) = opts.source.parent().filter(|d| !d.as_os_str().is_empty()) {
        for entry in
            fs::read_dir(src_dir).map_err(io(format!("cannot list {}", src_dir.display())))?
        {
            let path = entry
                .map_err(io("cannot list the source directory"))?
                .path();
            if path.extension().is_some_and(|e| e == "h") {
                if let Some(file) = path.file_name() {
                    fs::copy(&path, dir.join(file))
                        .map_err(io(format!("cannot copy {}", path.display())))?;
                }
            }
        }
    }
    fs::write(dir.join("livepatch.h"), LIVEPATCH_H).map_err(io("cannot write livepatch.h"))?;
    fs::write(dir.join(format!("{name}.c")), code).map_err(io("cannot write the source copy"))?;
    // No sibling calls: `return orig(x);` to the replaced function must stay a call, so the
    // ftrace handler sees the patch module as the caller and runs the original.
    fs::write(
        dir.join("Kbuild"),
        format!("obj-m := {name}.o\nccflags-y += -fno-optimize-sibling-calls\n"),
    )
    .map_err(io("cannot write Kbuild"))?;

    let out = Command::new("make")
        .arg("-C")
        .arg(&kdir)
        .arg(format!("M={}", dir.display()))
        .arg("modules")
        .output()
        .map_err(io("cannot run make"))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let built = dir.join(format!("{name}.ko"));
    if !out.status.success() || !built.is_file() {
        return Err(KernelError::Build(first_error(&log)));
    }
    fs::copy(&built, &output).map_err(io(format!("cannot write {}", output.display())))?;
    Ok(output)
}

/// One function of a patch as lpcore reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FunctionStatus {
    /// The old function as the patch names it (`sym`, `sym,N`, `mod:sym`).
    pub old: String,
    /// Its address (0 while waiting for its module).
    pub old_addr: u64,
    /// The replacement's symbol in the patch module.
    pub new: String,
    /// The replacement's address.
    pub new_addr: u64,
    /// `active`, `overridden` (a later patch is stacked on top), `waiting` (module not loaded)
    /// or `disabled`.
    pub state: String,
    /// Versions stacked on the old function (0 when not hooked).
    pub depth: u32,
}

/// One registered patch module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PatchStatus {
    /// Patch (module) name.
    pub name: String,
    /// lpcore's id (registration order).
    pub id: u32,
    /// Whether calls go to it (subject to stacking).
    pub enabled: bool,
    /// Its functions.
    pub functions: Vec<FunctionStatus>,
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

/// Parse one line of `/sys/kernel/lp/<patch>/functions`:
/// `<old> <old addr> -> <new> <new addr> <state> depth=<n>`.
pub fn parse_function_line(line: &str) -> Option<FunctionStatus> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 7 || f[2] != "->" {
        return None;
    }
    Some(FunctionStatus {
        old: f[0].to_string(),
        old_addr: parse_hex(f[1])?,
        new: f[3].to_string(),
        new_addr: parse_hex(f[4])?,
        state: f[5].to_string(),
        depth: f[6].strip_prefix("depth=")?.parse().ok()?,
    })
}

fn read_trimmed(path: &Path) -> Result<String, KernelError> {
    fs::read_to_string(path)
        .map(|s| s.trim_end().to_string())
        .map_err(io(format!("cannot read {}", path.display())))
}

/// Read every patch under `root` (normally [`SYSFS_ROOT`]), sorted by id.
pub fn read_status(root: &Path) -> Result<Vec<PatchStatus>, KernelError> {
    if !root.is_dir() {
        return Err(KernelError::NotLoaded(root.to_path_buf()));
    }
    let mut patches = Vec::new();
    for entry in fs::read_dir(root).map_err(io(format!("cannot list {}", root.display())))? {
        let dir = entry.map_err(io("cannot list the sysfs tree"))?.path();
        if !dir.join("functions").is_file() {
            continue;
        }
        let bad = |file: &str, what: &str| KernelError::Format {
            path: dir.join(file),
            what: what.to_string(),
        };
        let enabled = match read_trimmed(&dir.join("enabled"))?.as_str() {
            "1" => true,
            "0" => false,
            _ => return Err(bad("enabled", "want 0 or 1")),
        };
        let id = read_trimmed(&dir.join("id"))?
            .parse()
            .map_err(|_| bad("id", "want a number"))?;
        let functions = read_trimmed(&dir.join("functions"))?
            .lines()
            .map(|l| parse_function_line(l).ok_or_else(|| bad("functions", l)))
            .collect::<Result<Vec<_>, _>>()?;
        patches.push(PatchStatus {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            id,
            enabled,
            functions,
        });
    }
    patches.sort_by_key(|p| p.id);
    Ok(patches)
}

/// The text `livepatch kernel status` prints.
pub fn format_status(patches: &[PatchStatus]) -> String {
    if patches.is_empty() {
        return "no kernel patches registered\n".to_string();
    }
    let mut out = String::new();
    for p in patches {
        out += &format!(
            "{} (id {}): {}\n",
            p.name,
            p.id,
            if p.enabled { "enabled" } else { "disabled" }
        );
        for f in &p.functions {
            out += &format!(
                "  {} {:#x} -> {} {:#x}  {} (depth {})\n",
                f.old, f.old_addr, f.new, f.new_addr, f.state, f.depth
            );
        }
    }
    out
}

/// `livepatch kernel status [--json]`: what to print, read from [`SYSFS_ROOT`] (or `root`).
pub fn status(root: Option<&Path>, json: bool) -> Result<String, KernelError> {
    let patches = read_status(root.unwrap_or(Path::new(SYSFS_ROOT)))?;
    if json {
        let mut s = serde_json::to_string_pretty(&patches).map_err(|e| KernelError::Format {
            path: PathBuf::from(SYSFS_ROOT),
            what: e.to_string(),
        })?;
        s.push('\n');
        Ok(s)
    } else {
        Ok(format_status(&patches))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from /sys/kernel/lp in the QEMU test VM (lp-kernel/test.sh, LPSTATUS lines).
    const ACTIVE: &str =
        "cmdline_proc_show 0xffffffff819f1bb0 -> new_cmdline_proc_show 0xffffffffc02ab000 active depth=1";

    #[test]
    fn parses_a_captured_functions_line() {
        let f = parse_function_line(ACTIVE).unwrap();
        assert_eq!(f.old, "cmdline_proc_show");
        assert_eq!(f.old_addr, 0xffffffff819f1bb0);
        assert_eq!(f.new, "new_cmdline_proc_show");
        assert_eq!(f.new_addr, 0xffffffffc02ab000);
        assert_eq!((f.state.as_str(), f.depth), ("active", 1));
    }

    #[test]
    fn parses_a_waiting_function() {
        let f = parse_function_line(
            "lp_late:lp_late_value 0x0 -> new_lp_late_value 0xffffffffc0330000 waiting depth=0",
        )
        .unwrap();
        assert_eq!((f.old_addr, f.state.as_str(), f.depth), (0, "waiting", 0));
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(parse_function_line("").is_none());
        assert!(parse_function_line("a 0x1 => b 0x2 active depth=1").is_none());
        assert!(parse_function_line("a zz -> b 0x2 active depth=1").is_none());
        assert!(parse_function_line("a 0x1 -> b 0x2 active depth=x").is_none());
    }

    fn fake_tree(patches: &[(&str, &str, &str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (name, enabled, id, functions) in patches {
            let d = root.path().join(name);
            fs::create_dir(&d).unwrap();
            fs::write(d.join("enabled"), format!("{enabled}\n")).unwrap();
            fs::write(d.join("id"), format!("{id}\n")).unwrap();
            fs::write(d.join("functions"), format!("{functions}\n")).unwrap();
        }
        root
    }

    #[test]
    fn reads_a_tree_sorted_by_id_and_prints_text_and_json() {
        let stacked = "lp_target:lp_target_value 0xffffffffc0201000 -> new_b 0xffffffffc0400000 active depth=2";
        let under = "lp_target:lp_target_value 0xffffffffc0201000 -> new_a 0xffffffffc0300000 overridden depth=2";
        let root = fake_tree(&[("p_b", "1", "6", stacked), ("p_a", "1", "5", under)]);
        let patches = read_status(root.path()).unwrap();
        assert_eq!(patches.iter().map(|p| p.id).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(patches[0].functions[0].state, "overridden");
        let text = status(Some(root.path()), false).unwrap();
        assert!(text.starts_with(
            "p_a (id 5): enabled\n  lp_target:lp_target_value 0xffffffffc0201000 -> new_a"
        ));
        let json: serde_json::Value =
            serde_json::from_str(&status(Some(root.path()), true).unwrap()).unwrap();
        assert_eq!(json[1]["name"], "p_b");
        assert_eq!(json[1]["functions"][0]["depth"], 2);
    }

    #[test]
    fn empty_tree_and_missing_tree() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(
            status(Some(root.path()), false).unwrap(),
            "no kernel patches registered\n"
        );
        let missing = root.path().join("nope");
        let err = status(Some(&missing), false).unwrap_err();
        assert!(err.to_string().starts_with("lpcore is not loaded"), "{err}");
    }

    #[test]
    fn bad_enabled_is_a_format_error() {
        let root = fake_tree(&[("p", "yes", "1", ACTIVE)]);
        let err = read_status(root.path()).unwrap_err();
        assert!(matches!(err, KernelError::Format { .. }), "{err}");
    }

    #[test]
    fn module_names() {
        assert!(valid_module_name("p_cmdline"));
        assert!(!valid_module_name("p-cmdline"));
        assert!(!valid_module_name("9p"));
        assert!(!valid_module_name(""));
        assert!(!valid_module_name(&"x".repeat(56)));
    }

    #[test]
    fn first_error_line_is_quoted() {
        let log = "make: Entering\n/tmp/x/p.c:3:1: error: unknown type name 'foo'\nmore\n";
        assert_eq!(
            first_error(log),
            "/tmp/x/p.c:3:1: error: unknown type name 'foo'"
        );
    }

    /// The kernel the project pins (scripts/install-deps.sh installs its headers).
    const KDIR: &str = "/usr/src/linux-headers-6.1.0-50-cloud-amd64";

    fn modinfo(ko: &Path) -> Vec<String> {
        let bytes = fs::read(ko).unwrap();
        let elf = goblin::elf::Elf::parse(&bytes).unwrap();
        let sh = elf
            .section_headers
            .iter()
            .find(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(".modinfo"))
            .expect(".modinfo section");
        let data = &bytes[sh.sh_offset as usize..(sh.sh_offset + sh.sh_size) as usize];
        data.split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }

    #[test]
    fn packs_the_example_against_the_pinned_headers() {
        assert!(
            Path::new(KDIR).is_dir(),
            "{KDIR} missing: run scripts/install-deps.sh"
        );
        let out = tempfile::tempdir().unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/kernel-cmdline/redact_cmdline.c");
        let ko = pack(&PackOptions {
            source: example,
            name: Some("lp_redact".into()),
            output: Some(out.path().join("lp_redact.ko")),
            kdir: Some(KDIR.into()),
        })
        .unwrap();
        let info = modinfo(&ko);
        assert!(info.contains(&"name=lp_redact".to_string()), "{info:?}");
        assert!(info.contains(&"livepatch_lp=Y".to_string()), "{info:?}");
        assert!(info.contains(&"license=GPL".to_string()), "{info:?}");
        assert!(
            info.iter()
                .any(|l| l.starts_with("vermagic=6.1.0-50-cloud-amd64 SMP")),
            "{info:?}"
        );
    }

    #[test]
    fn a_compile_error_is_one_line_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("broken.c");
        fs::write(
            &src,
            "#include \"livepatch.h\"\nstatic int f(void) { return undefined_thing; }\n",
        )
        .unwrap();
        let out = dir.path().join("broken.ko");
        let err = pack(&PackOptions {
            source: src,
            name: None,
            output: Some(out.clone()),
            kdir: Some(KDIR.into()),
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, KernelError::Build(_)), "{msg}");
        assert!(
            msg.contains("undefined_thing") && !msg.contains('\n'),
            "{msg}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn missing_headers_and_bad_names_are_refused_before_building() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("p.c");
        fs::write(&src, "").unwrap();
        let opts = |name: Option<&str>, kdir: &str| PackOptions {
            source: src.clone(),
            name: name.map(String::from),
            output: Some(dir.path().join("p.ko")),
            kdir: Some(kdir.into()),
        };
        let err = pack(&opts(None, "/nonexistent/kdir")).unwrap_err();
        assert!(matches!(err, KernelError::NoHeaders(_)), "{err}");
        let err = pack(&opts(Some("bad-name"), KDIR)).unwrap_err();
        assert!(matches!(err, KernelError::BadName(_)), "{err}");
        let err = pack(&PackOptions {
            source: dir.path().join("missing.c"),
            ..opts(None, KDIR)
        })
        .unwrap_err();
        assert!(matches!(err, KernelError::Source { .. }), "{err}");
    }
}

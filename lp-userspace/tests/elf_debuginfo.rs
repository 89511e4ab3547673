//! A stripped target with its symbols in a separate debug file (Debian's -dbgsym layout,
//! `<dir>/.build-id/xx/yyyy.debug`): `static` functions are found again, and `pack` works on the
//! stripped file. One test in this binary: it sets LIVEPATCH_DEBUG_DIRS for the process.

#[path = "elf_support/mod.rs"]
mod support;

use std::process::Command;

use lp_userspace::elf::Module;
use lp_userspace::pack::pack;

fn run(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn elf_stripped_target_uses_its_build_id_debug_file() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["dup_a.c", "dup_b.c"], "app", &[]);
    let full = Module::open(&exe).unwrap();
    let id = full.build_id_hex().unwrap();
    let helper_b = full.lookup("helper@dup_b.c").unwrap().value;

    let debug_root = dir.path().join("debug");
    let debug_dir = debug_root.join(".build-id").join(&id[..2]);
    std::fs::create_dir_all(&debug_dir).unwrap();
    let debug_file = debug_dir.join(format!("{}.debug", &id[2..]));
    run(
        "objcopy",
        &[
            "--only-keep-debug",
            exe.to_str().unwrap(),
            debug_file.to_str().unwrap(),
        ],
    );
    run("strip", &["--strip-all", exe.to_str().unwrap()]);

    std::env::set_var("LIVEPATCH_DEBUG_DIRS", dir.path().join("nowhere"));
    let stripped = Module::open(&exe).unwrap();
    assert_eq!(
        stripped.build_id_hex().unwrap(),
        id,
        "strip keeps the build-id"
    );
    assert!(
        stripped.lookup("helper@dup_b.c").is_err(),
        "no statics without the debug file"
    );
    assert!(stripped.debug_file().is_none());

    std::env::set_var(
        "LIVEPATCH_DEBUG_DIRS",
        format!(
            "{}:{}",
            dir.path().join("nowhere").display(),
            debug_root.display()
        ),
    );
    let with_debug = Module::open(&exe).unwrap();
    assert_eq!(with_debug.debug_file(), Some(debug_file.as_path()));
    assert_eq!(with_debug.lookup("helper@dup_b.c").unwrap().value, helper_b);
    assert!(with_debug.lookup("helper").is_err(), "still ambiguous");

    // pack reads the bytes from the stripped file and the symbols from the debug file.
    let obj = support::object(dir.path(), "dup_new.c", "new.o", &[]);
    let patch = pack(&exe, &obj, &["helper@dup_b.c=helper_v2".parse().unwrap()]).unwrap();
    assert_eq!(patch.functions[0].old_vaddr, helper_b);
    let f = full.lookup("helper@dup_b.c").unwrap();
    assert_eq!(
        patch.functions[0].old_bytes,
        full.bytes_at(f.value, f.size).unwrap()
    );

    // A debug file of another build is ignored.
    std::fs::write(
        &debug_file,
        std::fs::read(support::object(dir.path(), "dup_a.c", "a.o", &[])).unwrap(),
    )
    .unwrap();
    assert!(Module::open(&exe).unwrap().debug_file().is_none());
}

//! ELF reading on real gcc output: statics with the same name in two files, `name@file.c`,
//! `name,N`, build-id, PIE vs fixed executables, file bytes of functions, load bias from maps.

#[path = "elf_support/mod.rs"]
mod support;

use std::process::Command;

use lp_userspace::elf::{ElfError, LookupError, Module, SymbolKind};
use lp_userspace::maps;

fn build(extra: &[&str]) -> (tempfile::TempDir, Module) {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["dup_a.c", "dup_b.c"], "app", extra);
    let m = Module::open(&exe).unwrap();
    (dir, m)
}

#[test]
fn elf_static_duplicates_are_ambiguous_and_resolved_by_file_or_position() {
    let (_dir, m) = build(&[]);
    let err = m.lookup("helper").unwrap_err();
    match &err {
        LookupError::Ambiguous { candidates, .. } => {
            assert_eq!(candidates.len(), 2, "{candidates:?}");
            assert!(
                candidates
                    .iter()
                    .any(|c| c.starts_with("helper@dup_a.c (0x")),
                "{candidates:?}"
            );
            assert!(
                candidates
                    .iter()
                    .any(|c| c.starts_with("helper@dup_b.c (0x")),
                "{candidates:?}"
            );
        }
        other => panic!("expected ambiguity, got {other:?}"),
    }
    assert!(err.to_string().contains("helper@dup_a.c"), "{err}");

    let a = m.lookup("helper@dup_a.c").unwrap();
    let b = m.lookup("helper@dup_b.c").unwrap();
    assert_ne!(a.value, b.value);
    assert!(a.local && b.local);
    assert_eq!(a.kind, SymbolKind::Function);
    assert!(a.size > 0);
    assert_eq!(a.file.as_deref(), Some("dup_a.c"));
    // Positions follow .symtab order (whichever file the linker put first).
    let first = m.lookup("helper,1").unwrap().value;
    let second = m.lookup("helper,2").unwrap().value;
    assert_eq!(
        [first.min(second), first.max(second)],
        [a.value.min(b.value), a.value.max(b.value)]
    );
    assert_ne!(first, second);
    assert!(matches!(
        m.lookup("helper,3"),
        Err(LookupError::NotFound { .. })
    ));
    assert!(matches!(m.lookup("helper,0"), Err(LookupError::BadSpec(_))));
    assert!(matches!(
        m.lookup("helper@nope.c"),
        Err(LookupError::NotFound { .. })
    ));
    assert!(matches!(
        m.lookup("no_such_fn"),
        Err(LookupError::NotFound { .. })
    ));

    // Globals, data, and the dynamic symbol table.
    let compute = m.lookup("compute").unwrap();
    assert!(!compute.local && compute.kind == SymbolKind::Function);
    let counter = m.lookup("counter").unwrap();
    assert!(counter.local && counter.kind == SymbolKind::Object);
    assert_eq!(counter.file.as_deref(), Some("dup_a.c"));
    assert!(m.symbols().iter().any(|s| s.name == "main"));
    // The linker's own locals follow an empty STT_FILE: they have no source file.
    let dynamic = m.symbols().iter().find(|s| s.name == "_DYNAMIC").unwrap();
    assert_eq!(dynamic.file, None);

    // The bytes recorded for a function are the file's bytes: compare with objdump's view.
    let bytes = m.bytes_at(compute.value, compute.size).unwrap();
    assert_eq!(bytes.len() as u64, compute.size);
    assert!(m
        .symbol_at(compute.value + 1)
        .is_some_and(|s| s.name == "compute"));
}

#[test]
fn elf_build_id_and_kind_match_readelf() {
    let (dir, pie) = build(&[]);
    assert!(pie.is_position_independent() && !pie.is_fixed_executable());
    let out = Command::new("readelf")
        .args(["-n"])
        .arg(dir.path().join("app"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let readelf_id = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("gcc links with a build-id")
        .trim()
        .to_string();
    assert_eq!(pie.build_id_hex().unwrap(), readelf_id);
    assert!(pie.eh_frame().is_some() && pie.eh_frame_hdr().is_some());

    let (_dir2, exec) = build(&["-no-pie"]);
    assert!(exec.is_fixed_executable());
    assert_eq!(exec.min_vaddr(), 0x400000);
    let (_dir3, noid) = build(&["-Wl,--build-id=none"]);
    assert!(noid.build_id().is_none());

    let dir4 = tempfile::tempdir().unwrap();
    let obj = support::object(dir4.path(), "dup_a.c", "a.o", &[]);
    assert!(Module::open(&obj).unwrap().is_relocatable());
}

#[test]
fn elf_rejects_non_elf_and_truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("script.sh");
    std::fs::write(&txt, "#!/bin/sh\n").unwrap();
    let err = Module::open(&txt).unwrap_err();
    assert!(matches!(err, ElfError::NotElf(_)));
    assert!(err.to_string().ends_with("not an ELF file"), "{err}");
    assert!(matches!(
        Module::open(&dir.path().join("missing")),
        Err(ElfError::Io { .. })
    ));

    let exe = support::executable(dir.path(), &["dup_a.c", "dup_b.c"], "app", &[]);
    let bytes = std::fs::read(exe).unwrap();
    for cut in [16usize, 63, 64, 200, 1000] {
        // Never a panic: either an error or a module with what could be read.
        let _ = Module::parse("cut", bytes[..cut].to_vec());
    }
}

#[test]
fn elf_load_bias_from_maps_matches_a_running_process() {
    let dir = tempfile::tempdir().unwrap();
    // A PIE that sleeps until killed.
    let src = dir.path().join("sleeper.c");
    std::fs::write(
        &src,
        "#include <string.h>\n#include <unistd.h>\nint compute(int x){return x;}\nint main(int c, char **v){ (void)c; if (strlen(v[0]) == 1) return 1; pause(); }\n",
    )
    .unwrap();
    let exe = support::gcc(dir.path(), "sleeper", &["-O2", src.to_str().unwrap()]);
    let mut child = Command::new(&exe).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let pid = child.id() as i32;
    let all = maps::read(pid).unwrap();
    let mods = maps::modules(&all);
    let me = maps::find_module(&mods, "sleeper").expect("the executable is mapped");
    let module = Module::open(&me.open_path(pid)).unwrap();
    let bias = me.load_bias(&module).unwrap();
    assert_eq!(bias % 4096, 0);
    assert_eq!(bias, me.base(), "PIE: bias = where offset 0 is mapped");
    // The function's bytes in memory equal the file's.
    let f = module.lookup("compute").unwrap();
    let file = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; f.size as usize];
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut buf, f.value + bias).unwrap();
    assert_eq!(buf, module.bytes_at(f.value, f.size).unwrap());
    assert!(mods.iter().any(|m| m.file_name().starts_with("libc.so")));
    // The GOT slot of an imported IFUNC (pause is plain; use the libc module's own view too).
    let slot = module
        .import_slot("pause")
        .expect("the sleeper imports pause");
    let mut got = [0u8; 8];
    file.read_exact_at(&mut got, slot + bias).unwrap();
    let bound = u64::from_le_bytes(got);
    let libc = mods
        .iter()
        .find(|m| m.file_name().starts_with("libc.so"))
        .unwrap();
    let libc_elf = Module::open(&libc.open_path(pid)).unwrap();
    let libc_bias = libc.load_bias(&libc_elf).unwrap();
    let pause = libc_elf.global("pause").unwrap();
    // Bound now (BIND_NOW) or after the first call (pause was called): libc's pause.
    assert_eq!(bound, libc_bias + pause.value);
    assert!(module.import_slot("no_such_import").is_none());
    // strlen is an IFUNC in libc: its symbol is the resolver; the GOT slot holds the chosen
    // implementation, somewhere else in libc's code.
    let strlen = libc_elf.global("strlen").unwrap();
    assert!(strlen.ifunc);
    let slot = module.import_slot("strlen").expect("imports strlen");
    file.read_exact_at(&mut got, slot + bias).unwrap();
    let chosen = u64::from_le_bytes(got);
    assert_ne!(chosen, libc_bias + strlen.value);
    assert!(
        libc.exec_ranges().any(|(s, e)| chosen >= s && chosen < e),
        "{chosen:x}"
    );
    let mem = lp_userspace::unwind::ProcMemory::open(pid).unwrap();
    let modules = [(bias, &module), (libc_bias, &libc_elf)];
    assert_eq!(
        lp_userspace::elf::resolve_import(modules, "strlen", &mem),
        Some(chosen)
    );
    assert_eq!(
        lp_userspace::elf::resolve_import(modules, "not_imported", &mem),
        None
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn elf_cold_parts_and_gcc_clones() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["cold_clone.c"], "cold", &[]);
    let m = Module::open(&exe).unwrap();
    let checked = m.lookup("checked").unwrap();
    let cold = m.cold_parts(checked);
    assert_eq!(cold.len(), 1, "gcc split checked: {cold:?}");
    assert_eq!(cold[0].name, "checked.cold");
    assert!(cold[0].size > 0 && !checked.contains(cold[0].value));
    assert!(m.cold_parts(m.lookup("main").unwrap()).is_empty());

    // `scale` exists only as a specialised copy: the error says so.
    let err = m.lookup("scale").unwrap_err();
    match &err {
        LookupError::NotFound { clones, .. } => {
            assert!(clones.iter().any(|c| c.starts_with("scale.")), "{clones:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("specialised copies"), "{err}");
    let clone = m.clones_of("scale").remove(0);
    assert!(m.lookup(&clone).is_ok(), "the clone itself can be named");
}

#[test]
fn elf_symbol_spec_syntax() {
    use lp_userspace::elf::SymbolSpec;
    assert_eq!(SymbolSpec::parse("f").unwrap(), SymbolSpec::Name("f"));
    assert_eq!(
        SymbolSpec::parse("f@a.c").unwrap(),
        SymbolSpec::InFile("f", "a.c")
    );
    assert_eq!(
        SymbolSpec::parse("f@src/a,b.c").unwrap(),
        SymbolSpec::InFile("f", "src/a,b.c")
    );
    assert_eq!(
        SymbolSpec::parse("f,2").unwrap(),
        SymbolSpec::Position("f", 2)
    );
    for bad in ["", "f,0", ",1", "f,x", "@a.c", "f@", "f@a.c,2"] {
        assert!(
            matches!(SymbolSpec::parse(bad), Err(LookupError::BadSpec(_))),
            "`{bad}` must be refused"
        );
    }
}

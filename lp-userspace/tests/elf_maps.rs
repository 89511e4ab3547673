//! /proc/PID/maps parsing: deleted files through map_files, anonymous regions, free space near a
//! module.

#[path = "elf_support/mod.rs"]
mod support;

use std::process::Command;

use lp_userspace::elf::Module;
use lp_userspace::maps::{self, find_free_near, Mapping};

#[test]
fn elf_maps_parses_special_lines() {
    let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234                       /usr/bin/my app
55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 1234                       /usr/bin/my app
7f0000000000-7f0000001000 rw-p 00000000 00:00 0 
7f0000001000-7f0000002000 r-xp 00002000 08:01 99                         /tmp/lib.so (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";
    let all = maps::parse(text).unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].path.as_deref(), Some("/usr/bin/my app"));
    assert!(all[1].exec && !all[1].write && all[1].offset == 0x1000);
    assert!(all[2].is_anonymous() && all[2].path.is_none());
    assert!(all[3].deleted && all[3].path.as_deref() == Some("/tmp/lib.so"));
    assert!(all[4].is_anonymous());
    let mods = maps::modules(&all);
    assert_eq!(mods.len(), 2);
    assert_eq!(mods[0].mappings.len(), 2);
    assert_eq!(mods[0].base(), 0x55d0c0a00000);
    assert_eq!(mods[1].base(), 0x7f0000001000 - 0x2000);
    assert_eq!(
        mods[1].open_path(42).to_str(),
        Some("/proc/42/map_files/7f0000001000-7f0000002000")
    );
    assert!(maps::parse("garbage line\n").is_err());
    assert!(maps::parse("1000-0 r-xp 0 0:0 0\n").is_err());
}

/// A readable anonymous mapping `[start, end)`.
fn anonymous(start: u64, end: u64) -> Mapping {
    Mapping {
        start,
        end,
        read: true,
        write: false,
        exec: false,
        shared: false,
        offset: 0,
        dev: "0:0".into(),
        inode: 0,
        path: None,
        deleted: false,
    }
}

#[test]
fn elf_maps_free_range_is_within_reach_and_free() {
    let m = anonymous;
    let all = vec![
        m(0x5555_0000_0000, 0x5555_0010_0000),
        m(0x5555_0010_0000 + 0x1000, 0x5555_0020_0000),
    ];
    let a = find_free_near(&all, 0x5555_0000_0000, 0x5555_0020_0000, 0x3000).unwrap();
    assert!(
        all.iter()
            .all(|x| a + 0x3000 + 0x1000 <= x.start || a >= x.end + 0x1000),
        "{a:x}"
    );
    let span = (a + 0x3000).max(0x5555_0020_0000) - a.min(0x5555_0000_0000);
    assert!(span <= 1 << 31, "{a:x} out of rel32 reach");
    // Everything around the module taken: nothing.
    let full = vec![m(0x1_0000_0000 - (1 << 32), 0x1_0000_0000 + (1 << 32))];
    assert_eq!(
        find_free_near(&full, 0x1_0000_0000, 0x1_0001_0000, 0x1000),
        None
    );
    // A size that cannot be rounded to pages: no place, no overflow panic.
    assert_eq!(
        find_free_near(&all, 0x5555_0000_0000, 0x5555_0020_0000, u64::MAX - 5),
        None
    );
}

#[test]
fn elf_maps_deleted_executable_opens_through_map_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.c");
    std::fs::write(&src, "#include <unistd.h>\nint main(){pause();}\n").unwrap();
    let exe = support::gcc(dir.path(), "gone", &["-O2", src.to_str().unwrap()]);
    let id = Module::open(&exe).unwrap().build_id_hex();
    let mut child = Command::new(&exe).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    // Found by file identity, through a symlink too.
    let link = dir.path().join("alias");
    std::os::unix::fs::symlink(&exe, &link).unwrap();
    let pids = maps::processes_mapping(&link).unwrap();
    assert_eq!(pids, vec![child.id() as i32]);
    assert!(maps::processes_mapping(&dir.path().join("nope")).is_err());
    std::fs::remove_file(&exe).unwrap();
    let pid = child.id() as i32;
    let mods = maps::modules(&maps::read(pid).unwrap());
    let gone = mods
        .iter()
        .find(|m| m.file_name() == "gone")
        .expect("mapped");
    assert!(gone.deleted);
    let path = gone.open_path(pid);
    assert!(path.to_str().unwrap().contains("/map_files/"));
    assert_eq!(Module::open(&path).unwrap().build_id_hex(), id);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(maps::read(i32::MAX).is_err());
}

/// Random address spaces (a fixed-seed generator, so failures reproduce): whatever
/// `find_free_near` returns is free, page aligned, a page away from every mapping and within
/// rel32 reach of the whole module; when it returns nothing, no page-aligned hole near the module
/// qualifies (checked against a brute force over candidate starts at every gap boundary).
#[test]
fn elf_maps_free_range_properties_on_random_layouts() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    const PAGE: u64 = 0x1000;
    const REACH: u64 = 1 << 31;
    let m = anonymous;
    let (mut found, mut none) = (0, 0);
    for round in 0..300 {
        // A module somewhere, and mappings dense around it (sometimes leaving no room).
        let lo = (0x5555_0000_0000 + (next() % 0x1000_0000)) & !(PAGE - 1);
        let hi = lo + PAGE * (1 + next() % 64);
        let mut maps = vec![m(lo, hi)];
        let spread = if round % 3 == 0 {
            REACH * 2
        } else {
            REACH / 64
        };
        for _ in 0..(next() % 40) {
            let center = lo - spread / 2 + next() % spread;
            let start = center & !(PAGE - 1);
            let len = PAGE * (1 + next() % (if round % 5 == 0 { 1 << 20 } else { 64 }));
            maps.push(m(start, start + len));
        }
        if round % 4 == 0 {
            // Everything in reach taken but one small hole below the module.
            let gap = PAGE * (16 + next() % 64);
            let hole = PAGE * (next() % 8);
            maps = vec![
                m(lo, hi),
                m(hi, hi + REACH + PAGE),
                m(lo - REACH - 16 * PAGE, lo - gap),
                m(lo - gap + hole, lo),
            ];
        }
        maps.sort_by_key(|x| x.start);
        let size = PAGE * (1 + next() % 8);
        let ok = |a: u64| {
            a.is_multiple_of(PAGE)
                && maps
                    .iter()
                    .all(|x| a + size + PAGE <= x.start || a >= x.end + PAGE)
                && (a + size).max(hi) - a.min(lo) <= REACH
        };
        match find_free_near(&maps, lo, hi, size) {
            Some(a) => {
                assert!(ok(a), "round {round}: 0x{a:x} is not a valid place");
                found += 1;
            }
            None => {
                none += 1;
                // Every valid placement can be slid to touch a guard boundary or a window edge.
                let mut candidates = vec![
                    hi.saturating_sub(REACH).div_ceil(PAGE) * PAGE,
                    (lo + REACH - size) & !(PAGE - 1),
                ];
                for x in &maps {
                    candidates.push(x.end + PAGE);
                    candidates.push(x.start.saturating_sub(PAGE + size));
                }
                assert!(
                    !candidates.into_iter().any(ok),
                    "round {round}: a hole was missed"
                );
            }
        }
    }
    assert!(
        found > 0 && none > 0,
        "both outcomes exercised: {found} found, {none} none"
    );
}

/// The tool reads ELF files through read-only mappings of its own: they are not modules of this
/// process. Without leaving them out, a library we merely opened would look mapped by us (the
/// Python bindings' `processes_mapping` listed the interpreter itself) and libc would get a
/// second, wrong first mapping (a wrong load bias in `modules`).
#[test]
fn elf_maps_of_our_own_process_leave_out_the_files_we_only_read() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("libcopy.so");
    let libc = maps::modules(&maps::read(std::process::id() as i32).unwrap())
        .into_iter()
        .find(|m| m.file_name().starts_with("libc.so"))
        .expect("libc mapped");
    std::fs::copy(&libc.path, &copy).unwrap();
    let me = std::process::id() as i32;
    let bias_before = libc.load_bias(&Module::open(std::path::Path::new(&libc.path)).unwrap());

    let opened = Module::open_lazy(&copy).unwrap();
    let libc_opened = Module::open_lazy(std::path::Path::new(&libc.path)).unwrap();
    assert!(opened.build_id().is_some() && libc_opened.build_id().is_some());
    assert!(
        !maps::processes_mapping(&copy).unwrap().contains(&me),
        "a file we only read is not mapped by us"
    );
    let again = maps::modules(&maps::read(me).unwrap())
        .into_iter()
        .find(|m| m.path == libc.path)
        .unwrap();
    assert_eq!(again.mappings, libc.mappings, "only the loader's mappings");
    assert_eq!(again.load_bias(&libc_opened), bias_before);
    drop((opened, libc_opened));
}

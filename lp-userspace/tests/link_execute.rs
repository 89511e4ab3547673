//! The patch linker on real gcc output: link an object into memory of this test process, make it
//! executable and call it — through libc and through a function the resolver supplies.

#[path = "elf_support/mod.rs"]
mod support;

use support::in_process::{dlsym, Mapped};

use std::ffi::CStr;

use lp_userspace::link::{Layout, LinkError, LinkedImage};
use lp_userspace::maps;

#[no_mangle]
pub extern "C" fn lp_test_host_callback(x: i32) -> i32 {
    1000 + x
}

#[no_mangle]
pub static mut LP_TEST_HOST_VALUE: i32 = 500_000;

fn resolver(name: &str) -> Option<u64> {
    match name {
        "host_callback" => Some(lp_test_host_callback as *const () as usize as u64),
        "host_value" => Some(std::ptr::addr_of!(LP_TEST_HOST_VALUE) as u64),
        _ => dlsym(name),
    }
}

fn expected_entry(x: i32, scale: i32) -> i32 {
    let op = if x & 1 == 0 { 2 * x } else { 3 * x };
    let inner = op + [10, 20, 30, 40][(x & 3) as usize];
    // SAFETY: read of a plain static no thread writes.
    let host_value = unsafe { std::ptr::addr_of!(LP_TEST_HOST_VALUE).read() };
    inner * scale + 1000 + x + host_value
}

fn run_linked(obj: &[u8], hint: u64) -> (LinkedImage, u64) {
    let layout = Layout::of(obj).expect("layout");
    assert!(layout.size() > 0 && layout.size().is_multiple_of(4096));
    let mapped = Mapped::new(layout.size(), hint);
    let image = layout.link(mapped.addr, &resolver).expect("link");
    mapped.load(&image);
    let entry = image.symbol("lp_entry").expect("lp_entry linked");
    let calls = image.symbol("lp_calls").expect("lp_calls linked");
    let format = image.symbol("lp_format").expect("lp_format linked");
    // SAFETY: the image was linked for this address and its text made executable; the C
    // signatures are those of tests/fixtures/elf/patch_obj.c.
    unsafe {
        let entry: extern "C" fn(i32) -> i32 = std::mem::transmute(entry as usize);
        let calls: extern "C" fn() -> i32 = std::mem::transmute(calls as usize);
        let format: extern "C" fn(i32) -> *const libc::c_char =
            std::mem::transmute(format as usize);
        for x in 0..8 {
            assert_eq!(entry(x), expected_entry(x, 3), "lp_entry({x})");
        }
        assert_eq!(calls(), 8, "bss counter counts the calls");
        let s = CStr::from_ptr(format(42)).to_str().unwrap().to_string();
        assert_eq!(s, "value=42 len=6");
    }
    let addr = mapped.addr;
    std::mem::forget(mapped); // keep code alive until the end of the test process
    (image, addr)
}

#[test]
fn link_executes_far_from_callees_through_stubs() {
    let dir = tempfile::tempdir().unwrap();
    let obj = std::fs::read(support::object(dir.path(), "patch_obj.c", "p.o", &[])).unwrap();
    // A fresh mmap lands near the libraries, far (> 2 GiB) from this PIE test binary, so the
    // call to host_callback must go through a stub.
    let (image, addr) = run_linked(&obj, 0);
    let cb = lp_test_host_callback as *const () as usize as u64;
    let far = (cb as i64 - addr as i64).unsigned_abs() > (1 << 31);
    assert!(
        far,
        "mmap placed the image near the test binary; the stub path is not exercised"
    );
    assert!(
        image.text_ranges.len() >= 2,
        "a stub range exists for far callees"
    );
    assert!(image.eh_frame.is_some());
    let eh = image.eh_frame_bytes().unwrap();
    assert_eq!(
        &eh[eh.len() - 4..],
        &[0, 0, 0, 0],
        "eh_frame is zero-terminated"
    );
}

#[test]
fn link_executes_near_callees_directly_with_function_sections() {
    let dir = tempfile::tempdir().unwrap();
    let obj = std::fs::read(support::object(
        dir.path(),
        "patch_obj.c",
        "p.o",
        &["-ffunction-sections", "-fdata-sections"],
    ))
    .unwrap();
    // Place the image within ±2 GiB of this test binary (found through our own maps).
    let all = maps::read(std::process::id() as i32).unwrap();
    let cb = lp_test_host_callback as *const () as usize as u64;
    let me = maps::modules(&all)
        .into_iter()
        .find(|m| m.contains(cb))
        .expect("test binary mapped");
    let size = Layout::of(&obj).unwrap().size();
    let hint =
        support::in_process::free_near(me.start(), me.end(), size).expect("room near the binary");
    let (image, addr) = run_linked(&obj, hint);
    assert_eq!(addr, hint, "the kernel honours a free hint");
    // host_value (in this binary, in reach) and scale (in the object) are read without the GOT.
    assert!(image.relaxed >= 2, "relaxed {}", image.relaxed);
    let entry = image.symbol("lp_entry").unwrap();
    assert!((entry as i64 - cb as i64).unsigned_abs() < (1 << 31));
    assert!(
        image.text_ranges.len() >= 4,
        "one range per function section"
    );
}

#[test]
fn link_refuses_tls_undefined_and_non_objects() {
    let dir = tempfile::tempdir().unwrap();
    let tls = std::fs::read(support::object(dir.path(), "tls_obj.c", "tls.o", &[])).unwrap();
    let err = Layout::of(&tls).unwrap_err();
    assert!(matches!(err, LinkError::UnsupportedSection { .. }), "{err}");
    assert!(err.to_string().contains("thread-local"), "{err}");

    let undef = std::fs::read(support::object(dir.path(), "undef_obj.c", "u.o", &[])).unwrap();
    let layout = Layout::of(&undef).unwrap();
    assert_eq!(
        layout.undefined_symbols(),
        vec!["nowhere_to_be_found".to_string()]
    );
    let err = layout.link(0x7000_0000_0000, &resolver).unwrap_err();
    assert_eq!(err, LinkError::Undefined("nowhere_to_be_found".into()));
    assert!(
        layout.link(0x7000_0000_0001, &resolver).is_err(),
        "unaligned load address"
    );

    let exe = std::fs::read(support::executable(
        dir.path(),
        &["dup_a.c", "dup_b.c"],
        "app",
        &[],
    ))
    .unwrap();
    let err = Layout::of(&exe).unwrap_err();
    assert!(
        err.to_string().contains("not a relocatable object"),
        "{err}"
    );
    let err = Layout::of(b"#!/bin/sh\necho hello\n").unwrap_err();
    assert!(err.to_string().contains("not an ELF"), "{err}");
}

#[test]
fn link_non_pic_object_is_refused_out_of_range_high_up() {
    // Non-PIC code uses R_X86_64_32 / 32S absolute addresses: fine below 2 GiB, an error with
    // the relocation named when the image lives high in the address space.
    let dir = tempfile::tempdir().unwrap();
    let obj = std::fs::read(support::object(
        dir.path(),
        "patch_obj.c",
        "np.o",
        &["-fno-pic", "-mcmodel=small"],
    ))
    .unwrap();
    let layout = Layout::of(&obj).unwrap();
    match layout.link(0x7f00_0000_0000, &resolver) {
        Err(LinkError::OutOfRange { kind, .. }) => assert!(kind.contains("32"), "{kind}"),
        Ok(_) => panic!("absolute 32-bit relocations linked at a 47-bit address"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn link_perf_map_names_linked_functions() {
    let dir = tempfile::tempdir().unwrap();
    let obj = std::fs::read(support::object(dir.path(), "patch_obj.c", "p.o", &[])).unwrap();
    let image = Layout::of(&obj)
        .unwrap()
        .link(0x7000_0000_0000, &resolver)
        .unwrap();
    // A pid that cannot exist (above pid_max) so no real process's map is touched.
    let pid = 1 << 30;
    let _ = std::fs::remove_file(lp_userspace::perf_map::path(pid));
    lp_userspace::perf_map::record(pid, &image.symbol_list, "abc").unwrap();
    let text = std::fs::read_to_string(lp_userspace::perf_map::path(pid)).unwrap();
    let entry = image
        .symbol_list
        .iter()
        .find(|s| s.name == "lp_entry")
        .unwrap();
    assert!(
        text.contains(&format!(
            "{:x} {:x} lp_entry [livepatch abc]\n",
            entry.addr, entry.size
        )),
        "{text}"
    );
    assert!(
        !text.contains(" scale "),
        "data symbols are not listed: {text}"
    );
    lp_userspace::perf_map::forget(pid, "abc").unwrap();
    assert!(!lp_userspace::perf_map::path(pid).exists());
}

#[test]
fn link_perf_map_never_writes_through_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let obj = std::fs::read(support::object(dir.path(), "patch_obj.c", "p.o", &[])).unwrap();
    let image = Layout::of(&obj)
        .unwrap()
        .link(0x7000_0000, &resolver)
        .unwrap();
    // A pid above the kernel's pid_max: no real process owns this map name.
    let pid = 2_000_000_000;
    let map = lp_userspace::perf_map::path(pid);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n[livepatch abc]\n").unwrap();
    let _ = std::fs::remove_file(&map);
    std::os::unix::fs::symlink(&victim, &map).unwrap();
    let appended = lp_userspace::perf_map::record(pid, &image.symbol_list, "abc");
    let rewritten = lp_userspace::perf_map::forget(pid, "abc");
    let link_still_there = std::fs::symlink_metadata(&map).is_ok();
    let _ = std::fs::remove_file(&map);
    assert!(appended.is_err(), "record followed the link");
    assert!(
        rewritten.is_err() || !link_still_there,
        "forget followed the link"
    );
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n[livepatch abc]\n"
    );
}

#[test]
fn link_gdb_names_linked_functions_from_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let path = support::object(
        dir.path(),
        "patch_obj.c",
        "p.o",
        &["-ffunction-sections", "-g"],
    );
    let obj = std::fs::read(&path).unwrap();
    let image = Layout::of(&obj)
        .unwrap()
        .link(0x7000_0000_0000, &resolver)
        .unwrap();
    let cmd = lp_userspace::perf_map::gdb_add_symbol_file(&path, &image);
    let entry = image.symbol("lp_entry").unwrap();
    let inner = image.symbol("lp_inner").unwrap();
    let out = std::process::Command::new("gdb")
        .args(["-nx", "-batch", "-ex", &cmd])
        .args(["-ex", &format!("info symbol 0x{:x}", entry + 3)])
        .args(["-ex", &format!("info symbol 0x{:x}", inner)])
        .output()
        .expect("gdb runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("lp_entry + 3 in section .text.lp_entry"),
        "{cmd}\n{text}"
    );
    assert!(
        text.contains("lp_inner in section .text.lp_inner"),
        "{cmd}\n{text}"
    );
}

#[test]
fn link_executes_no_plt_calls_relaxed_near_and_through_the_got_far() {
    let dir = tempfile::tempdir().unwrap();
    let obj = std::fs::read(support::object(
        dir.path(),
        "patch_obj.c",
        "p.o",
        &["-fno-plt"],
    ))
    .unwrap();
    let (far_image, _) = run_linked(&obj, 0);
    let all = maps::read(std::process::id() as i32).unwrap();
    let cb = lp_test_host_callback as *const () as usize as u64;
    let me = maps::modules(&all)
        .into_iter()
        .find(|m| m.contains(cb))
        .unwrap();
    let size = Layout::of(&obj).unwrap().size();
    let hint = support::in_process::free_near(me.start(), me.end(), size).unwrap();
    let (near_image, addr) = run_linked(&obj, hint);
    assert_eq!(addr, hint);
    // call *host_callback@GOTPCREL(%rip) became a direct call near, stayed indirect far.
    assert!(
        near_image.relaxed > far_image.relaxed,
        "{} vs {}",
        near_image.relaxed,
        far_image.relaxed
    );
}

#[test]
fn link_unknown_relocation_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut obj = std::fs::read(support::object(dir.path(), "patch_obj.c", "p.o", &[])).unwrap();
    // Rewrite the type of the first relocation of .rela.text to 23 (R_X86_64_TPOFF32, a TLS
    // relocation gcc emits only for thread-local variables).
    let (offset, name) = {
        let elf = goblin::elf::Elf::parse(&obj).unwrap();
        let sh = elf
            .section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".rela.text"))
            .unwrap();
        (sh.sh_offset as usize, ".text")
    };
    // Elf64_Rela: r_offset (8), r_info (8: type in the low 32 bits), r_addend (8).
    obj[offset + 8..offset + 12].copy_from_slice(&23u32.to_le_bytes());
    let err = Layout::of(&obj).unwrap_err();
    match &err {
        LinkError::UnsupportedRelocation {
            code,
            section,
            kind,
            ..
        } => {
            assert_eq!(*code, 23);
            assert_eq!(section, name);
            assert!(kind.contains("TPOFF32"), "{kind}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("unsupported relocation"), "{err}");
}

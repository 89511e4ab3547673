//! New code calling `static` functions and reading a `static` variable of its target — the
//! ambiguous `helper` (defined static in two files) picked by `name@file.c` and by `name,N` —
//! linked next to a real library loaded in this process and executed.

#[path = "elf_support/mod.rs"]
mod support;

use support::in_process::Mapped;

use std::ffi::CString;

use lp_userspace::elf::Module;
use lp_userspace::link::Layout;
use lp_userspace::maps;

#[test]
fn link_calls_ambiguous_statics_of_the_target_by_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let lib = support::gcc(
        dir.path(),
        "libdup.so",
        &[
            "-shared",
            "-fPIC",
            "-O2",
            support::fixture("dup_a.c").to_str().unwrap(),
            support::fixture("dup_b.c").to_str().unwrap(),
        ],
    );
    let c = CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: loading a library we just built; its constructors are gcc's defaults.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null());

    let all = maps::read(std::process::id() as i32).unwrap();
    let mods = maps::modules(&all);
    let mapped = maps::find_module(&mods, lib.to_str().unwrap()).expect("library mapped");
    let module = Module::open(&lib).unwrap();
    let bias = mapped.load_bias(&module).unwrap();
    assert!(
        module.lookup("helper").is_err(),
        "bare `helper` is ambiguous"
    );

    let obj = std::fs::read(support::object(dir.path(), "use_statics.c", "u.o", &[])).unwrap();
    let layout = Layout::of(&obj).unwrap();
    let mut wanted = layout.undefined_symbols();
    wanted.sort();
    assert_eq!(wanted, ["counter@dup_a.c", "helper,2", "helper@dup_a.c"]);
    let at = support::in_process::free_near(mapped.start(), mapped.end(), layout.size()).unwrap();
    let mapped = Mapped::new(layout.size(), at);
    let base = mapped.addr;
    assert_eq!(base, at);
    let image = layout
        .link(base, &|name| {
            module.lookup(name).ok().map(|s| bias + s.value)
        })
        .unwrap();
    mapped.load(&image);
    // SAFETY: linked for this address; signature from use_statics.c.
    let use_statics: extern "C" fn(i32) -> i32 =
        unsafe { std::mem::transmute(image.symbol("use_statics").unwrap() as usize) };

    let helper_a = |x: i32| 3 * x + 1; // dup_a.c
    let helper_b = |x: i32| 5 * x - 2; // dup_b.c
    let second = module.lookup("helper,2").unwrap();
    let helper_2: &dyn Fn(i32) -> i32 = if second.file.as_deref() == Some("dup_a.c") {
        &helper_a
    } else {
        &helper_b
    };
    for x in [0, 1, 7, 100] {
        assert_eq!(
            use_statics(x),
            helper_a(x) * 1000 + helper_2(x) + 7 * 1_000_000,
            "x = {x}"
        );
    }
}

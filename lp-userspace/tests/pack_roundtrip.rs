//! `pack` on a real executable and a real object: default same-name replacement, explicit
//! `--replace` with disambiguation, the patch file round trip, and every refusal.

#[path = "elf_support/mod.rs"]
mod support;

use lp_userspace::elf::Module;
use lp_userspace::pack::{pack, PackError, Replacement};
use lp_userspace::patchfile::Patch;

fn r(s: &str) -> Replacement {
    s.parse().unwrap()
}

#[test]
fn pack_default_replaces_same_name_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["dup_a.c", "dup_b.c"], "app", &[]);
    let obj = support::object(dir.path(), "dup_new.c", "new.o", &[]);
    let patch = pack(&exe, &obj, &[]).unwrap();
    let target = Module::open(&exe).unwrap();
    assert_eq!(patch.target_name, "app");
    assert_eq!(patch.target_build_id, target.build_id().unwrap());
    assert_eq!(patch.functions.len(), 1, "only compute exists in both");
    let f = &patch.functions[0];
    let compute = target.lookup("compute").unwrap();
    assert_eq!(
        (f.old_name.as_str(), f.new_name.as_str()),
        ("compute", "compute")
    );
    assert_eq!((f.old_vaddr, f.old_size), (compute.value, compute.size));
    assert_eq!(
        f.old_bytes,
        target.bytes_at(compute.value, compute.size).unwrap()
    );
    assert_eq!(patch.object, std::fs::read(&obj).unwrap());
    assert_eq!(patch.id.len(), 16);

    let file = dir.path().join("p.lpatch");
    patch.save(&file).unwrap();
    let back = Patch::load(&file).unwrap();
    assert_eq!(back, patch);
    // Same content, same id: packing twice is detectable.
    assert_eq!(pack(&exe, &obj, &[]).unwrap().id, patch.id);
}

#[test]
fn pack_explicit_replace_with_disambiguation() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["dup_a.c", "dup_b.c"], "app", &[]);
    let obj = support::object(dir.path(), "dup_new.c", "new.o", &[]);
    let target = Module::open(&exe).unwrap();
    let patch = pack(&exe, &obj, &[r("helper@dup_b.c=helper_v2"), r("compute")]).unwrap();
    assert_eq!(patch.functions.len(), 2);
    let h = &patch.functions[0];
    assert_eq!(h.old_name, "helper@dup_b.c");
    assert_eq!(h.new_name, "helper_v2");
    assert_eq!(h.old_vaddr, target.lookup("helper@dup_b.c").unwrap().value);
    // The recorded spec finds the same symbol again in the target.
    assert_eq!(target.lookup(&h.old_name).unwrap().value, h.old_vaddr);

    // By position too.
    let pos = target.lookup("helper,2").unwrap().value;
    let patch2 = pack(&exe, &obj, &[r("helper,2=helper_v2")]).unwrap();
    assert_eq!(patch2.functions[0].old_vaddr, pos);
    assert_ne!(patch2.id, patch.id);
}

#[test]
fn pack_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["dup_a.c", "dup_b.c"], "app", &[]);
    let obj = support::object(dir.path(), "dup_new.c", "new.o", &[]);
    let msg = |e: PackError| e.to_string();

    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    let e = msg(pack(&txt, &obj, &[]).unwrap_err());
    assert!(e.contains("not an ELF file"), "{e}");
    let e = msg(pack(&exe, &txt, &[]).unwrap_err());
    assert!(e.contains("not an ELF file"), "{e}");
    let e = msg(pack(&exe, &exe, &[]).unwrap_err());
    assert!(e.contains("not a relocatable object"), "{e}");

    let none = support::object(dir.path(), "nothing_new.c", "none.o", &[]);
    assert!(matches!(
        pack(&exe, &none, &[]),
        Err(PackError::NothingReplaced)
    ));

    let e = pack(&exe, &obj, &[r("helper=helper_v2")]).unwrap_err();
    assert!(e.to_string().contains("ambiguous"), "{e}");
    assert!(e.to_string().contains("helper@dup_a.c"), "{e}");
    let e = msg(pack(&exe, &obj, &[r("no_such=helper_v2")]).unwrap_err());
    assert!(e.contains("`no_such` not found"), "{e}");
    let e = msg(pack(&exe, &obj, &[r("compute=not_in_object")]).unwrap_err());
    assert!(
        e.contains("`not_in_object` is not defined in the object"),
        "{e}"
    );
    let e = msg(pack(&exe, &obj, &[r("counter@dup_a.c=compute")]).unwrap_err());
    assert!(e.contains("not a function"), "{e}");
    let e = msg(pack(&exe, &obj, &[r("compute"), r("compute")]).unwrap_err());
    assert!(e.contains("replaced twice"), "{e}");
    assert!("a=b=c".parse::<Replacement>().is_err());
    assert!("x,0".parse::<Replacement>().is_err());

    let noid = support::executable(
        dir.path(),
        &["dup_a.c", "dup_b.c"],
        "noid",
        &["-Wl,--build-id=none"],
    );
    let e = msg(pack(&noid, &obj, &[]).unwrap_err());
    assert!(e.contains("no GNU build-id"), "{e}");

    let tls = support::object(dir.path(), "tls_obj.c", "tls.o", &[]);
    let e = msg(pack(&exe, &tls, &[r("compute=get")]).unwrap_err());
    assert!(e.contains("thread-local"), "{e}");
}

#[test]
fn pack_shared_library_target() {
    let dir = tempfile::tempdir().unwrap();
    let lib = support::gcc(
        dir.path(),
        "libdup.so",
        &[
            "-shared",
            "-fPIC",
            "-O2",
            support::fixture("dup_a.c").to_str().unwrap(),
        ],
    );
    let obj = support::object(dir.path(), "dup_new.c", "new.o", &[]);
    let patch = pack(&lib, &obj, &[]).unwrap();
    assert_eq!(patch.target_name, "libdup.so");
    assert_eq!(patch.functions[0].old_name, "compute");
}

#[test]
fn pack_refuses_new_copies_of_the_targets_state() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["dup_a.c", "dup_b.c"], "app", &[]);
    let shadow = support::object(dir.path(), "shadow_state.c", "shadow.o", &[]);
    let e = pack(&exe, &shadow, &[]).unwrap_err();
    assert!(
        matches!(&e, PackError::ShadowedState(v) if v == "counter"),
        "{e}"
    );
    assert!(e.to_string().contains("fresh copy"), "{e}");

    // Function-local statics: `calls.0` in the fix, `calls.N` in the target.
    let app = support::executable(dir.path(), &["tally_app.c"], "tally", &[]);
    let local = support::object(dir.path(), "static_local.c", "local.o", &[]);
    let e = pack(&app, &local, &[]).unwrap_err();
    assert!(
        matches!(&e, PackError::ShadowedState(v) if v.starts_with("calls.")),
        "{e}"
    );

    // An object without same-named state packs.
    let new_state = support::object(dir.path(), "dup_new.c", "new.o", &[]);
    assert!(pack(&exe, &new_state, &[]).is_ok());
}

//! Call sites in the patch file (format version 2): `pack` finds a gcc -O2 target's direct
//! call and tail call of a replaced function (not the call through a pointer), they survive a
//! round trip, version 1 files (without call sites) are still read with the same id, and call
//! sites that do not branch to their function, or overlap, are refused.

mod common;
use common::*;
use lp_userspace::patchfile::{encode_raw, CallSitePatch, FunctionPatch, Patch, PatchFileError};

fn work_patch(call_sites: Vec<CallSitePatch>) -> Patch {
    Patch::new(
        "app".into(),
        vec![0xab; 20],
        vec![FunctionPatch {
            old_name: "work".into(),
            old_vaddr: 0x1260,
            old_size: 8,
            old_bytes: vec![0x90; 8],
            new_name: "work".into(),
            call_sites,
        }],
        b"object".to_vec(),
    )
}

fn call(at: u64, to: u64) -> Vec<u8> {
    let mut b = vec![0xe8];
    b.extend(((to as i64 - (at as i64 + 5)) as i32).to_le_bytes());
    b
}

fn header_of(bytes: &[u8]) -> String {
    let hlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    String::from_utf8(bytes[16..16 + hlen].to_vec()).unwrap()
}

#[test]
fn pack_records_direct_and_tail_calls_of_gcc_output() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["callers.c"], "callers", &[]);
    let obj = object(dir.path(), "new_work.c", "new_work.o", &[]);
    let patch = lp_userspace::pack::pack(&exe, &obj, &[]).unwrap();
    let f = &patch.functions[0];
    let callers: Vec<&str> = f.call_sites.iter().map(|c| c.caller.as_str()).collect();
    assert_eq!(callers.len(), 2, "{:?}", f.call_sites);
    assert!(
        callers.iter().any(|c| c.starts_with("main+")),
        "{callers:?}"
    );
    assert!(callers.contains(&"tail+0x6"), "{callers:?}");
    let elf = lp_userspace::elf::Module::open(&exe).unwrap();
    for c in &f.call_sites {
        // The file's bytes, a call or jmp rel32 to work's entry.
        assert_eq!(
            elf.bytes_at(c.vaddr, c.bytes.len() as u64),
            Some(&c.bytes[..])
        );
        let site = lp_core::call_site::decode(c.vaddr, &c.bytes).unwrap();
        assert_eq!(site.target, f.old_vaddr);
    }
    assert_eq!(Patch::from_bytes(&patch.to_bytes()).unwrap(), patch);
}

#[test]
fn version_1_files_are_read_and_keep_their_id() {
    let p = work_patch(Vec::new());
    let v2 = p.to_bytes();
    // Without call sites the file is written as version 1 (older tools read it).
    assert_eq!(u32::from_le_bytes(v2[8..12].try_into().unwrap()), 1);
    let with_sites = work_patch(vec![CallSitePatch {
        vaddr: 0x1000,
        caller: "main+0x0".into(),
        bytes: call(0x1000, 0x1260),
    }]);
    let b = with_sites.to_bytes();
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 2);
    // The same content as version 1 wrote it: the header has no call_sites field.
    let header = header_of(&v2);
    assert!(!header.contains("call_sites"), "{header}");
    let v1 = encode_raw(1, header.as_bytes(), &p.object);
    assert_eq!(Patch::from_bytes(&v1).unwrap(), p);
    // A version 1 header cannot carry call sites.
    let with = work_patch(vec![CallSitePatch {
        vaddr: 0x1000,
        caller: "main+0x0".into(),
        bytes: call(0x1000, 0x1260),
    }]);
    let header = header_of(&with.to_bytes());
    let e = Patch::from_bytes(&encode_raw(1, header.as_bytes(), &with.object)).unwrap_err();
    assert!(matches!(e, PatchFileError::BadHeader(_)), "{e}");
    assert!(e.to_string().contains("call_sites"), "{e}");
}

#[test]
fn call_sites_change_the_id_and_bad_ones_are_refused() {
    let site = |vaddr: u64, bytes: Vec<u8>| CallSitePatch {
        vaddr,
        caller: "main+0x10".into(),
        bytes,
    };
    let good = work_patch(vec![site(0x1000, call(0x1000, 0x1260))]);
    assert_ne!(good.id, work_patch(Vec::new()).id);
    assert_eq!(Patch::from_bytes(&good.to_bytes()).unwrap(), good);
    let cases = [
        (
            vec![site(0x1000, call(0x1000, 0x1264))],
            "not to the function",
        ),
        (
            vec![site(0x1000, vec![0xff, 0x15, 0, 0, 0, 0])],
            "not a call",
        ),
        (vec![site(0x1000, vec![0xe8, 0, 0])], "bytes given"),
        (
            vec![
                site(0x1000, call(0x1000, 0x1260)),
                site(0x1003, call(0x1003, 0x1260)),
            ],
            "overlaps",
        ),
        (vec![site(0x1262, call(0x1262, 0x1260))], "overlaps"),
    ];
    for (sites, why) in cases {
        let bad = work_patch(sites);
        let e = Patch::from_bytes(&bad.to_bytes()).unwrap_err();
        assert!(matches!(e, PatchFileError::Invalid(_)), "{e}");
        assert!(e.to_string().contains(why), "{why}: {e}");
    }
}

//! The patch file format: round trip, and every kind of damage is a clear error, never a panic.

#[path = "elf_support/mod.rs"]
mod support;

use lp_userspace::pack::pack;
use lp_userspace::patchfile::{FunctionPatch, Patch, PatchFileError, MAGIC};

fn sample() -> Patch {
    Patch::new(
        "app".into(),
        vec![0xde, 0xad, 0xbe, 0xef],
        vec![FunctionPatch {
            old_name: "helper@a.c".into(),
            old_vaddr: 0x1139,
            old_size: 4,
            old_bytes: vec![0xf3, 0x0f, 0x1e, 0xfa],
            new_name: "helper_v2".into(),
            call_sites: Vec::new(),
        }],
        b"\x7fELF fake object".to_vec(),
    )
}

#[test]
fn patchfile_round_trip_and_id() {
    let p = sample();
    let bytes = p.to_bytes();
    assert_eq!(&bytes[..8], MAGIC);
    assert_eq!(Patch::from_bytes(&bytes).unwrap(), p);
    let mut q = sample();
    q.functions[0].new_name = "other".into();
    let q = Patch::new(q.target_name, q.target_build_id, q.functions, q.object);
    assert_ne!(q.id, p.id, "the id depends on the content");
}

#[test]
fn patchfile_truncated_at_every_length_is_an_error() {
    let bytes = sample().to_bytes();
    for len in 0..bytes.len() {
        let err = Patch::from_bytes(&bytes[..len]).unwrap_err();
        assert!(
            matches!(
                err,
                PatchFileError::Truncated { .. } | PatchFileError::BadMagic
            ),
            "len {len}: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        Patch::from_bytes(&longer),
        Err(PatchFileError::TrailingBytes(1))
    ));
}

#[test]
fn patchfile_every_flipped_byte_is_detected() {
    let bytes = sample().to_bytes();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x20;
        let err = Patch::from_bytes(&b).expect_err("corruption must be detected");
        assert!(!err.to_string().is_empty());
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
}

#[test]
fn patchfile_bad_magic_version_and_consistent_but_invalid_headers() {
    let mut b = sample().to_bytes();
    b[0] = b'X';
    assert!(matches!(
        Patch::from_bytes(&b),
        Err(PatchFileError::BadMagic)
    ));
    assert!(Patch::from_bytes(b"\x7fELF\x02\x01\x01\x00").is_err());

    // A well-formed file (valid checksum) whose header lies: rebuilt by hand.
    let forge = |version: u32, header: &str, object: &[u8]| {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&(object.len() as u64).to_le_bytes());
        out.extend_from_slice(object);
        use sha2::Digest;
        let sum = sha2::Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    };
    let e = Patch::from_bytes(&forge(3, "{}", b"")).unwrap_err();
    assert!(matches!(e, PatchFileError::UnsupportedVersion(3)), "{e}");
    let e = Patch::from_bytes(&forge(1, "not json", b"")).unwrap_err();
    assert!(matches!(e, PatchFileError::BadHeader(_)), "{e}");
    let good = sample().to_bytes();
    let hlen = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[16..16 + hlen])
        .unwrap()
        .to_string();
    let obj = b"\x7fELF fake object";
    // Sizes that disagree with the expected bytes.
    let e = Patch::from_bytes(&forge(
        1,
        &header.replace("\"old_size\":4", "\"old_size\":5"),
        obj,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("expected bytes"), "{e}");
    // The object swapped for another one.
    let e = Patch::from_bytes(&forge(1, &header, b"other")).unwrap_err();
    assert!(e.to_string().contains("object hash"), "{e}");
    // The id edited.
    let p = sample();
    let e =
        Patch::from_bytes(&forge(1, &header.replace(&p.id, "0000000000000000"), obj)).unwrap_err();
    assert!(e.to_string().contains("does not match its content"), "{e}");
    // No functions.
    let empty = header.replace(
        &header[header.find("[{").unwrap()..=header.find("}]").unwrap() + 1],
        "[]",
    );
    let e = Patch::from_bytes(&forge(1, &empty, obj)).unwrap_err();
    assert!(e.to_string().contains("no function"), "{e}");
}

#[test]
fn patchfile_real_pack_load_rejects_damage() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["dup_a.c", "dup_b.c"], "app", &[]);
    let obj = support::object(dir.path(), "dup_new.c", "new.o", &[]);
    let file = dir.path().join("p.lpatch");
    pack(&exe, &obj, &[]).unwrap().save(&file).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let e = Patch::load(&file).unwrap_err();
    assert!(matches!(e, PatchFileError::ChecksumMismatch), "{e}");
    std::fs::write(&file, &bytes[..n - 10]).unwrap();
    assert!(matches!(
        Patch::load(&file),
        Err(PatchFileError::Truncated { .. })
    ));
    let e = Patch::load(&dir.path().join("missing.lpatch")).unwrap_err();
    assert!(e.to_string().contains("missing.lpatch"), "{e}");
}

//! Symbols of the same name in a live gcc-compiled process: two `static int helper` (in
//! same_name_a.c and same_name_b.c) and a global `helper` (same_name_g.c). A patch replacing
//! `helper@same_name_b.c` whose new code calls the bare `helper` must reach the global one (as
//! the static linker binds it), and `helper@same_name_a.c` a.c's — not the function being
//! replaced (which would recurse forever through its own redirect). Also: a malformed
//! `--replace` is a format error (exit 7), like the library's error kind says.

mod common;
use common::*;

fn same_name(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(
        dir.path(),
        &[
            "same_name_main.c",
            "same_name_a.c",
            "same_name_b.c",
            "same_name_g.c",
        ],
        "same_name",
        &[],
    );
    let obj = object(dir.path(), "new_same_name_b.c", "new_b.o", &[]);
    let (patch, id) = pack(
        dir.path(),
        &exe,
        &obj,
        &["helper@same_name_b.c=helper_b_new"],
        "b.lp",
    );
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "a=2 b=101 g=10001");

    livepatch_ok(&["apply", &pid, patch.to_str().unwrap(), "--mode", mode]);
    target.expect_steady(3, |l| l == "a=2 b=10203 g=10001");
    let st = status_json(&pid);
    assert_eq!(st[0]["patches"][0]["id"], id.as_str());

    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.expect_steady(2, |l| l == "a=2 b=101 g=10001");
}

#[test]
fn e2e_bare_name_reaches_the_global_not_the_replaced_static_stop() {
    same_name("stop");
}

#[test]
fn e2e_bare_name_reaches_the_global_not_the_replaced_static_nonstop() {
    same_name("nonstop");
}

#[test]
fn pack_malformed_replace_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(
        dir.path(),
        &[
            "same_name_main.c",
            "same_name_a.c",
            "same_name_b.c",
            "same_name_g.c",
        ],
        "same_name",
        &[],
    );
    let obj = object(dir.path(), "new_same_name_b.c", "new_b.o", &[]);
    let out = dir.path().join("x.lp");
    for bad in ["helper,0", "helper@", "=helper_b_new", "helper=a@b", ""] {
        let (code, line) = livepatch_err(&[
            "pack",
            "--target",
            exe.to_str().unwrap(),
            "--object",
            obj.to_str().unwrap(),
            "--replace",
            bad,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 7, "--replace `{bad}`: {line}");
        assert!(line.contains("bad --replace"), "{line}");
        assert!(!out.exists(), "no patch file written for `{bad}`");
    }
    // An ambiguous bare name is refused at pack time with the candidates (format error too).
    let (code, line) = livepatch_err(&[
        "pack",
        "--target",
        exe.to_str().unwrap(),
        "--object",
        obj.to_str().unwrap(),
        "--replace",
        "helper=helper_b_new",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 7, "{line}");
    assert!(
        line.contains("ambiguous") && line.contains("same_name_a.c"),
        "{line}"
    );
}

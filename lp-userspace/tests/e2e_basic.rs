//! End to end through the `livepatch` CLI on live processes compiled by the test: a PIE and a
//! non-PIE executable, calls direct and through a function pointer, status from a fresh
//! invocation, revert back to the original output.

mod common;
use common::*;

fn apply_and_revert(flags: &[&str], mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", flags);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(3, |l| l == "direct=42 pointer=42");

    let out = livepatch_ok(&["apply", &pid, patch.to_str().unwrap(), "--mode", mode]);
    assert!(out.contains(&id), "{out}");
    // Every line printed after apply returned comes from the new code, on both call paths.
    let mark = target.count();
    target.wait_line_after(mark, |l| !l.is_empty());
    target.expect_steady(3, |l| l == "direct=1041 pointer=1041");

    // A fresh invocation reads the state from inside the target.
    let st = status_json(&pid);
    assert_eq!(st[0]["patches"][0]["id"], id.as_str());
    assert_eq!(st[0]["patches"][0]["functions"][0]["name"], "compute");
    assert_eq!(st[0]["patches"][0]["mode"], mode);
    let all = livepatch_ok(&["status"]);
    assert!(all.contains(&format!("process {pid} ")), "{all}");

    livepatch_ok(&["revert", &pid, "--mode", mode]);
    target.expect_steady(3, |l| l == "direct=42 pointer=42");
    let st = status_json(&pid);
    assert_eq!(st[0]["patches"].as_array().unwrap().len(), 0);
}

#[test]
fn e2e_pie_stop_mode() {
    apply_and_revert(&["-pie", "-fPIE"], "stop");
}

#[test]
fn e2e_non_pie_stop_mode() {
    apply_and_revert(&["-no-pie", "-fno-PIE"], "stop");
}

#[test]
fn e2e_pie_nonstop_mode() {
    apply_and_revert(&["-pie", "-fPIE"], "nonstop");
}

#[test]
fn e2e_non_pie_nonstop_mode() {
    apply_and_revert(&["-no-pie", "-fno-PIE"], "nonstop");
}

#[test]
fn e2e_new_code_uses_target_statics_new_helper_and_rodata() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let obj = object(dir.path(), "new_statics.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "direct=42 pointer=42");
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.expect_steady(3, |l| l == "direct=7199 pointer=7199");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(2, |l| l == "direct=42 pointer=42");
}

#[test]
fn e2e_multithreaded_all_threads_switch() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["threads.c"], "threads", &["-pthread"]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &["4"]);
    let pid = target.pid();
    for i in 0..=4 {
        target.wait_line(|l| l == format!("thread={i} value=42"));
    }
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.expect_steady(15, |l| l.ends_with("value=1041"));
    let mark = target.count();
    for i in 0..=4 {
        target.wait_line_after(mark, |l| l == format!("thread={i} value=1041"));
    }
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(15, |l| l.ends_with("value=42"));
}

#[test]
fn e2e_shared_library_through_plt_and_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let lib = shared_lib(dir.path(), "libcompute.c", "libcompute.so");
    let d = dir.path().display().to_string();
    let rpath = format!("-Wl,-rpath,{d}");
    let ldir = format!("-L{d}");
    let exe = executable(
        dir.path(),
        &["uses_lib.c"],
        "uses_lib",
        &[&ldir, &rpath, "-lcompute"],
    );
    let obj = object(dir.path(), "new_lib_compute.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &lib, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "plt=42 pointer=42");
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.expect_steady(3, |l| l == "plt=3041 pointer=3041");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(2, |l| l == "plt=42 pointer=42");
}

#[test]
fn e2e_library_loaded_with_dlopen_after_start() {
    let dir = tempfile::tempdir().unwrap();
    let lib = shared_lib(dir.path(), "plugin.c", "libplugin.so");
    let exe = executable(dir.path(), &["dlopener.c"], "dlopener", &[]);
    let obj = object(dir.path(), "new_plugin.c", "new.o", &[]);
    let (patch, _) = pack(dir.path(), &lib, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[lib.to_str().unwrap()]);
    let pid = target.pid();
    target.wait_line(|l| l == "loaded");
    target.expect_steady(2, |l| l == "plugin=42");
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);
    target.expect_steady(3, |l| l == "plugin=4041");
    livepatch_ok(&["revert", &pid]);
    target.expect_steady(2, |l| l == "plugin=42");
}

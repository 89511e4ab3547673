//! `livepatch status` shows, per applied patch, the gdb command that names its new functions
//! (human output and `--json`), and that command works: gdb attached to the live process and
//! given it names the new function at the address status reports.

mod common;
use common::*;
use std::process::Command;

#[test]
fn e2e_status_prints_a_working_gdb_command() {
    let dir = tempfile::tempdir().unwrap();
    let exe = executable(dir.path(), &["simple.c"], "simple", &[]);
    let obj = object(dir.path(), "new_compute.c", "new.o", &["-g"]);
    let (patch, id) = pack(dir.path(), &exe, &obj, &[], "p.lp");
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.wait_line(|l| l.starts_with("ready"));
    livepatch_ok(&["apply", &pid, patch.to_str().unwrap()]);

    let json = status_json(&pid);
    let record = &json[0]["patches"][0];
    assert_eq!(record["id"], id.as_str());
    let cmd = record["gdb_command"]
        .as_str()
        .expect("gdb_command in --json");
    let object = format!("/tmp/livepatch-{pid}-{id}.o");
    assert!(
        cmd.starts_with(&format!("add-symbol-file {object} -s .text 0x")),
        "{cmd}"
    );
    // The same line as in the gdb script, and in the human output under the patch.
    let script = std::fs::read_to_string(format!("/tmp/livepatch-{pid}.gdb")).unwrap();
    assert!(script.lines().any(|l| l == cmd), "{script}");
    let human = livepatch_ok(&["status", &pid]);
    assert!(human.contains(&format!("\n    gdb: {cmd}\n")), "{human}");

    // The printed command, as a user would paste it into gdb.
    let new = record["functions"][0]["new"].as_str().unwrap().to_string();
    let out = Command::new("gdb")
        .args(["-batch", "-nx", "-p", &pid, "-ex", cmd])
        .args(["-ex", &format!("info symbol {new}")])
        .output()
        .expect("run gdb");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("compute in section .text of {object}")),
        "gdb said:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    livepatch_ok(&["revert", &pid]);
    let json = status_json(&pid);
    assert_eq!(json[0]["patches"].as_array().unwrap().len(), 0);
}

//! `livepatch status`: what is applied to a process, read from the state inside it (no ptrace:
//! the state mapping is found in /proc/PID/maps and read through /proc/PID/mem).

use crate::apply::Error;
use crate::state::{self, AppliedPatch, State};
use serde::Serialize;

/// One function of an applied patch, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionStatus {
    /// The old function's name.
    pub name: String,
    /// Old entry address.
    pub old: String,
    /// New entry address.
    pub new: String,
    /// Direct callers retargeted at the new code (their calls skip the redirect).
    pub call_sites: usize,
    /// The trampoline running the original's displaced instructions (the old version's way
    /// in while the patch is not committed, and after a revert for a thread that trapped).
    pub trampoline: String,
    /// The register-preserving thunk calling the new version, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thunk: Option<String>,
    /// Nonstop mode: the dispatch the entry leads to (`testb $1,flag(%rip); jnz new; jmp
    /// trampoline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<String>,
}

/// One applied patch.
#[derive(Debug, Clone, Serialize)]
pub struct PatchStatus {
    /// Patch id.
    pub id: String,
    /// When it was applied (seconds since the epoch).
    pub applied_at: u64,
    /// Target module path.
    pub module: String,
    /// Target build-id.
    pub build_id: String,
    /// Mode used.
    pub mode: String,
    /// Redirected functions.
    pub functions: Vec<FunctionStatus>,
    /// The gdb command naming the new functions (`add-symbol-file` of the saved patch object
    /// with each section at its runtime address); empty when none was saved.
    pub gdb_command: String,
    /// The gdb command naming the trampolines, thunks and dispatches (`add-symbol-file` of a
    /// symbol file livepatch writes for them); absent when none was saved.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gdb_stubs_command: String,
    /// "applying" or "reverting": a livepatch was killed in the middle of that switch of this
    /// patch, whose bytes may be only partly written; the next revert or apply takes it out.
    /// Absent normally.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unfinished: Option<String>,
}

/// The state of one process (the record `livepatch status --json` prints).
#[derive(Debug, Clone, Serialize)]
pub struct ProcessStatus {
    /// The process.
    pub pid: i32,
    /// Its command name.
    pub comm: String,
    /// Applied patches, oldest first.
    pub patches: Vec<PatchStatus>,
}

fn patch_status(p: &AppliedPatch, st: &State) -> PatchStatus {
    PatchStatus {
        unfinished: st
            .unfinished
            .as_ref()
            .filter(|u| u.id == p.id)
            .map(|u| u.operation.to_string()),
        id: p.id.clone(),
        applied_at: p.applied_at,
        module: p.module.clone(),
        build_id: p.build_id.clone(),
        mode: p.mode.clone(),
        functions: p
            .functions
            .iter()
            .map(|f| FunctionStatus {
                name: f.name.clone(),
                old: format!("{:#x}", f.old),
                new: format!("{:#x}", f.new),
                call_sites: f.direct_callers(),
                trampoline: format!("{:#x}", f.trampoline),
                thunk: (f.via != f.new).then(|| format!("{:#x}", f.via)),
                dispatch: f.dispatch.map(|d| format!("{d:#x}")),
            })
            .collect(),
        gdb_command: p
            .debug
            .as_ref()
            .map(|d| d.gdb_command.clone())
            .unwrap_or_default(),
        gdb_stubs_command: p
            .debug
            .as_ref()
            .map(|d| d.gdb_stubs_command.clone())
            .unwrap_or_default(),
    }
}

/// Status of `pid`, or of every process that has livepatch state.
pub fn status(pid: Option<i32>) -> Result<Vec<ProcessStatus>, Error> {
    let one = |pid: i32| -> Result<ProcessStatus, Error> {
        let st = state::read(pid)?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(ProcessStatus {
            pid,
            comm,
            patches: st.patches.iter().map(|p| patch_status(p, &st)).collect(),
        })
    };
    match pid {
        Some(pid) => Ok(vec![one(pid)?]),
        None => Ok(state::processes_with_state()
            .into_iter()
            .filter_map(|p| one(p).ok())
            .filter(|s| !s.patches.is_empty())
            .collect()),
    }
}

/// Human-readable rendering of a status list.
pub fn render(list: &[ProcessStatus]) -> String {
    let mut out = String::new();
    if list.is_empty() {
        out.push_str("no process has livepatch patches applied\n");
    }
    for p in list {
        out.push_str(&format!("process {} ({})", p.pid, p.comm));
        if p.patches.is_empty() {
            out.push_str(": no patches applied\n");
            continue;
        }
        out.push_str(&format!(": {} patch(es)\n", p.patches.len()));
        for pa in &p.patches {
            out.push_str(&format!(
                "  patch {}  applied {}  mode {}\n    module {} (build-id {})\n",
                pa.id,
                fmt_time(pa.applied_at),
                pa.mode,
                pa.module,
                pa.build_id
            ));
            for f in &pa.functions {
                out.push_str(&format!("    {} {} -> {}", f.name, f.old, f.new));
                match f.call_sites {
                    0 => out.push('\n'),
                    1 => out.push_str(" (1 direct caller rewritten)\n"),
                    n => out.push_str(&format!(" ({n} direct callers rewritten)\n")),
                }
            }
            if !pa.gdb_command.is_empty() {
                out.push_str(&format!("    gdb: {}\n", pa.gdb_command));
            }
            if !pa.gdb_stubs_command.is_empty() {
                out.push_str(&format!("    gdb: {}\n", pa.gdb_stubs_command));
            }
            if let Some(op) = &pa.unfinished {
                out.push_str(&format!(
                    "    UNFINISHED: a livepatch was killed while {op} this patch; `livepatch revert {}` takes it out\n",
                    p.pid
                ));
            }
        }
    }
    out
}

fn fmt_time(secs: u64) -> String {
    // UTC, without pulling in a date crate: days since the epoch → civil date.
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(gdb_command: &str) -> Vec<ProcessStatus> {
        vec![ProcessStatus {
            pid: 42,
            comm: "svc".into(),
            patches: vec![PatchStatus {
                id: "abc".into(),
                applied_at: 0,
                module: "/usr/bin/svc".into(),
                build_id: "00".into(),
                mode: "stop".into(),
                functions: vec![FunctionStatus {
                    name: "f".into(),
                    old: "0x1000".into(),
                    new: "0x2000".into(),
                    call_sites: 0,
                    trampoline: "0x3000".into(),
                    thunk: None,
                    dispatch: None,
                }],
                gdb_command: gdb_command.into(),
                gdb_stubs_command: String::new(),
                unfinished: None,
            }],
        }]
    }

    #[test]
    fn an_unfinished_switch_is_shown_with_what_takes_it_out() {
        let mut list = one("");
        assert!(!render(&list).contains("UNFINISHED"));
        assert!(serde_json::to_value(&list).unwrap()[0]["patches"][0]
            .get("unfinished")
            .is_none());
        list[0].patches[0].unfinished = Some("applying".into());
        assert!(render(&list).contains(
            "UNFINISHED: a livepatch was killed while applying this patch; `livepatch revert 42` takes it out"
        ));
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json[0]["patches"][0]["unfinished"], "applying");
    }

    #[test]
    fn the_gdb_command_is_shown_per_patch_and_in_json() {
        let cmd = "add-symbol-file /tmp/livepatch-42-abc.o -s .text 0x2000";
        let text = render(&one(cmd));
        assert!(
            text.contains(&format!("    f 0x1000 -> 0x2000\n    gdb: {cmd}\n")),
            "{text}"
        );
        let json = serde_json::to_value(one(cmd)).unwrap();
        assert_eq!(json[0]["patches"][0]["gdb_command"], cmd);
        // None saved (an older state, or the object could not be written): no gdb line.
        assert!(!render(&one("")).contains("gdb:"));
        // The generated code's symbol file: a second line, and its own key.
        let stubs = "add-symbol-file /tmp/livepatch-42-abc-stubs.o -s .livepatch 0x3000";
        let mut list = one(cmd);
        list[0].patches[0].gdb_stubs_command = stubs.into();
        assert!(render(&list).contains(&format!("    gdb: {cmd}\n    gdb: {stubs}\n")));
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json[0]["patches"][0]["gdb_stubs_command"], stubs);
        assert!(serde_json::to_value(one(cmd)).unwrap()[0]["patches"][0]
            .get("gdb_stubs_command")
            .is_none());
    }

    /// The generated code's addresses are in the JSON (what perf and gdb name), the thunk and
    /// the dispatch only when there are some.
    #[test]
    fn the_generated_code_is_listed_per_function() {
        let mut list = one("");
        let f = &serde_json::to_value(&list).unwrap()[0]["patches"][0]["functions"][0];
        assert_eq!(f["trampoline"], "0x3000");
        assert!(f.get("thunk").is_none() && f.get("dispatch").is_none());
        list[0].patches[0].functions[0].thunk = Some("0x3010".into());
        list[0].patches[0].functions[0].dispatch = Some("0x3040".into());
        let f = &serde_json::to_value(&list).unwrap()[0]["patches"][0]["functions"][0];
        assert_eq!(
            (&f["thunk"], &f["dispatch"]),
            (&"0x3010".into(), &"0x3040".into())
        );
    }

    #[test]
    fn rewritten_callers_are_counted() {
        let mut list = one("");
        assert!(render(&list).contains("    f 0x1000 -> 0x2000\n"));
        list[0].patches[0].functions[0].call_sites = 1;
        assert!(render(&list).contains("    f 0x1000 -> 0x2000 (1 direct caller rewritten)\n"));
        list[0].patches[0].functions[0].call_sites = 3;
        assert!(render(&list).contains("(3 direct callers rewritten)\n"));
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json[0]["patches"][0]["functions"][0]["call_sites"], 3);
    }
}

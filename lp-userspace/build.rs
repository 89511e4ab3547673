//! Passes the iced-x86 that Cargo.lock resolves (its version and checksum) to the compiler as
//! `LP_ICED_X86_LOCKED`: the trap area's name hashes it with the sources of the area's code,
//! since iced-x86's encoder turns those sources into the code's bytes
//! (src/apply/switch/nonstop/area_name.rs; review 9, L4). Free at run time.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    // The workspace's lock file (the nearest one up from this package).
    let lock = Path::new(&dir)
        .ancestors()
        .map(|d| d.join("Cargo.lock"))
        .find(|p| p.is_file());
    let locked = lock.and_then(|p| {
        println!("cargo:rerun-if-changed={}", p.display());
        iced_entries(&std::fs::read_to_string(p).ok()?)
    });
    // Without a lock file (not built from this workspace) the name covers the sources only.
    println!(
        "cargo:rustc-env=LP_ICED_X86_LOCKED={}",
        locked.as_deref().unwrap_or("unknown")
    );
}

/// "VERSION CHECKSUM" of every iced-x86 package in a Cargo.lock text (space-separated), None
/// when it has none.
fn iced_entries(lock: &str) -> Option<String> {
    let value = |block: &str, key: &str| {
        block.lines().find_map(|l| {
            let v = l.strip_prefix(key)?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
    };
    let entries: Vec<String> = lock
        .split("[[package]]")
        .filter(|b| value(b, "name").as_deref() == Some("iced-x86"))
        .map(|b| {
            let version = value(b, "version").unwrap_or_default();
            match value(b, "checksum").or_else(|| value(b, "source")) {
                Some(c) => format!("{version} {c}"),
                None => version,
            }
        })
        .collect();
    (!entries.is_empty()).then(|| entries.join(" "))
}

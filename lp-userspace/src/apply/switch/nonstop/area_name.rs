//! The name of this build's trap area: the layout's name, then a hash of the sources of the
//! code the area holds (`livepatch-trap.4.1a2b3c4d`).
//!
//! Why the hash. An area is made once per process and kept for its life, and its code page is
//! checked against the code this build generates before it is used again. An area made by
//! another build of livepatch — the tool upgraded between an apply and its revert, weeks apart —
//! holds other code under the same layout name, and was taken for one "changed by someone
//! else": nonstop mode was refused for that process for good (review 7, finding 7). With the
//! code's (sources') hash in the name, each build finds its own area, or makes one beside the others.
//!
//! Areas of the same layout made by other builds are still looked at before anything is
//! written: a sync agent a killed tool of that build left may hold a claimed write (see
//! `quiet_orphaned_agent`). The layout (the data page's words, where the agent's page is) is
//! the same for every name under [`LAYOUT`]; the agent's code may not be.

use std::sync::OnceLock;

/// The layout's name: an area of an earlier layout (`livepatch-trap`, without the threads'
/// trap records and the sync agent) is left alone, whatever its code, and one of this layout
/// made beside it. If the earlier handler (another build's or layout's) is still the SIGTRAP
/// action (its switch could not restore the action), ours simply chains to it like to any
/// action of the process.
pub(super) const LAYOUT: &str = "livepatch-trap.4";

/// The hash in this build's name: of the sources that generate the area's code (the handler
/// and its layout, the sync agent, the page's assembly) and of the iced-x86 whose encoder
/// turns them into bytes (its version and checksum as Cargo.lock resolves them, passed by the
/// build script), taken when the tool is compiled — free at run time (the code itself takes
/// ~75 µs to generate once more) and different whenever our code may be. (Sources that differ
/// only in comments, or another iced-x86 that encodes them the same, give another name too:
/// one area more in a process that two such builds switch, nothing worse. Without the
/// iced-x86 in the hash, a Cargo.lock bump gave the same name to other bytes: that area was
/// refused as changed — review 9, L4.)
const CODE_HASH: u32 = code_hash(ICED_LOCKED.as_bytes());

/// The iced-x86 this build uses, as Cargo.lock resolves it ("VERSION CHECKSUM"; "unknown"
/// when the build found no lock file).
const ICED_LOCKED: &str = env!("LP_ICED_X86_LOCKED");

/// The hash of the area's code sources with `iced` (the encoder, see [`CODE_HASH`]).
const fn code_hash(iced: &[u8]) -> u32 {
    fnv1a(
        iced,
        fnv1a(
            include_bytes!("../nonstop.rs"), // the page's assembly (`generate`)
            fnv1a(
                include_bytes!("../trap_handler.rs"),
                fnv1a(include_bytes!("sync_agent.rs"), 0x811c_9dc5),
            ),
        ),
    )
}

/// This build's area name: [`LAYOUT`], a dot, and [`CODE_HASH`] in hex.
pub(super) fn own() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| format!("{LAYOUT}.{CODE_HASH:08x}"))
}

/// Whether memfd `name` is an area of this layout, of this build or another one.
pub(super) fn is_layout(name: &str) -> bool {
    name == LAYOUT
        || name
            .strip_prefix(LAYOUT)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The name of the memfd a /proc/PID/maps line maps (`/memfd:NAME (deleted)`), if any.
pub(super) fn memfd_of(line: &str) -> Option<&str> {
    let (_, name) = line.split_once("/memfd:")?;
    Some(name.trim_end().trim_end_matches(" (deleted)"))
}

/// FNV-1a over `bytes`, from `hash` (a const fn: [`CODE_HASH`] is computed by the compiler).
const fn fnv1a(bytes: &[u8], mut hash: u32) -> u32 {
    let mut i = 0;
    while i < bytes.len() {
        hash = (hash ^ bytes[i] as u32).wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_the_layout_and_the_code_hash() {
        let name = own();
        assert!(name.starts_with("livepatch-trap.4."), "{name}");
        assert!(is_layout(name));
        // The same build gives the same name; the hash is of the sources, not of nothing.
        assert_eq!(own(), name);
        assert_ne!(
            &name[LAYOUT.len() + 1..],
            format!("{:08x}", fnv1a(&[], 0x811c_9dc5))
        );
    }

    #[test]
    fn the_hash_covers_the_iced_x86_cargo_lock_resolves() {
        // The version the workspace's lock file resolves, read here on its own.
        let lock = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"));
        let block = lock
            .split("[[package]]")
            .find(|b| b.contains("name = \"iced-x86\"\n"));
        let version = block
            .and_then(|b| b.lines().find_map(|l| l.strip_prefix("version = ")))
            .map(|v| v.trim_matches('"'))
            .expect("iced-x86 in Cargo.lock");
        assert!(
            ICED_LOCKED.starts_with(&format!("{version} ")),
            "{ICED_LOCKED} is not iced-x86 {version}"
        );
        // Another iced-x86 (a Cargo.lock bump), another name; this build's name has its own.
        let bumped = ICED_LOCKED.replacen(version, "1.99.0", 1);
        assert_ne!(code_hash(bumped.as_bytes()), CODE_HASH);
        assert_ne!(code_hash(b"unknown"), CODE_HASH);
        assert!(own().ends_with(&format!(".{:08x}", code_hash(ICED_LOCKED.as_bytes()))));
    }

    #[test]
    fn layout_names_are_told_apart() {
        assert!(is_layout("livepatch-trap.4"));
        assert!(is_layout("livepatch-trap.4.0123abcd"));
        assert!(!is_layout("livepatch-trap"));
        assert!(!is_layout("livepatch-trap.5.0123abcd"));
        assert!(!is_layout("livepatch-trap.4.xyz"));
        assert!(!is_layout("livepatch-trap.40"));
        assert_eq!(
            memfd_of("7f00-7f01 r-xs 00000000 00:01 42 /memfd:livepatch-trap.4.0123abcd (deleted)"),
            Some("livepatch-trap.4.0123abcd")
        );
        assert_eq!(
            memfd_of("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/libc.so.6"),
            None
        );
    }
}

//! Arbitrary bytes through the patch file reader, and through the parts a loaded patch feeds
//! next (the ELF reader and the linker's layout): nothing may panic.
//!
//! Each input is used twice: as a whole file (reaches the magic/length/checksum checks), and
//! split into a header and an object wrapped in a valid envelope (reaches the JSON header checks
//! and, for well-formed headers, the object). The first byte chooses the split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lp_userspace::elf::Module;
use lp_userspace::link::Layout;
use lp_userspace::patchfile::{encode_raw, Patch, VERSION};

/// Links layouts up to 1 MiB (the linker accepts up to `MAX_IMAGE`; zeroing hundreds of MiB
/// per input would only slow the fuzzer down).
fn link_small(layout: &Layout) {
    if layout.size() <= 1 << 20 {
        let _ = layout.link(0x7000_0000_0000, &|_| Some(0x7000_1000_0000));
        let _ = layout.link(0x1000, &|_| None);
    }
}

fn exercise(patch: &Patch) {
    // What apply does with a loaded patch before touching a process.
    let _ = patch.to_bytes();
    if let Ok(layout) = Layout::of(&patch.object) {
        let _ = layout.undefined_symbols();
        link_small(&layout);
    }
    if let Ok(m) = Module::parse("fuzz", patch.object.clone()) {
        for f in &patch.functions {
            let _ = m.lookup(&f.old_name);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Patch::from_bytes(data) {
        // Whatever parses survives a round trip unchanged.
        assert_eq!(Patch::from_bytes(&p.to_bytes()).ok().as_ref(), Some(&p));
        exercise(&p);
    }
    if let Some((&split, rest)) = data.split_first() {
        let at = (split as usize * rest.len()) / 255;
        let (header, object) = rest.split_at(at.min(rest.len()));
        if let Ok(p) = Patch::from_bytes(&encode_raw(VERSION, header, object)) {
            exercise(&p);
        }
        // Objects alone, as the linker and ELF reader see them.
        if let Ok(l) = Layout::of(rest) {
            link_small(&l);
        }
        let _ = Module::parse("fuzz", rest.to_vec());
    }
});

//! Shared by the gcc-driven tests: compile C or assembly with the real gcc into a temporary
//! directory, then read functions (bytes, address, size) out of the ELF with goblin, and get an
//! independent list of instruction boundaries from binutils' objdump.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;

use goblin::elf::Elf;

pub mod live;

/// A compiled file kept alive with its temporary directory.
pub struct Compiled {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// A function read from an ELF file.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    /// st_value: a vaddr in a shared object, a section offset in a relocatable object.
    pub value: u64,
    pub size: usize,
    pub code: Vec<u8>,
}

/// Compile `source` (C, or assembly when `file_name` ends in `.s`) with gcc and `flags`.
/// `-c` in `flags` gives a relocatable object, `-shared -fPIC` a shared object.
pub fn gcc(file_name: &str, source: &str, flags: &[&str]) -> Compiled {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join(file_name);
    std::fs::write(&src, source).expect("write source");
    let out = dir.path().join("out.bin");
    let status = Command::new("gcc")
        .args(flags)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc {flags:?} {file_name} failed");
    let bytes = std::fs::read(&out).expect("read gcc output");
    Compiled {
        _dir: dir,
        path: out,
        bytes,
    }
}

/// The function symbol `name` with its bytes (st_size of them) from the file.
pub fn function(elf_bytes: &[u8], name: &str) -> Function {
    let elf = Elf::parse(elf_bytes).expect("parse ELF");
    let sym = elf
        .syms
        .iter()
        .find(|s| s.is_function() && elf.strtab.get_at(s.st_name) == Some(name))
        .unwrap_or_else(|| panic!("no function symbol {name}"));
    let sh = &elf.section_headers[sym.st_shndx];
    // in a .o, st_value is relative to the section (sh_addr 0); in a .so it is a vaddr
    let off = (sh.sh_offset + (sym.st_value - sh.sh_addr)) as usize;
    let size = sym.st_size as usize;
    Function {
        name: name.to_string(),
        value: sym.st_value,
        size,
        code: elf_bytes[off..off + size].to_vec(),
    }
}

/// Offsets (from the function's start) of every instruction objdump sees in `name`: an oracle
/// independent of iced-x86.
pub fn objdump_boundaries(path: &Path, name: &str) -> Vec<u64> {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-w"])
        .arg(path)
        .output()
        .expect("run objdump");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut start = None;
    let mut offsets = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with(&format!("<{name}>:")) {
            start = Some(u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap());
            continue;
        }
        let Some(s) = start else { continue };
        if line.is_empty() {
            break; // end of this symbol's block
        }
        let Some((addr, rest)) = line.split_once(':') else {
            continue;
        };
        if rest.trim().is_empty() {
            continue;
        }
        if let Ok(a) = u64::from_str_radix(addr.trim(), 16) {
            offsets.push(a - s);
        }
    }
    assert!(
        !offsets.is_empty(),
        "objdump shows no instructions for {name}"
    );
    offsets
}

/// The displaced length objdump's boundaries imply for a jump of `jump_len` at `patch_off` in a
/// function of `size` bytes.
pub fn expected_displaced(boundaries: &[u64], size: usize, patch_off: u64, jump_len: u64) -> u64 {
    boundaries
        .iter()
        .copied()
        .filter(|&b| b < size as u64) // objdump shows the alignment padding too
        .chain(std::iter::once(size as u64))
        .find(|&b| b >= patch_off + jump_len)
        .map(|b| b - patch_off)
        .expect("function long enough")
}

/// Compile several sources (C and/or `.s`) together into one output with `flags`.
pub fn gcc_files(files: &[(&str, &str)], flags: &[&str]) -> Compiled {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new("gcc");
    cmd.args(flags);
    for (name, source) in files {
        let src = dir.path().join(name);
        std::fs::write(&src, source).expect("write source");
        cmd.arg(&src);
    }
    let out = dir.path().join("out.bin");
    let status = cmd.arg("-o").arg(&out).status().expect("run gcc");
    assert!(status.success(), "gcc {flags:?} failed");
    let bytes = std::fs::read(&out).expect("read gcc output");
    Compiled {
        _dir: dir,
        path: out,
        bytes,
    }
}

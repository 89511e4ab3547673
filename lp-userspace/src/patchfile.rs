//! The patch file: what `livepatch pack` writes and `livepatch apply` reads.
//!
//! Layout (all integers little-endian; described for users in docs/patch-format.md):
//! ```text
//! 0        8 bytes   magic "LPPATCH\0"
//! 8        u32       format version (2; version 1 files, without call sites, are read too)
//! 12       u32       H = header length
//! 16       H bytes   header: UTF-8 JSON (see `Header`)
//! 16+H     u64       N = object length
//! 24+H     N bytes   the relocatable object (NEW.o) as it was packed
//! 24+H+N   32 bytes  SHA-256 of every byte before it
//! ```
//! The patch id is derived from the content (target, functions, object), so the same patch packed
//! twice has the same id and `apply` can refuse it a second time.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::elf::hex;

/// The first 8 bytes of every patch file.
pub const MAGIC: &[u8; 8] = b"LPPATCH\0";
/// The format version this code writes (it reads [`OLDEST_VERSION`] to this one).
pub const VERSION: u32 = 2;
/// The oldest format version still read: version 1 had no `call_sites`.
pub const OLDEST_VERSION: u32 = 1;
/// Largest header accepted (a header describes at most thousands of functions).
const MAX_HEADER: usize = 64 << 20;
/// Largest object accepted.
const MAX_OBJECT: u64 = 1 << 30;
const CHECKSUM_LEN: usize = 32;

/// Errors reading or writing a patch file. Each names the problem in one line.
#[derive(Debug, Error)]
pub enum PatchFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Wrong magic: not a patch file.
    #[error("not a livepatch patch file (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("unsupported patch format version {0} (this livepatch reads versions {OLDEST_VERSION} to {VERSION})")]
    UnsupportedVersion(u32),
    /// The file ends early.
    #[error("truncated patch file: {what} needs {need} bytes, only {have} left")]
    Truncated {
        /// The part being read.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// Bytes after the checksum.
    #[error("corrupted patch file: {0} unexpected bytes after the checksum")]
    TrailingBytes(usize),
    /// The checksum does not match the content.
    #[error("corrupted patch file: checksum mismatch")]
    ChecksumMismatch,
    /// The JSON header does not parse.
    #[error("corrupted patch file: bad header: {0}")]
    BadHeader(String),
    /// The header parses but is inconsistent.
    #[error("invalid patch: {0}")]
    Invalid(String),
}

/// One function the patch replaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionPatch {
    /// The old function, as an unambiguous specification in the target module
    /// (`name`, `name@file.c` or `name,N`; see [`crate::elf::Module::lookup`]).
    pub old_name: String,
    /// Its address in the target file (add the module's load bias for the runtime address).
    pub old_vaddr: u64,
    /// Its size (`st_size`).
    pub old_size: u64,
    /// All `old_size` bytes the function has in the file: what must be in memory before any write.
    #[serde(with = "hex_bytes")]
    pub old_bytes: Vec<u8>,
    /// The new function's symbol in the object.
    pub new_name: String,
    /// Direct branches to the old function's entry in the target's code (format version 2):
    /// apply retargets them at the new code. Left out of the JSON when empty, so a patch without
    /// any has the id it had in version 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub call_sites: Vec<CallSitePatch>,
}

/// A caller's direct `call`/`jmp`/`jcc rel32` to a replaced function, as found by `pack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallSitePatch {
    /// The instruction's address in the target file (add the load bias at runtime).
    pub vaddr: u64,
    /// The caller, for messages: `function+0xOFFSET`.
    pub caller: String,
    /// The instruction's bytes in the file (5 or 6): what must be in memory before any write.
    #[serde(with = "hex_bytes")]
    pub bytes: Vec<u8>,
}

/// A patch: the new code and what it replaces, for one target module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// Content hash (16 lowercase hex digits): equal content, equal id.
    pub id: String,
    /// The target module's file name (`app`, `libfoo.so.1`).
    pub target_name: String,
    /// The target module's GNU build-id.
    pub target_build_id: Vec<u8>,
    /// The functions replaced.
    pub functions: Vec<FunctionPatch>,
    /// The relocatable object holding the new functions.
    pub object: Vec<u8>,
}

/// The JSON header as stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    id: String,
    target_name: String,
    target_build_id: String,
    functions: Vec<FunctionPatch>,
    object_sha256: String,
}

/// Fields that make up the id, hashed in this order.
#[derive(Serialize)]
struct IdInput<'a> {
    target_name: &'a str,
    target_build_id: String,
    functions: &'a [FunctionPatch],
    object_sha256: String,
}

impl Patch {
    /// A patch with its id computed from the content.
    pub fn new(
        target_name: String,
        target_build_id: Vec<u8>,
        functions: Vec<FunctionPatch>,
        object: Vec<u8>,
    ) -> Patch {
        let mut p = Patch {
            id: String::new(),
            target_name,
            target_build_id,
            functions,
            object,
        };
        p.id = p.compute_id();
        p
    }

    fn compute_id(&self) -> String {
        let input = IdInput {
            target_name: &self.target_name,
            target_build_id: hex(&self.target_build_id),
            functions: &self.functions,
            object_sha256: hex(&Sha256::digest(&self.object)),
        };
        // Serializing plain structs of strings and numbers cannot fail.
        let json = serde_json::to_vec(&input).unwrap_or_default();
        hex(&Sha256::digest(json)[..8])
    }

    /// The target build-id as hex.
    pub fn target_build_id_hex(&self) -> String {
        hex(&self.target_build_id)
    }

    /// The patch file bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = Header {
            id: self.id.clone(),
            target_name: self.target_name.clone(),
            target_build_id: hex(&self.target_build_id),
            functions: self.functions.clone(),
            object_sha256: hex(&Sha256::digest(&self.object)),
        };
        let json = serde_json::to_vec(&header).unwrap_or_default();
        // Without call sites the header is exactly version 1's: older tools keep reading it.
        let version = if self.functions.iter().any(|f| !f.call_sites.is_empty()) {
            VERSION
        } else {
            OLDEST_VERSION
        };
        encode_raw(version, &json, &self.object)
    }

    /// Parses patch file bytes. Never panics: any malformed input is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Patch, PatchFileError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.take(8, "magic")?;
        if magic != MAGIC {
            return Err(PatchFileError::BadMagic);
        }
        let version = r.u32("version")?;
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(PatchFileError::UnsupportedVersion(version));
        }
        let header_len = r.u32("header length")? as usize;
        if header_len > MAX_HEADER {
            return Err(PatchFileError::Invalid(format!(
                "header length {header_len} too large"
            )));
        }
        let header_bytes = r.take(header_len, "header")?;
        let object_len = r.u64("object length")?;
        if object_len > MAX_OBJECT {
            return Err(PatchFileError::Invalid(format!(
                "object length {object_len} too large"
            )));
        }
        let object = r.take(object_len as usize, "object")?;
        let covered = r.pos;
        let sum = r.take(CHECKSUM_LEN, "checksum")?;
        if r.pos != bytes.len() {
            return Err(PatchFileError::TrailingBytes(bytes.len() - r.pos));
        }
        if Sha256::digest(&bytes[..covered]).as_slice() != sum {
            return Err(PatchFileError::ChecksumMismatch);
        }
        let header: Header = serde_json::from_slice(header_bytes)
            .map_err(|e| PatchFileError::BadHeader(e.to_string()))?;
        let invalid = |m: String| Err(PatchFileError::Invalid(m));
        if hex(&Sha256::digest(object)) != header.object_sha256 {
            return invalid("object hash does not match the header".into());
        }
        let Some(build_id) = unhex(&header.target_build_id) else {
            return invalid(format!(
                "target build-id `{}` is not hex",
                header.target_build_id
            ));
        };
        if build_id.is_empty() {
            return invalid("empty target build-id".into());
        }
        if header.target_name.is_empty() {
            return invalid("empty target name".into());
        }
        if header.functions.is_empty() {
            return invalid("the patch replaces no function".into());
        }
        for f in &header.functions {
            if f.old_name.is_empty() || f.new_name.is_empty() {
                return invalid("a function with an empty name".into());
            }
            if f.old_bytes.len() as u64 != f.old_size || f.old_size == 0 {
                return invalid(format!(
                    "function `{}`: {} expected bytes for size {}",
                    f.old_name,
                    f.old_bytes.len(),
                    f.old_size
                ));
            }
            if version < 2 && !f.call_sites.is_empty() {
                return Err(PatchFileError::BadHeader(format!(
                    "unknown field `call_sites` in a version {version} header"
                )));
            }
        }
        check_call_sites(&header.functions).map_err(PatchFileError::Invalid)?;
        let patch = Patch {
            id: header.id,
            target_name: header.target_name,
            target_build_id: build_id,
            functions: header.functions,
            object: object.to_vec(),
        };
        if patch.compute_id() != patch.id {
            return invalid(format!("patch id {} does not match its content", patch.id));
        }
        Ok(patch)
    }

    /// Reads a patch file.
    pub fn load(path: &Path) -> Result<Patch, PatchFileError> {
        let bytes = std::fs::read(path).map_err(|source| PatchFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Patch::from_bytes(&bytes)
    }

    /// Writes a patch file.
    pub fn save(&self, path: &Path) -> Result<(), PatchFileError> {
        std::fs::write(path, self.to_bytes()).map_err(|source| PatchFileError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

/// The container around an arbitrary header and object, with a valid checksum: what
/// [`Patch::to_bytes`] writes. Public for tests and fuzzing, which need well-formed envelopes
/// around content that is not.
pub fn encode_raw(version: u32, header: &[u8], object: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + header.len() + object.len() + CHECKSUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(&(object.len() as u64).to_le_bytes());
    out.extend_from_slice(object);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Each call site must be one direct rel32 branch to its function's old entry, and call sites
/// may overlap neither each other nor any replaced function (whose bytes the redirect and the
/// verification own).
fn check_call_sites(functions: &[FunctionPatch]) -> Result<(), String> {
    let mut spans: Vec<(u64, u64, String)> = functions
        .iter()
        .map(|f| {
            let end = f.old_vaddr.saturating_add(f.old_size);
            (f.old_vaddr, end, format!("function `{}`", f.old_name))
        })
        .collect();
    for f in functions {
        for c in &f.call_sites {
            let site = lp_core::call_site::decode(c.vaddr, &c.bytes)
                .map_err(|e| format!("function `{}`: call site {}: {e}", f.old_name, c.caller))?;
            if site.target != f.old_vaddr {
                return Err(format!(
                    "function `{}`: call site {} at {:#x} goes to {:#x}, not to the function",
                    f.old_name, c.caller, c.vaddr, site.target
                ));
            }
            let end = c
                .vaddr
                .checked_add(c.bytes.len() as u64)
                .ok_or_else(|| format!("call site at {:#x} wraps around", c.vaddr))?;
            spans.push((
                c.vaddr,
                end,
                format!("call site {} at {:#x}", c.caller, c.vaddr),
            ));
        }
    }
    spans.sort_by_key(|s| (s.0, s.1));
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!("{} overlaps {}", w[1].2, w[0].2));
        }
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PatchFileError> {
        let have = self.bytes.len() - self.pos;
        if n > have {
            return Err(PatchFileError::Truncated {
                what,
                need: n as u64,
                have: have as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, PatchFileError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, PatchFileError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Parses lowercase or uppercase hex; `None` if odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|c| {
            let d = |x: u8| (x as char).to_digit(16);
            Some((d(c[0])? * 16 + d(c[1])?) as u8)
        })
        .collect()
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::elf::hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::unhex(&s).ok_or_else(|| serde::de::Error::custom("expected hex bytes"))
    }
}

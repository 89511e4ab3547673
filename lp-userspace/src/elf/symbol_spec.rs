//! The symbol specifications users and patch files write (`name`, `name@file.c`, `name,N`; see
//! the module documentation of [`crate::elf`]) and how a recorded source file name matches one.

use super::LookupError;

/// A parsed symbol specification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SymbolSpec<'a> {
    /// `name`.
    Name(&'a str),
    /// `name@file`.
    InFile(&'a str, &'a str),
    /// `name,N` (1-based).
    Position(&'a str, usize),
}

impl<'a> SymbolSpec<'a> {
    /// Parses `name`, `name@file.c` or `name,N`.
    pub fn parse(spec: &'a str) -> Result<Self, LookupError> {
        let bad = || LookupError::BadSpec(spec.to_string());
        if let Some((name, pos)) = spec.rsplit_once(',') {
            match pos.trim().parse::<usize>() {
                Ok(n) if n > 0 && !name.is_empty() && !name.contains('@') => {
                    return Ok(SymbolSpec::Position(name, n));
                }
                // `name@dir,with,commas/file.c` is a file name, not a position.
                Err(_) if spec.contains('@') => {}
                _ => return Err(bad()),
            }
        }
        if let Some((name, file)) = spec.split_once('@') {
            if name.is_empty() || file.is_empty() {
                return Err(bad());
            }
            return Ok(SymbolSpec::InFile(name, file));
        }
        if spec.is_empty() {
            return Err(bad());
        }
        Ok(SymbolSpec::Name(spec))
    }

    /// The symbol name part.
    pub fn name(&self) -> &'a str {
        match *self {
            SymbolSpec::Name(n) | SymbolSpec::InFile(n, _) | SymbolSpec::Position(n, _) => n,
        }
    }
}

/// `file` as recorded in STT_FILE matches what the user wrote: equal, or equal basenames.
pub(super) fn file_matches(recorded: &str, wanted: &str) -> bool {
    if recorded == wanted {
        return true;
    }
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    base(recorded) == base(wanted) && !wanted.contains('/')
}

//! `livepatch demo` (being written).
use crate::apply::Error;

/// Runs the demo.
pub fn run() -> Result<(), Error> {
    Err(Error::Other("demo not built yet".into()))
}

//! TODO: clobber (being written).

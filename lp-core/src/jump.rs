//! TODO: jump (being written).

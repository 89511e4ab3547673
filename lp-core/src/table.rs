//! TODO: table (being written).

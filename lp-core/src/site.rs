//! TODO: site (being written).

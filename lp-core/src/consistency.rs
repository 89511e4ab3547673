//! TODO: consistency (being written).

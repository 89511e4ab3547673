//! TODO: plan (being written).

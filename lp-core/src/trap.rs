//! TODO: trap (being written).

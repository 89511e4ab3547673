//! TODO: trampoline (being written).

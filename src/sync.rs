//! The primitives behind the crate's state machines (the request phase word,
//! the request and registry locks), swapped for loom's when the crate is
//! model-checked with `RUSTFLAGS="--cfg tower_background_loom"` (see
//! `loom/` in the repository).

#[cfg(not(tower_background_loom))]
pub(crate) use std::sync::{
    atomic::{AtomicU32, AtomicUsize},
    Mutex, MutexGuard,
};

#[cfg(tower_background_loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicU32, AtomicUsize},
    Mutex, MutexGuard,
};

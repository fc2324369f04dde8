//! The primitives behind the crate's state machines (the request phase word,
//! the registry's counters, the request and waker locks), swapped for loom's
//! when the crate is model-checked with
//! `RUSTFLAGS="--cfg tower_background_loom"` (see `loom/` in the repository).

#[cfg(not(tower_background_loom))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicIsize, AtomicU32, AtomicU64, AtomicUsize},
    Mutex, MutexGuard,
};

#[cfg(tower_background_loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicIsize, AtomicU32, AtomicU64, AtomicUsize},
    Mutex, MutexGuard,
};

/// Keeps a value on a cache line of its own, so that writes to its
/// neighbours do not evict it from the cores that only read it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

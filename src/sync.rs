//! The synchronisation types of everything loom checks: the cache, the
//! budget, the plans and the registry's map.
//!
//! Normally these are std's types; under `--cfg loom` they are loom's, so the
//! same cache code is model-checked by `loom-tests/`. Exceptions, each
//! because loom cannot stand in there: the global allocator's modules
//! (`global.rs`, `scope.rs`, the registry's static in `registry.rs`) exist only
//! outside loom (a loom model installs no global allocator) and use std's
//! `Arc` and `OnceLock` directly; and under loom, `budget::member_of` wraps a
//! loom `Arc` in a std one, since loom's cannot be coerced to a trait object. The std `Mutex` ignores
//! poisoning: an allocator must never fail because some other thread panicked
//! while holding the lock (the state it guards is updated without panicking
//! code in between, so it is consistent whenever the lock is free).

#[cfg(not(loom))]
pub(crate) use std::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize};

#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, AtomicUsize};

#[cfg(not(loom))]
mod mutex {
    /// `std::sync::Mutex` whose `lock` returns the guard and ignores poisoning.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

    type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::sync::Mutex::new(value))
        }

        #[inline]
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            match self.0.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            }
        }
    }
}

#[cfg(loom)]
mod mutex {
    /// `loom::sync::Mutex` with the same surface as the std side.
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            match self.0.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            }
        }
    }
}

pub(crate) use mutex::Mutex;

/// A concurrent map from block addresses to owners: `DashMap` normally (a
/// fixed-seed hasher that mixes the low bits of aligned addresses, and a
/// fixed shard count, so nothing is lazily random and nothing asks the OS for
/// the core count); under loom, which cannot see inside `DashMap`, a
/// `Mutex<HashMap>` with the same surface, so the registry's logic is still
/// model-checked.
#[cfg(not(loom))]
pub(crate) struct ConcurrentMap<V>(dashmap::DashMap<usize, V, foldhash::fast::FixedState>);

#[cfg(not(loom))]
impl<V> ConcurrentMap<V> {
    pub(crate) fn new() -> Self {
        Self(dashmap::DashMap::with_capacity_and_hasher_and_shard_amount(
            0,
            foldhash::fast::FixedState::default(),
            16,
        ))
    }

    pub(crate) fn insert(&self, key: usize, value: V) -> Option<V> {
        self.0.insert(key, value)
    }

    pub(crate) fn remove(&self, key: usize) -> Option<V> {
        self.0.remove(&key).map(|(_, value)| value)
    }

    pub(crate) fn contains(&self, key: usize) -> bool {
        self.0.contains_key(&key)
    }

    /// Calls `f` on every value (a shard at a time, under its read lock).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&V)) {
        for entry in self.0.iter() {
            f(entry.value());
        }
    }
}

#[cfg(loom)]
pub(crate) struct ConcurrentMap<V>(Mutex<std::collections::HashMap<usize, V>>);

#[cfg(loom)]
impl<V> ConcurrentMap<V> {
    pub(crate) fn new() -> Self {
        Self(Mutex::new(std::collections::HashMap::new()))
    }

    pub(crate) fn insert(&self, key: usize, value: V) -> Option<V> {
        self.0.lock().insert(key, value)
    }

    pub(crate) fn remove(&self, key: usize) -> Option<V> {
        self.0.lock().remove(&key)
    }

    pub(crate) fn contains(&self, key: usize) -> bool {
        self.0.lock().contains_key(&key)
    }

    pub(crate) fn for_each(&self, f: impl FnMut(&V)) {
        self.0.lock().values().for_each(f);
    }
}

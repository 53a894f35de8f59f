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
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};

/// `UnsafeCell` with loom's access surface (`with_mut`), so loom can check
/// the front caches' magazine accesses.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Waits a moment for another thread (a drainer waiting for an owner).
pub(crate) fn spin() {
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// The two sides of an asymmetric fence (see `front.rs`): `light` on the
/// owner's hot path, `heavy` on a drainer's rare one. Together they order a
/// store before a load on both sides, as two `SeqCst` fences would.
///
/// On Linux `heavy` is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which
/// runs a full fence on every running thread of the process, so `light`
/// only has to stop the compiler. Where that is not available (other
/// systems, kernels before 4.14, a seccomp filter, Miri, loom), both are
/// `SeqCst` fences.
pub(crate) mod asymmetric {
    #[cfg(not(loom))]
    use core::sync::atomic::{AtomicU8, Ordering, compiler_fence, fence};
    #[cfg(loom)]
    use loom::sync::atomic::{Ordering, fence};

    #[cfg(not(loom))]
    const UNKNOWN: u8 = 0;
    #[cfg(not(loom))]
    const MEMBARRIER: u8 = 1;
    #[cfg(not(loom))]
    const FENCES: u8 = 2;

    /// Decided once, before the first front cache exists, and never changed:
    /// every owner and drainer sees the same mode.
    #[cfg(not(loom))]
    static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);

    /// Decides the mode (registering with `membarrier` if it works). Called
    /// before any front cache is made.
    pub(crate) fn prepare() {
        #[cfg(not(loom))]
        if MODE.load(Ordering::Acquire) == UNKNOWN {
            let mode = if membarrier::register() {
                MEMBARRIER
            } else {
                FENCES
            };
            // Racing preparers find the same answer; the first store wins.
            let _ = MODE.compare_exchange(UNKNOWN, mode, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// The owner's side, between its store of `active` and its load of
    /// `drain`.
    #[inline]
    pub(crate) fn light() {
        #[cfg(not(loom))]
        if MODE.load(Ordering::Relaxed) == MEMBARRIER {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        #[cfg(loom)]
        fence(Ordering::SeqCst);
    }

    /// The drainer's side, between its store of `drain` and its load of
    /// `active`.
    pub(crate) fn heavy() {
        #[cfg(not(loom))]
        if MODE.load(Ordering::Acquire) == MEMBARRIER {
            membarrier::expedited();
        }
        fence(Ordering::SeqCst);
    }

    #[cfg(all(target_os = "linux", not(miri), not(loom)))]
    mod membarrier {
        const QUERY: libc::c_long = 0;
        const GLOBAL: libc::c_long = 1;
        const PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
        const REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

        /// Whether private expedited `membarrier` is there and this process
        /// is registered for it.
        pub(super) fn register() -> bool {
            // SAFETY: `membarrier` takes two integers and touches no memory
            // of ours.
            let supported = unsafe { libc::syscall(libc::SYS_membarrier, QUERY, 0) };
            if supported < 0 || supported & PRIVATE_EXPEDITED == 0 {
                return false;
            }
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_membarrier, REGISTER_PRIVATE_EXPEDITED, 0) == 0 }
        }

        /// A full fence on every running thread of this process.
        pub(super) fn expedited() {
            // SAFETY: as above.
            if unsafe { libc::syscall(libc::SYS_membarrier, PRIVATE_EXPEDITED, 0) } == 0 {
                return;
            }
            // Not registered (a child after `fork` may not inherit it):
            // register again, else the slow command that needs none
            // (`MEMBARRIER_CMD_GLOBAL`, an RCU grace period). Either is a
            // full fence on every thread; owners never notice the difference.
            let again = register() && {
                // SAFETY: as above.
                unsafe { libc::syscall(libc::SYS_membarrier, PRIVATE_EXPEDITED, 0) == 0 }
            };
            if again {
                return;
            }
            // SAFETY: as above.
            let global = unsafe { libc::syscall(libc::SYS_membarrier, GLOBAL, 0) };
            // With neither, the owners' compiler fences would not be enough:
            // stop rather than risk handing a block out twice.
            if global != 0 {
                std::process::abort();
            }
        }
    }

    #[cfg(all(not(all(target_os = "linux", not(miri))), not(loom)))]
    mod membarrier {
        pub(super) fn register() -> bool {
            false
        }

        pub(super) fn expedited() {}
    }
}

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
            match self.0.try_lock() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => self.lock_contended(),
            }
        }

        /// The lock is taken: try again while spinning (backing off
        /// exponentially, then yielding), and only then sleep in the kernel.
        /// A best-fit cache's shared path holds the lock for a hundred
        /// nanoseconds or so, many times a pass: `std`'s mutex, which sleeps
        /// after a short spin, turned two threads on one cache into a
        /// convoy of futex waits and wakes (a bert_dynamic pass with nothing
        /// touched took 0.124 ms on each of two threads against 0.020 alone;
        /// with this, 0.022-0.050, and eight threads on two cores 0.10
        /// against 0.89). `try_lock` never marks the lock contended, so the
        /// holder's unlock makes no system call while others spin.
        #[cold]
        fn lock_contended(&self) -> MutexGuard<'_, T> {
            for round in 0..SPIN_ROUNDS + YIELD_ROUNDS {
                if round < SPIN_ROUNDS {
                    for _ in 0..1u32 << round.min(MAX_BACKOFF) {
                        core::hint::spin_loop();
                    }
                } else {
                    std::thread::yield_now();
                }
                match self.0.try_lock() {
                    Ok(guard) => return guard,
                    Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                        return poisoned.into_inner();
                    }
                    Err(std::sync::TryLockError::WouldBlock) => {}
                }
            }
            match self.0.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            }
        }
    }

    /// Spinning rounds before yielding (about 40 µs in all), the longest
    /// pause of one (2^8 `spin_loop`s), and yields before sleeping: chosen on
    /// the replay (two and eight threads on two cores, see `docs/threads.md`).
    const SPIN_ROUNDS: u32 = 20;
    const MAX_BACKOFF: u32 = 8;
    const YIELD_ROUNDS: u32 = 8;
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

//! [`Scope`]: the guard of [`CachingAllocator::enter`](crate::CachingAllocator::enter),
//! and the thread-local "current cache" that [`ScopedGlobal`](crate::ScopedGlobal)
//! serves large allocations from (c10's `WithCPUCachingAllocatorGuard`).
//!
//! The thread-local holds one strong count of the current cache, so no order
//! of guard drops can leave it pointing at a freed cache. Guards nest: the
//! innermost wins and its drop restores the one before. A guard dropped out of
//! order (safe code can: `let a = x.enter(); let b = y.enter(); drop(a);`)
//! ends every scope on the thread; the other guards of that time become inert.

use core::cell::Cell;
use core::marker::PhantomData;
use core::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::alloc::Owner;
use crate::registry;

/// Scope ids: unique in the process (0 is "no scope").
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A strong count of an owner, as a raw pointer (from `Arc::into_raw`).
type OwnerPtr = NonNull<dyn Owner>;

struct ThreadScopes {
    /// The current owner; holds one strong count.
    current: Cell<Option<OwnerPtr>>,
    /// The innermost live scope's id (unique in the process), 0 when none:
    /// what the registry tags the blocks handed out in it with.
    current_id: Cell<u64>,
    /// Serial of the innermost live guard, 0 when none.
    top: Cell<u64>,
    next_serial: Cell<u64>,
    /// Bumped when an out-of-order drop ends every scope: guards of an older
    /// epoch are inert.
    epoch: Cell<u64>,
}

std::thread_local! {
    static SCOPES: ThreadScopes = const {
        ThreadScopes {
            current: Cell::new(None),
            current_id: Cell::new(0),
            top: Cell::new(0),
            next_serial: Cell::new(1),
            epoch: Cell::new(0),
        }
    };
}

/// Makes a cache current for this thread until dropped. Created by
/// [`CachingAllocator::enter`](crate::CachingAllocator::enter).
///
/// `!Send`: a scope belongs to the thread that entered it.
#[must_use = "the scope ends when the guard is dropped"]
pub struct Scope {
    serial: u64,
    epoch: u64,
    id: u64,
    previous: Option<OwnerPtr>,
    previous_id: u64,
    previous_top: u64,
    _not_send: PhantomData<*const ()>,
}

impl core::fmt::Debug for Scope {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Scope")
            .field("serial", &self.serial)
            .finish()
    }
}

/// Gives back the strong count `owner` holds.
fn release(owner: Option<OwnerPtr>) {
    if let Some(owner) = owner {
        // SAFETY: every `OwnerPtr` stored in a `ThreadScopes` or a `Scope` came
        // from `Arc::into_raw` and stands for one strong count, moved (never
        // copied) between them; this gives that count back exactly once.
        drop(unsafe { Arc::from_raw(owner.as_ptr().cast_const()) });
    }
}

/// Makes `owner` current for this thread until the returned guard drops: the
/// `enter` of every handle (cache, recorder, planned arena).
pub(crate) fn enter(owner: Arc<dyn Owner>) -> Scope {
    #[cfg(not(loom))]
    warn_once_if_not_installed();
    // The registry exists before any scope block does, so it is never
    // created inside an allocation.
    registry::prepare();
    let raw = Arc::into_raw(owner);
    // `Arc::into_raw` never returns null.
    let owner = NonNull::new(raw.cast_mut());
    let entered = SCOPES.try_with(|scopes| {
        let serial = scopes.next_serial.get();
        scopes.next_serial.set(serial + 1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Scope {
            serial,
            epoch: scopes.epoch.get(),
            id,
            previous: scopes.current.replace(owner),
            previous_id: scopes.current_id.replace(id),
            previous_top: scopes.top.replace(serial),
            _not_send: PhantomData,
        }
    });
    match entered {
        Ok(scope) => scope,
        // This thread's locals are being torn down: nothing to enter into.
        Err(_) => {
            release(owner);
            Scope {
                serial: 0,
                epoch: u64::MAX,
                id: 0,
                previous: None,
                previous_id: 0,
                previous_top: 0,
                _not_send: PhantomData,
            }
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        let released = SCOPES.try_with(|scopes| {
            if scopes.epoch.get() != self.epoch {
                // Inert: an out-of-order drop already ended this scope.
                (previous, None)
            } else if scopes.top.get() == self.serial {
                // The innermost scope ends: the one before is current again.
                scopes.top.set(self.previous_top);
                scopes.current_id.set(self.previous_id);
                (scopes.current.replace(previous), None)
            } else {
                // Dropped out of order: end every scope on this thread.
                scopes.epoch.set(self.epoch + 1);
                scopes.top.set(0);
                scopes.current_id.set(0);
                (scopes.current.replace(None), previous)
            }
        });
        // Released after the thread-local is consistent: dropping the last
        // count of a cache gives its blocks back, which may re-enter the
        // global allocator.
        match released {
            Ok((first, second)) => {
                release(first);
                release(second);
            }
            Err(_) => release(previous),
        }
    }
}

/// A strong count of this thread's current owner, if there is one.
///
/// A count, not a borrow: the owner's backing allocator is user code, and may
/// end the scope that holds the owner's last count (a `Scope` kept in a
/// thread-local, say) while the owner is serving a request.
#[inline]
pub(crate) fn current() -> Option<Arc<dyn Owner>> {
    let current = SCOPES.try_with(|scopes| scopes.current.get()).ok()??;
    let current = current.as_ptr().cast_const();
    // SAFETY: `current` stands for a strong count held by this thread's
    // `ThreadScopes`, which only this thread releases; nothing runs between
    // the read above and this increment, so that count is still held.
    unsafe { Arc::increment_strong_count(current) };
    // SAFETY: `current` came from `Arc::into_raw`, and the count just taken is
    // the one the returned `Arc` gives back.
    Some(unsafe { Arc::from_raw(current) })
}

/// The id of this thread's innermost scope, 0 when none.
#[inline]
pub(crate) fn current_id() -> u64 {
    SCOPES
        .try_with(|scopes| scopes.current_id.get())
        .unwrap_or(0)
}

/// The blocks a scope handed out that are still live: see
/// [`Scope::live_blocks`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveBlocks {
    /// How many.
    pub blocks: usize,
    /// Their requested bytes.
    pub bytes: usize,
}

impl Scope {
    /// The blocks this scope handed out (allocations of at least the
    /// minimum size that `ScopedGlobal` served from its cache while it was
    /// the innermost scope) that are still live. At the end of a request,
    /// what is left is what the request kept: its outputs, or a library's
    /// thread-local scratch buffer (candle's gemm keeps 2 MiB for the
    /// thread's life), which stays "in use" in the cache. Scans the live
    /// scope blocks of the process: for reports, not for every request.
    ///
    /// ```
    /// use caching_allocator::{CachingAllocator, ScopedGlobal};
    ///
    /// #[global_allocator]
    /// static GLOBAL: ScopedGlobal = ScopedGlobal::new();
    ///
    /// let cache = CachingAllocator::new();
    /// let scope = cache.enter();
    /// drop(vec![0u8; 1 << 20]);
    /// let kept = vec![1u8; 10_000];
    /// let live = scope.end();
    /// assert_eq!((live.blocks, live.bytes), (1, 10_000));
    /// drop(kept);
    /// ```
    pub fn live_blocks(&self) -> LiveBlocks {
        let mut live = LiveBlocks::default();
        let Some(registry) = registry::scope_blocks() else {
            return live;
        };
        if self.id == 0 {
            return live;
        }
        let _in_registry = crate::reentry::in_registry();
        registry.for_each(|entry| {
            if entry.scope == self.id {
                live.blocks += 1;
                live.bytes += entry.size;
            }
        });
        live
    }

    /// Ends the scope, and says what it handed out that is still live
    /// ([`live_blocks`](Self::live_blocks)).
    pub fn end(self) -> LiveBlocks {
        let live = self.live_blocks();
        drop(self);
        live
    }
}

/// Whether this thread has a current cache.
#[inline]
pub(crate) fn has_current() -> bool {
    SCOPES
        .try_with(|scopes| scopes.current.get().is_some())
        .unwrap_or(false)
}

/// The first scope entered in a program without `ScopedGlobal` as its global
/// allocator can have no effect: say so once, on stderr, instead of letting
/// every allocation silently bypass the cache.
#[cfg(not(loom))]
fn warn_once_if_not_installed() {
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        if !crate::ScopedGlobal::is_installed() {
            eprintln!(
                "caching-allocator: a scope was entered, but ScopedGlobal is not the \
                 #[global_allocator]: scopes have no effect (see ScopedGlobal::is_installed)"
            );
        }
    });
}

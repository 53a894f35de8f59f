//! [`ScopedGlobal`]: a `#[global_allocator]` that sends a thread's large
//! allocations to its current cache, and the registry that sends every free
//! of a cache block back to its owner, wherever it happens.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};
use std::alloc::System;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::alloc::Owner;
use crate::reentry;
use crate::registry::{self, ScopeBlock, scope_blocks};
use crate::scope;

/// Allocations smaller than this stay with the inner allocator by default:
/// tensors, not strings.
pub const DEFAULT_MIN_SIZE: usize = 4096;

/// A global allocator that serves a thread's allocations of at least
/// `min_size` bytes from the cache made current by
/// [`CachingAllocator::enter`](crate::CachingAllocator::enter), and everything
/// else from an inner allocator (`System` by default).
///
/// This is how code that only knows `Vec::new()` (ndarray, image buffers,
/// anyone's tensors) caches its big buffers inside a scope without being
/// changed: the Rust form of c10's thread-local caching allocator.
///
/// What it costs: an allocation below `min_size`, or on a thread with no
/// current cache, reads two thread-local flags and goes to the inner allocator.
/// A free below `min_size` goes straight to the inner allocator (the layout
/// tells the size); a larger one is looked up in a concurrent registry of
/// cache blocks, unless no cache block is live at all.
///
/// Frees go to the block's owner wherever they happen: on another thread,
/// after the scope ended, inside another cache's scope, or after every handle
/// of the cache was dropped (a live block keeps its cache alive; the cache is
/// freed with its last block).
///
/// # Examples
///
/// ```
/// use caching_allocator::{CachingAllocator, ScopedGlobal};
///
/// #[global_allocator]
/// static GLOBAL: ScopedGlobal = ScopedGlobal::new();
///
/// let cache = CachingAllocator::new();
/// {
///     let _scope = cache.enter();
///     for _pass in 0..3 {
///         let activations = vec![0.0f32; 1 << 16]; // a plain Vec, 256 KiB
///         drop(activations);
///     }
/// }
/// assert_eq!((cache.stats().misses, cache.stats().hits), (1, 2));
/// ```
pub struct ScopedGlobal<G = System> {
    inner: G,
    min_size: usize,
}

impl<G> core::fmt::Debug for ScopedGlobal<G> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ScopedGlobal")
            .field("inner", &core::any::type_name::<G>())
            .field("min_size", &self.min_size)
            .finish()
    }
}

impl ScopedGlobal<System> {
    /// Over the system allocator, with the default minimum size
    /// ([`DEFAULT_MIN_SIZE`]).
    pub const fn new() -> Self {
        Self::new_in(System, DEFAULT_MIN_SIZE)
    }
}

/// The layout [`ScopedGlobal::is_installed`] allocates through the global
/// allocator: unusual enough that nothing else asks for it in practice.
const PROBE: Layout = match Layout::from_size_align(3, 2048) {
    Ok(layout) => layout,
    Err(_) => panic!("a valid layout"),
};

/// Set when a `ScopedGlobal` served the probe: it is the global allocator.
static PROBE_SEEN: AtomicBool = AtomicBool::new(false);

impl ScopedGlobal {
    /// Whether a `ScopedGlobal` (over any inner allocator) is this program's
    /// `#[global_allocator]`: without one,
    /// [`CachingAllocator::enter`](crate::CachingAllocator::enter) and the
    /// plan's scopes have no effect. Asks once, with one tiny allocation through the global
    /// allocator.
    ///
    /// ```
    /// // This doctest installs no global allocator.
    /// assert!(!caching_allocator::ScopedGlobal::is_installed());
    /// ```
    pub fn is_installed() -> bool {
        if PROBE_SEEN.load(Ordering::Relaxed) {
            return true;
        }
        // SAFETY: `PROBE` is not zero-sized; the block is freed at once with
        // the layout it was allocated with.
        unsafe {
            // `black_box`: an allocation freed unused may be optimised away,
            // and then the global allocator never sees the probe.
            let probe = core::hint::black_box(std::alloc::alloc(PROBE));
            if !probe.is_null() {
                std::alloc::dealloc(probe, PROBE);
            }
        }
        PROBE_SEEN.load(Ordering::Relaxed)
    }
}

impl Default for ScopedGlobal<System> {
    fn default() -> Self {
        Self::new()
    }
}

impl<G> ScopedGlobal<G> {
    /// Over `inner` (mimalloc's, say): allocations of at least `min_size`
    /// bytes made inside a scope go to the scope's cache, all others to
    /// `inner`. A `min_size` of 0 is taken as 1.
    pub const fn new_in(inner: G, min_size: usize) -> Self {
        Self {
            inner,
            min_size: if min_size == 0 { 1 } else { min_size },
        }
    }

    /// The smallest allocation a scope's cache serves.
    pub fn min_size(&self) -> usize {
        self.min_size
    }

    /// The allocator everything else goes to.
    pub fn inner(&self) -> &G {
        &self.inner
    }

    /// The current cache's block for `layout`, registered to it; `None` if
    /// this thread has no current cache, is inside the allocator, or the
    /// owner panicked (then the request goes to the inner allocator).
    ///
    /// Callers check `layout.size() >= self.min_size` first, inline.
    fn allocate_scoped(&self, layout: Layout, zeroed: bool) -> Option<*mut u8> {
        // Most threads have no scope: test that before the re-entrancy flag.
        if !scope::has_current() || reentry::is_inside() {
            return None;
        }
        let owner = scope::current()?;
        let served = {
            let _inside = reentry::inside();
            panic::catch_unwind(AssertUnwindSafe(|| owner.allocate(layout, zeroed)))
        };
        match served {
            Ok(Ok(block)) => {
                let block = block.cast::<u8>().as_ptr();
                // `enter` created the registry before this scope began; the
                // fallback (never taken) keeps this path free of a second
                // flag write.
                let registry = scope_blocks().unwrap_or_else(registry::prepare);
                let _in_registry = reentry::in_registry();
                // The owner's count moves into the registry.
                let entry = ScopeBlock {
                    owner,
                    scope: scope::current_id(),
                    size: layout.size(),
                };
                let replaced = registry.insert(block as usize, entry);
                drop(_in_registry);
                // Nothing to replace: a live block is registered once.
                release(replaced.map(|entry| entry.owner));
                Some(block)
            }
            Ok(Err(_)) => {
                release(Some(owner));
                Some(ptr::null_mut())
            }
            Err(payload) => {
                // The owner's books are consistent (its panic policy); the
                // hook has reported the panic. Serve the request without it.
                contain(|| drop(payload));
                release(Some(owner));
                None
            }
        }
    }

    /// Takes `ptr`'s owner out of the registry, if a scope's owner handed it
    /// out. Consulted wherever the free happens, inside the allocator too (an
    /// owner's `Drop` or a backing allocator may free a scope block); only
    /// the registry's own frees, under its lock, skip it.
    ///
    /// Callers check `layout.size() >= self.min_size` first, inline.
    fn take_owner(&self, ptr: *mut u8) -> Option<Arc<dyn Owner>> {
        let registry = scope_blocks()?;
        if registry.is_empty() || reentry::is_in_registry() {
            return None;
        }
        let _in_registry = reentry::in_registry();
        registry.take(ptr as usize).map(|entry| entry.owner)
    }

    fn is_owned(&self, ptr: *mut u8, layout: Layout) -> bool {
        if layout.size() < self.min_size || reentry::is_in_registry() {
            return false;
        }
        let Some(registry) = scope_blocks() else {
            return false;
        };
        let _in_registry = reentry::in_registry();
        registry.contains(ptr as usize)
    }
}

/// Drops an owner's count, which may be its last (dropping the owner gives
/// its blocks back to a backing allocator, user code); never unwinds.
fn release(owner: Option<Arc<dyn Owner>>) {
    if let Some(owner) = owner {
        contain(|| drop(owner));
    }
}

/// Runs `f`, containing a panic: a global allocator must not unwind. The
/// payload is dropped (the hook has reported the panic); one whose own drop
/// panics is leaked.
fn contain(f: impl FnOnce()) {
    if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(f))
        && let Err(nested) = panic::catch_unwind(AssertUnwindSafe(|| drop(payload)))
    {
        core::mem::forget(nested);
    }
}

// SAFETY: every block comes either from `inner` (and goes back to it, with the
// layout it was allocated with) or from a cache, which hands out blocks valid
// for their layout and never twice; a cache block is registered before it is
// returned and freed through its owner exactly once (`take` hands the entry
// to one caller; every free of it looks it up, see `take_owner`). Nothing here
// unwinds: every call into an owner (user code underneath) runs under
// `catch_unwind`, and the cache returns errors as null.
unsafe impl<G: GlobalAlloc> GlobalAlloc for ScopedGlobal<G> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout == PROBE {
            PROBE_SEEN.store(true, Ordering::Relaxed);
        }
        if layout.size() >= self.min_size
            && let Some(block) = self.allocate_scoped(layout, false)
        {
            return block;
        }
        // SAFETY: the caller's contract (non-zero size) is `inner`'s.
        unsafe { self.inner.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= self.min_size
            && let Some(block) = self.allocate_scoped(layout, true)
        {
            return block;
        }
        // SAFETY: as for `alloc`.
        unsafe { self.inner.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Below the minimum size the layout proves it is not a cache block.
        let owner = if layout.size() >= self.min_size {
            self.take_owner(ptr)
        } else {
            None
        };
        match owner {
            Some(owner) => {
                contain(|| {
                    let _inside = reentry::inside();
                    // SAFETY: the registry entry proves `owner` handed out
                    // `ptr` (for `layout`, the caller's contract) and it is
                    // live; the entry is gone, so this is the one free of it.
                    // `ptr` is not null: it was registered.
                    unsafe { owner.deallocate(NonNull::new_unchecked(ptr), layout) };
                });
                // If this was the last count of an orphaned cache, it is freed
                // here; its frees of scope blocks still reach their owners.
                release(Some(owner));
            }
            // SAFETY: not a cache block, so `inner` allocated it with `layout`.
            None => unsafe { self.inner.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let owned = self.is_owned(ptr, layout);
        let to_cache = new_size >= self.min_size && !reentry::is_inside() && scope::has_current();
        if !owned && !to_cache {
            // SAFETY: not a cache block and not going to one: `inner`'s
            // block, and the caller's contract is `inner`'s.
            return unsafe { self.inner.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to
        // `layout.align()`, does not overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_size` is non-zero (caller's contract).
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: `ptr` is live with `layout.size()` bytes, `moved` is a
            // distinct new block of `new_size` bytes.
            unsafe { ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
            // SAFETY: `ptr` was allocated by this allocator with `layout`, and
            // the caller uses `moved` from now on.
            unsafe { self.dealloc(ptr, layout) };
        }
        moved
    }
}

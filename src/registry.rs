//! The registry of scope blocks: which owner handed out the block at an
//! address, so that every free reaches it, wherever it happens (c10's
//! process-wide `allocation_map_` and `record_free`, made safe).
//!
//! An entry holds a strong count of its owner: a live block keeps its cache
//! alive, and the free of an orphaned cache's last block drops the cache
//! (which gives every cached block back). The live count lets frees skip the
//! map when no scope block exists.

use core::sync::atomic::Ordering;

use crate::sync::{AtomicUsize, ConcurrentMap};

#[cfg(not(loom))]
pub(crate) use scope_blocks::{ScopeBlock, prepare, scope_blocks};

/// The one registry `ScopedGlobal` and the scopes share (std only: loom
/// models install no global allocator).
#[cfg(not(loom))]
mod scope_blocks {
    use std::sync::{Arc, OnceLock};

    use super::Registry;
    use crate::alloc::Owner;
    use crate::reentry;

    /// A live block a scope's owner handed out: a strong count of the owner,
    /// the scope it was handed out in, and its size.
    pub(crate) struct ScopeBlock {
        pub(crate) owner: Arc<dyn Owner>,
        pub(crate) scope: u64,
        pub(crate) size: usize,
    }

    /// Every live block a scope's owner handed out.
    static SCOPE_BLOCKS: OnceLock<Registry<ScopeBlock>> = OnceLock::new();

    /// The registry, if a scope was ever entered (no scope block exists
    /// before that).
    #[inline]
    pub(crate) fn scope_blocks() -> Option<&'static Registry<ScopeBlock>> {
        SCOPE_BLOCKS.get()
    }

    /// The registry, created if need be, marked inside so its tables come
    /// from the inner allocator. Every `enter` calls it first, so it is never
    /// created inside an allocation.
    pub(crate) fn prepare() -> &'static Registry<ScopeBlock> {
        let _inside = reentry::inside();
        SCOPE_BLOCKS.get_or_init(Registry::new)
    }
}

/// Live blocks by address, each with (a strong handle of) its owner `V`.
pub(crate) struct Registry<V> {
    blocks: ConcurrentMap<V>,
    live: AtomicUsize,
}

impl<V> Registry<V> {
    pub(crate) fn new() -> Self {
        Self {
            blocks: ConcurrentMap::new(),
            live: AtomicUsize::new(0),
        }
    }

    /// Records that `owner` handed out the block at `addr`. Called before the
    /// block is returned to anyone. Returns the entry it replaced (none while
    /// every registered block is freed through `take`), for the caller to drop
    /// outside the registry.
    pub(crate) fn insert(&self, addr: usize, owner: V) -> Option<V> {
        let replaced = self.blocks.insert(addr, owner);
        if replaced.is_none() {
            self.live.fetch_add(1, Ordering::Relaxed);
        }
        replaced
    }

    /// The owner of the block at `addr`, removed: the one caller that gets it
    /// frees the block.
    pub(crate) fn take(&self, addr: usize) -> Option<V> {
        if self.is_empty() {
            return None;
        }
        let owner = self.blocks.remove(addr)?;
        self.live.fetch_sub(1, Ordering::Relaxed);
        Some(owner)
    }

    /// Whether a registered block lives at `addr`.
    pub(crate) fn contains(&self, addr: usize) -> bool {
        !self.is_empty() && self.blocks.contains(addr)
    }

    /// Calls `f` on every live entry (for reports, not the hot path).
    pub(crate) fn for_each(&self, f: impl FnMut(&V)) {
        self.blocks.for_each(f);
    }

    /// No registered block is live. A relaxed load suffices: whoever frees a
    /// block got it through some synchronisation after it was registered
    /// (the count was raised first), and so sees a count above zero.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.live.load(Ordering::Relaxed) == 0
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! The registry's handoff, model-checked with real caches: the last
    //! handle's drop racing a free through the registry, and two threads
    //! freeing the last blocks of an orphaned cache. Run with
    //! `RUSTFLAGS="--cfg loom" cargo test -p caching-allocator --lib --release registry`.

    use core::alloc::Layout;
    use core::ptr::NonNull;

    use allocator_api2::alloc::{AllocError, Allocator, Global};

    use super::Registry;
    use crate::CachingAllocator;
    use crate::sync::{Arc, AtomicUsize};

    /// Counts live backing blocks (loom-visible).
    #[derive(Clone)]
    struct Live(Arc<AtomicUsize>);

    // SAFETY: forwards to `Global` and only counts.
    unsafe impl Allocator for Live {
        fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
            let block = Global.allocate(layout)?;
            self.0.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
            Ok(block)
        }

        unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
            self.0.fetch_sub(1, core::sync::atomic::Ordering::SeqCst);
            // SAFETY: the caller's contract; `allocate` took it from `Global`.
            unsafe { Global.deallocate(ptr, layout) }
        }
    }

    fn layout() -> Layout {
        Layout::from_size_align(64, 8).unwrap()
    }

    /// A scope block registered to its cache, as `ScopedGlobal` does it.
    fn scope_block(
        registry: &Registry<CachingAllocator<Live>>,
        cache: &CachingAllocator<Live>,
    ) -> usize {
        let block = cache.allocate(layout()).unwrap().cast::<u8>();
        let addr = block.as_ptr() as usize;
        registry.insert(addr, cache.clone());
        addr
    }

    /// The free path of `ScopedGlobal::dealloc`.
    fn free(registry: &Registry<CachingAllocator<Live>>, addr: usize) {
        let owner = registry
            .take(addr)
            .expect("a registered block has an owner");
        let block = NonNull::new(addr as *mut u8).unwrap();
        // SAFETY: the registry entry proves `owner` handed out this live block
        // for `layout()`; `take` gave the entry to this caller alone.
        unsafe { owner.deallocate(block, layout()) };
        drop(owner);
    }

    #[test]
    fn a_free_elsewhere_races_the_last_handle_drop() {
        loom::model(|| {
            let live = Live(Arc::new(AtomicUsize::new(0)));
            let registry = Arc::new(Registry::new());
            let cache = CachingAllocator::new_in(live.clone());
            let addr = scope_block(&registry, &cache);
            let freer = {
                let registry = Arc::clone(&registry);
                loom::thread::spawn(move || free(&registry, addr))
            };
            drop(cache); // the last user handle, racing the free
            freer.join().unwrap();
            assert!(registry.is_empty());
            // Whichever came last dropped the cache, which gave the block back.
            assert_eq!(live.0.load(core::sync::atomic::Ordering::SeqCst), 0);
        });
    }

    #[test]
    fn two_threads_free_the_last_blocks_of_an_orphaned_cache() {
        loom::model(|| {
            let live = Live(Arc::new(AtomicUsize::new(0)));
            let registry = Arc::new(Registry::new());
            let cache = CachingAllocator::new_in(live.clone());
            let first = scope_block(&registry, &cache);
            let second = scope_block(&registry, &cache);
            drop(cache);
            let threads: std::vec::Vec<_> = [first, second]
                .into_iter()
                .map(|addr| {
                    let registry = Arc::clone(&registry);
                    loom::thread::spawn(move || free(&registry, addr))
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            assert!(registry.is_empty());
            assert!(!registry.contains(first));
            assert_eq!(live.0.load(core::sync::atomic::Ordering::SeqCst), 0);
        });
    }
}

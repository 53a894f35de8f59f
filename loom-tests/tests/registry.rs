//! The scope registry's handoff, model-checked with real caches: the last
//! handle's drop racing a free through the registry, and two threads freeing
//! the last blocks of an orphaned cache. The registry is private; the crate
//! exports it as `LoomRegistry` under `--cfg loom` for these models alone.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release --test registry`.
#![cfg(loom)]

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::Ordering::SeqCst;

use caching_allocator::{AllocError, Allocator, CachingAllocator, Global, LoomRegistry};
use loom::sync::Arc;
use loom::sync::atomic::AtomicUsize;
use loom_tests::model;

/// Counts live backing blocks (loom-visible).
#[derive(Clone)]
struct Live(Arc<AtomicUsize>);

// SAFETY: forwards to `Global`, which upholds the contract, and only counts.
unsafe impl Allocator for Live {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let block = Global.allocate(layout)?;
        self.0.fetch_add(1, SeqCst);
        Ok(block)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        self.0.fetch_sub(1, SeqCst);
        // SAFETY: the caller's contract; `allocate` took it from `Global`.
        unsafe { Global.deallocate(ptr, layout) }
    }
}

type Registry = LoomRegistry<CachingAllocator<Live>>;

fn layout() -> Layout {
    Layout::from_size_align(64, 8).unwrap()
}

/// A scope block registered to its cache, as `ScopedGlobal` does it.
fn scope_block(registry: &Registry, cache: &CachingAllocator<Live>) -> usize {
    let block = cache.allocate(layout()).unwrap().cast::<u8>();
    let addr = block.as_ptr() as usize;
    registry.insert(addr, cache.clone());
    addr
}

/// The free path of `ScopedGlobal::dealloc`.
fn free(registry: &Registry, addr: usize) {
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
    model(|| {
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
        assert_eq!(live.0.load(SeqCst), 0);
    });
}

#[test]
fn two_threads_free_the_last_blocks_of_an_orphaned_cache() {
    model(|| {
        let live = Live(Arc::new(AtomicUsize::new(0)));
        let registry = Arc::new(Registry::new());
        let cache = CachingAllocator::new_in(live.clone());
        let first = scope_block(&registry, &cache);
        let second = scope_block(&registry, &cache);
        drop(cache);
        let threads: Vec<_> = [first, second]
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
        assert_eq!(live.0.load(SeqCst), 0);
    });
}

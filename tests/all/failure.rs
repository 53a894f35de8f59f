//! Out-of-memory paths: a backing allocator that fails, the release-and-retry
//! recovery, absurd layouts, and failed grows that must leave the old block
//! alone.

use std::ptr::NonNull;

use crate::fixture::{Counting, assert_cache_agrees, counted, layout, pattern};
use allocator_api2::alloc::{AllocError, Allocator};
use allocator_api2::vec::Vec;
use caching_allocator::CachingAllocator;

type Cache = CachingAllocator<Counting>;

fn write(block: NonNull<[u8]>, bytes: &[u8]) {
    // SAFETY: callers pass a live block of at least `bytes.len()` bytes.
    unsafe { std::slice::from_raw_parts_mut(block.cast::<u8>().as_ptr(), bytes.len()) }
        .copy_from_slice(bytes);
}

fn read<'a>(block: NonNull<u8>, len: usize) -> &'a [u8] {
    // SAFETY: callers pass a live, initialised block of at least `len` bytes.
    unsafe { std::slice::from_raw_parts(block.as_ptr(), len) }
}

/// Allocates and frees `n` blocks of `size`, leaving them cached.
fn cache_blocks(cache: &Cache, n: usize, size: usize) {
    let blocks: std::vec::Vec<_> = (0..n)
        .map(|_| cache.allocate(layout(size, 8)).unwrap())
        .collect();
    for block in blocks {
        // SAFETY: allocated just above with this layout.
        unsafe { cache.deallocate(block.cast(), layout(size, 8)) };
    }
}

fn assert_nothing_lost(cache: &Cache, backing: &Counting) {
    assert_cache_agrees(&cache.stats(), backing);
}

#[test]
fn a_failed_allocation_is_retried_after_releasing_the_cache() {
    let (cache, backing) = counted();
    cache_blocks(&cache, 3, 1000);
    assert_eq!(backing.live_blocks(), 3);
    backing.fail_next(1);
    let block = cache.allocate(layout(2000, 8)).expect("the retry succeeds");
    let stats = cache.stats();
    assert_eq!((stats.retries, stats.releases, stats.failures), (1, 1, 0));
    assert_eq!((stats.bytes_released, stats.backing_frees), (3000, 3));
    assert_eq!(
        (stats.misses, stats.bytes_in_use, stats.bytes_cached),
        (4, 2000, 0)
    );
    // The cached blocks really went back; only the new one is held.
    assert_eq!(backing.live_blocks(), 1);
    assert_eq!(backing.live_bytes(), 2000);
    assert_eq!((backing.attempts(), backing.refused()), (5, 1));
    assert_nothing_lost(&cache, &backing);
    // SAFETY: allocated above with this layout.
    unsafe { cache.deallocate(block.cast(), layout(2000, 8)) };
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn a_budget_is_met_by_releasing_the_cache() {
    let (cache, backing) = counted();
    backing.set_budget(Some(4096));
    cache_blocks(&cache, 3, 1000);
    // 3000 cached + 2000 would exceed the budget: release, then it fits.
    let mut v: Vec<u8, _> = Vec::with_capacity_in(2000, cache.clone());
    v.extend_from_slice(pattern(1, 2000));
    let stats = cache.stats();
    assert_eq!(
        (stats.retries, stats.failures, stats.bytes_cached),
        (1, 0, 0)
    );
    assert_eq!(&v[..], pattern(1, 2000));
    // Now 2000 in use: another 2000 fits, a third does not even after release.
    let w: Vec<u8, _> = Vec::with_capacity_in(2000, cache.clone());
    let mut x: Vec<u8, _> = Vec::new_in(cache.clone());
    assert!(x.try_reserve_exact(2000).is_err());
    let stats = cache.stats();
    assert_eq!((stats.retries, stats.failures), (2, 1));
    assert_eq!(stats.bytes_in_use, 4000);
    assert_nothing_lost(&cache, &backing);
    drop((v, w, x));
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn two_failures_in_a_row_are_an_error_and_leak_nothing() {
    let (cache, backing) = counted();
    let held = cache.allocate(layout(64, 8)).unwrap();
    cache_blocks(&cache, 2, 500);
    backing.fail_next(2);
    assert_eq!(cache.allocate(layout(100, 8)), Err(AllocError));
    let stats = cache.stats();
    assert_eq!((stats.retries, stats.releases, stats.failures), (1, 1, 1));
    assert_eq!((stats.misses, stats.hits), (3, 0));
    assert_eq!(
        (stats.bytes_in_use, stats.bytes_cached, stats.blocks_in_use),
        (64, 0, 1)
    );
    assert_eq!(backing.pending(), 0);
    assert_nothing_lost(&cache, &backing);

    // allocate_zeroed takes the same path.
    backing.fail_next(2);
    assert_eq!(cache.allocate_zeroed(layout(100, 8)), Err(AllocError));
    assert_eq!(cache.stats().failures, 2);

    // The failure is not sticky.
    let block = cache.allocate(layout(100, 8)).unwrap();
    // SAFETY: allocated above with these layouts.
    unsafe {
        cache.deallocate(block.cast(), layout(100, 8));
        cache.deallocate(held.cast(), layout(64, 8));
    }
    assert_nothing_lost(&cache, &backing);
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn a_failing_backing_with_nothing_cached() {
    let (cache, backing) = counted();
    backing.fail_all(true);
    for size in [1, 64, 4096, 1 << 20] {
        assert_eq!(cache.allocate(layout(size, 8)), Err(AllocError));
    }
    let stats = cache.stats();
    assert_eq!((stats.retries, stats.releases, stats.failures), (4, 4, 4));
    assert_eq!(
        (stats.misses, stats.bytes_reserved, stats.bytes_released),
        (0, 0, 0)
    );
    assert_eq!(backing.attempts(), 8);
    // Zero-sized requests still succeed: they never reach the backing.
    assert!(cache.allocate(layout(0, 64)).is_ok());
    backing.fail_all(false);
    assert!(cache.allocate(layout(0, 64)).is_ok());
    assert_eq!(cache.stats().failures, 4);
}

#[test]
fn absurd_layouts_are_errors_not_panics() {
    let (cache, backing) = counted();
    let max = isize::MAX as usize;
    // No block layout exists for these (the size raised to the 64 class, or
    // to their own alignment, overflows isize): refused without asking the
    // backing.
    let unrepresentable = [
        layout(max - 62, 1),
        layout(max - 62, 32),
        layout(max - 7, 8),
        layout(max, 1),
    ];
    for (i, &l) in unrepresentable.iter().enumerate() {
        assert_eq!(cache.allocate(l), Err(AllocError), "{l:?}");
        assert_eq!(cache.allocate_zeroed(l), Err(AllocError), "{l:?}");
        assert_eq!(cache.stats().failures, 2 * (i as u64 + 1));
    }
    assert_eq!(backing.attempts(), 0);
    assert_eq!(cache.stats().retries, 0);

    // Representable but too big for any machine: the backing refuses, the
    // cache releases and retries once, then gives up.
    let huge = [
        layout(max - 100, 1),
        layout(max - 63, 1),
        layout(max - 4095, 4096),
        layout(max / 2, 64),
        layout(max / 2 + 1, 4096),
    ];
    let before = cache.stats();
    for &l in &huge {
        assert_eq!(cache.allocate(l), Err(AllocError), "{l:?}");
        assert_eq!(cache.allocate_zeroed(l), Err(AllocError), "{l:?}");
    }
    let stats = cache.stats();
    let n = 2 * huge.len() as u64;
    assert_eq!(stats.failures - before.failures, n);
    assert_eq!(stats.retries, n);
    assert_eq!(backing.attempts(), 2 * n);
    assert_eq!((stats.misses, stats.bytes_reserved), (0, 0));
    assert_nothing_lost(&cache, &backing);
}

#[test]
fn growing_to_an_absurd_size_fails_and_keeps_the_block() {
    let (cache, backing) = counted();
    let old = layout(100, 8);
    let block = cache.allocate(old).unwrap();
    write(block, pattern(3, 100));
    for new in [
        layout(isize::MAX as usize - 10, 8),
        layout(isize::MAX as usize / 2, 4096),
    ] {
        // SAFETY: `block` is live for `old`; `new` is larger.
        let grown = unsafe { cache.grow(block.cast(), old, new) };
        assert_eq!(grown, Err(AllocError));
        // SAFETY: as above.
        let grown = unsafe { cache.grow_zeroed(block.cast(), old, new) };
        assert_eq!(grown, Err(AllocError));
        assert_eq!(read(block.cast(), 100), pattern(3, 100));
    }
    assert_eq!(cache.stats().failures, 4);
    assert_eq!(cache.stats().blocks_in_use, 1);
    // SAFETY: still live for `old`.
    unsafe { cache.deallocate(block.cast(), old) };
    assert_nothing_lost(&cache, &backing);
}

#[test]
fn try_reserve_with_an_absurd_capacity_is_an_error() {
    let (cache, backing) = counted();
    let mut bytes: Vec<u8, _> = Vec::new_in(cache.clone());
    bytes.extend_from_slice(b"keep me");
    assert!(bytes.try_reserve(usize::MAX).is_err());
    assert!(bytes.try_reserve(isize::MAX as usize - 10).is_err());
    assert!(bytes.try_reserve_exact(isize::MAX as usize / 2).is_err());
    assert_eq!(&bytes[..], b"keep me");
    let mut words: Vec<u64, _> = Vec::new_in(cache.clone());
    assert!(words.try_reserve(isize::MAX as usize / 8).is_err());
    assert!(words.try_reserve(usize::MAX / 8).is_err());
    words.push(5);
    assert_eq!(words[0], 5);
    let stats = cache.stats();
    // Overflowing capacities never reach the allocator; the other three do.
    assert_eq!(stats.failures, 3, "{stats:?}");
    assert_eq!(stats.blocks_in_use, 2);
    drop((bytes, words));
    assert_nothing_lost(&cache, &backing);
}

#[test]
fn a_failed_grow_leaves_the_old_block_valid() {
    let (cache, backing) = counted();
    let old = layout(300, 16);
    let block = cache.allocate(old).unwrap();
    write(block, pattern(7, 300));
    cache_blocks(&cache, 2, 50);

    backing.fail_next(2);
    // SAFETY: `block` is live for `old`; 600 >= 300.
    let grown = unsafe { cache.grow(block.cast(), old, layout(600, 16)) };
    assert_eq!(grown, Err(AllocError));
    assert_eq!(read(block.cast(), 300), pattern(7, 300));
    let stats = cache.stats();
    assert_eq!(
        (stats.failures, stats.retries, stats.blocks_in_use),
        (1, 1, 1)
    );
    assert_eq!((stats.bytes_in_use, stats.bytes_cached), (300, 0));
    assert_nothing_lost(&cache, &backing);

    // A shrink into another alignment class needs a new block too.
    backing.fail_next(2);
    // SAFETY: as above; 200 <= 300.
    let shrunk = unsafe { cache.shrink(block.cast(), old, layout(200, 4096)) };
    assert_eq!(shrunk, Err(AllocError));
    assert_eq!(read(block.cast(), 300), pattern(7, 300));

    // The same grow now succeeds and keeps the contents.
    // SAFETY: as above.
    let grown = unsafe { cache.grow(block.cast(), old, layout(600, 16)) }.unwrap();
    assert_eq!(read(grown.cast(), 300), pattern(7, 300));
    // SAFETY: `grown` is live for (600, 16).
    unsafe { cache.deallocate(grown.cast(), layout(600, 16)) };
    assert_nothing_lost(&cache, &backing);
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn a_vec_that_cannot_grow_keeps_its_elements() {
    let (cache, backing) = counted();
    let mut v: Vec<u32, _> = Vec::with_capacity_in(100, cache.clone());
    v.extend(0..100);
    backing.fail_all(true);
    assert!(v.try_reserve(1).is_err());
    assert!(v.try_reserve_exact(1000).is_err());
    assert_eq!(v.len(), 100);
    assert_eq!(v.capacity(), 100);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    // A map that cannot grow stays intact too.
    let mut map = hashbrown::HashMap::new_in(cache.clone());
    assert!(map.try_reserve(10).is_err());
    backing.fail_all(false);
    map.insert(1, 2);
    v.push(100);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    assert_eq!(map[&1], 2);
    drop((v, map));
    assert_nothing_lost(&cache, &backing);
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn failing_fixture_scripts_decisions() {
    // The fixture itself: a script is consumed front first, then attempts
    // succeed; leaks would still be caught by the Counting underneath.
    let backing = Counting::new();
    backing.script([false, true, false]);
    assert!(backing.allocate(layout(8, 8)).is_ok());
    assert!(backing.allocate(layout(8, 8)).is_err());
    assert!(backing.allocate(layout(8, 8)).is_ok());
    assert!(backing.allocate(layout(8, 8)).is_ok());
    assert_eq!((backing.attempts(), backing.refused()), (4, 1));
    assert_eq!(backing.live_blocks(), 3);
    for (addr, l) in backing.live_layouts() {
        // SAFETY: live blocks of this backing with their recorded layouts.
        unsafe { backing.deallocate(NonNull::new(addr as *mut u8).unwrap(), l) };
    }
    assert_eq!(backing.live_blocks(), 0);
}

/// Runs `f`, which must panic with a message containing `expected`.
fn assert_panics(expected: &str, f: impl FnOnce()) {
    let payload = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .expect_err("the fixture should have panicked");
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert!(message.contains(expected), "panicked with {message:?}");
}

#[test]
fn counting_fixture_catches_a_double_return() {
    let backing = Counting::new();
    let block = backing.allocate(layout(32, 64)).unwrap();
    // SAFETY: a valid return.
    unsafe { backing.deallocate(block.cast(), layout(32, 64)) };
    // SAFETY: the second return is the bug under test, caught by the ledger
    // before it reaches the global allocator.
    assert_panics("not live", || unsafe {
        backing.deallocate(block.cast(), layout(32, 64))
    });
    assert_eq!((backing.allocs(), backing.frees()), (1, 1));
}

#[test]
fn counting_fixture_catches_a_layout_mismatch() {
    let backing = Counting::new();
    let block = backing.allocate(layout(32, 64)).unwrap();
    // SAFETY: the mismatch is caught by the ledger before the global
    // allocator sees it.
    assert_panics("different layout", || unsafe {
        backing.deallocate(block.cast(), layout(32, 8))
    });
    assert_eq!(backing.live_blocks(), 1);
    // SAFETY: the proper return.
    unsafe { backing.deallocate(block.cast(), layout(32, 64)) };
    assert_eq!(backing.live_blocks(), 0);
}

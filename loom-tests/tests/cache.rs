//! Loom models of one cache shared by threads. The library builds its lock
//! and `Arc` from loom under `--cfg loom` (src/sync.rs), so every
//! interleaving of its critical sections is explored (up to the preemption
//! bound: `LOOM_MAX_PREEMPTIONS`, default 2).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`.
#![cfg(loom)]

use std::collections::BTreeMap;

use caching_allocator::{Allocator, CachingAllocator, Stats};
use core::alloc::Layout;
use loom::sync::{Arc, Mutex};
use loom::thread;
use loom_tests::{Block, Counting, Hooked, model};

const SIZE: usize = 16;

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 8).unwrap()
}

/// Relations every snapshot must satisfy, whatever is in flight: it is taken
/// under the cache's lock and each counter update is atomic with its peers.
fn assert_consistent(stats: &Stats, size: usize) {
    assert_eq!(stats.bytes_in_use, stats.blocks_in_use * size, "{stats:?}");
    assert_eq!(stats.bytes_cached, stats.blocks_cached * size, "{stats:?}");
    assert_eq!(
        stats.bytes_reserved,
        stats.bytes_in_use + stats.bytes_cached,
        "{stats:?}"
    );
    assert_eq!(
        stats.hits + stats.misses - stats.frees,
        stats.blocks_in_use as u64,
        "{stats:?}"
    );
    assert_eq!(
        stats.backing_allocs - stats.backing_frees,
        (stats.blocks_in_use + stats.blocks_cached) as u64,
        "{stats:?}"
    );
    assert_eq!(stats.backing_allocs, stats.misses, "{stats:?}");
    assert!(stats.peak_bytes_in_use >= stats.bytes_in_use, "{stats:?}");
    assert!(stats.peak_bytes_cached >= stats.bytes_cached, "{stats:?}");
    assert!(
        stats.peak_bytes_reserved >= stats.bytes_reserved,
        "{stats:?}"
    );
}

fn counted() -> (CachingAllocator<Counting>, Counting) {
    let backing = Counting::default();
    (CachingAllocator::new_in(backing.clone()), backing)
}

/// At rest (no thread inside the cache): the cache and its backing agree;
/// then the cache is dropped and every block it took has gone back, once.
fn assert_at_rest_then_drop(cache: CachingAllocator<Counting>, backing: &Counting) {
    let stats = cache.stats();
    assert_consistent(&stats, SIZE);
    assert_eq!(
        backing.live_blocks(),
        stats.blocks_in_use + stats.blocks_cached
    );
    assert_eq!(backing.live_bytes(), stats.bytes_reserved);
    assert_eq!(
        backing.allocs_and_frees(),
        (stats.backing_allocs, stats.backing_frees)
    );
    drop(cache);
    let (allocs, frees) = backing.allocs_and_frees();
    assert_eq!(backing.live_blocks(), 0);
    assert_eq!(allocs, frees);
}

/// Takes a block, stamps it with `owner`, lets others run, checks the stamp
/// and the ownership table, and frees it.
fn use_one_block(
    cache: &CachingAllocator<Counting>,
    owners: &Mutex<BTreeMap<usize, u8>>,
    owner: u8,
) {
    let block = cache.allocate(layout()).unwrap().cast::<u8>();
    let addr = block.as_ptr() as usize;
    let previous = owners.lock().unwrap().insert(addr, owner);
    assert_eq!(
        previous, None,
        "block {addr:#x} handed to {owner} while owned"
    );
    // SAFETY: a live block of SIZE bytes that this thread owns.
    unsafe { block.as_ptr().write_bytes(owner, SIZE) };
    thread::yield_now();
    // SAFETY: as above.
    let bytes = unsafe { std::slice::from_raw_parts(block.as_ptr(), SIZE) };
    assert!(
        bytes.iter().all(|&b| b == owner),
        "someone else wrote into {addr:#x}"
    );
    assert_eq!(owners.lock().unwrap().remove(&addr), Some(owner));
    // SAFETY: live for `layout()`, not used again.
    unsafe { cache.deallocate(block, layout()) };
}

#[test]
fn a_block_never_has_two_owners() {
    model(|| {
        let (cache, backing) = counted();
        let owners = Arc::new(Mutex::new(BTreeMap::new()));
        // Two spawned threads and the main thread: three owners.
        let threads: Vec<_> = (1..=2u8)
            .map(|owner| {
                let cache = cache.clone();
                let owners = owners.clone();
                thread::spawn(move || {
                    for _ in 0..2 {
                        use_one_block(&cache, &owners, owner);
                    }
                })
            })
            .collect();
        use_one_block(&cache, &owners, 3);
        for t in threads {
            t.join().unwrap();
        }
        let stats = cache.stats();
        assert_eq!((stats.hits + stats.misses, stats.frees), (5, 5));
        // At most three blocks were ever live at once, so at most three were
        // made.
        assert!((1..=3).contains(&stats.misses), "{stats:?}");
        assert_eq!(stats.bytes_in_use, 0);
        assert_at_rest_then_drop(cache, &backing);
    });
}

#[test]
fn release_cached_races_with_allocate_and_free() {
    model(|| {
        let (cache, backing) = counted();
        // One block cached before the race.
        let warm = cache.allocate(layout()).unwrap();
        // SAFETY: allocated just above with this layout.
        unsafe { cache.deallocate(warm.cast(), layout()) };

        let worker = {
            let cache = cache.clone();
            thread::spawn(move || {
                for round in 0..2u8 {
                    let block = cache.allocate(layout()).unwrap().cast::<u8>();
                    // SAFETY: a live block of SIZE bytes owned by this thread.
                    unsafe {
                        block.as_ptr().write_bytes(round, SIZE);
                        assert_eq!(*block.as_ptr().add(SIZE - 1), round);
                        cache.deallocate(block, layout());
                    }
                }
            })
        };
        let releaser = {
            let cache = cache.clone();
            thread::spawn(move || cache.release_cached())
        };
        let released = cache.release_cached();
        let released = released + releaser.join().unwrap();
        assert_eq!(released % SIZE, 0);
        worker.join().unwrap();

        let stats = cache.stats();
        assert_eq!((stats.hits + stats.misses, stats.frees), (3, 3));
        assert_eq!(stats.bytes_in_use, 0);
        assert_eq!(stats.releases, 2);
        assert_eq!(stats.bytes_released, released as u64);
        // Every block made was released or is still cached.
        assert_eq!(released / SIZE + stats.blocks_cached, stats.misses as usize);
        assert!(stats.blocks_cached <= 1, "{stats:?}");
        assert_at_rest_then_drop(cache, &backing);
    });
}

#[test]
fn stats_snapshots_are_consistent_under_traffic() {
    model(|| {
        let (cache, backing) = counted();
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let cache = cache.clone();
                thread::spawn(move || {
                    let a = cache.allocate(layout()).unwrap();
                    let b = cache.allocate(layout()).unwrap();
                    // SAFETY: both allocated above with this layout.
                    unsafe {
                        cache.deallocate(a.cast(), layout());
                        cache.deallocate(b.cast(), layout());
                    }
                })
            })
            .collect();
        for _ in 0..2 {
            assert_consistent(&cache.stats(), SIZE);
        }
        for worker in workers {
            worker.join().unwrap();
        }
        let stats = cache.stats();
        assert_eq!((stats.hits + stats.misses, stats.frees), (4, 4));
        assert!((2..=4).contains(&stats.misses), "{stats:?}");
        assert_eq!(stats.peak_bytes_reserved, stats.misses as usize * SIZE);
        assert!(stats.peak_bytes_in_use >= 2 * SIZE, "{stats:?}");
        assert_at_rest_then_drop(cache, &backing);
    });
}

#[test]
fn the_out_of_memory_retry_races_with_a_free() {
    model(|| {
        let (cache, backing) = counted();
        // One block cached, one held by the freeing thread.
        let cached = cache.allocate(layout()).unwrap();
        let held = Block(cache.allocate(layout()).unwrap().cast());
        // SAFETY: allocated above with this layout.
        unsafe { cache.deallocate(cached.cast(), layout()) };

        let freer = {
            let cache = cache.clone();
            thread::spawn(move || {
                let held = held;
                // SAFETY: live for `layout()`, owned by this thread.
                unsafe { cache.deallocate(held.0, layout()) };
            })
        };
        // Another size, so it misses; its first backing attempt fails.
        let big = Layout::from_size_align(2 * SIZE, 8).unwrap();
        backing.refuse_next(1);
        let block = cache.allocate(big).expect("the retry succeeds");
        freer.join().unwrap();

        let stats = cache.stats();
        assert_eq!((stats.retries, stats.releases, stats.failures), (1, 1, 0));
        assert_eq!(stats.bytes_in_use, 2 * SIZE);
        // The freed block was either released by the retry or is cached.
        assert!(stats.blocks_cached <= 1, "{stats:?}");
        assert_eq!(backing.live_bytes(), stats.bytes_reserved);
        assert_eq!(
            backing.allocs_and_frees(),
            (stats.backing_allocs, stats.backing_frees)
        );
        // SAFETY: allocated above with `big`.
        unsafe { cache.deallocate(block.cast(), big) };
        drop(cache);
        assert_eq!(backing.live_blocks(), 0);
    });
}

/// The backing reads the cache's stats from inside every call: loom reports
/// a deadlock if the cache called it with its lock held.
#[test]
fn the_backing_is_called_without_the_lock() {
    model(|| {
        let backing = Hooked::default();
        let cache = CachingAllocator::new_in(backing.clone());
        let peeked = cache.clone();
        backing.set_hook(move || {
            assert_consistent(&peeked.stats(), SIZE);
        });
        let worker = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = cache.allocate(layout()).unwrap();
                // SAFETY: allocated above with this layout.
                unsafe { cache.deallocate(block.cast(), layout()) };
            })
        };
        cache.release_cached();
        worker.join().unwrap();
        cache.release_cached();
        assert_eq!(backing.counting.live_blocks(), 0);
        // Break the cycle so the cache can drop.
        backing.clear_hook();
        drop(cache);
    });
}

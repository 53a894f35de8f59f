//! Front caches under a cap and a budget: a front holds only the credit the
//! shared cache granted it, counted against the cap and reserved on the
//! budget, so both hold at every moment; a drain (trim, release, a budget
//! eviction, cap pressure) takes the credit back.

use std::sync::Barrier;
use std::thread;

use crate::fixture::{Counting, Held, assert_cache_agrees, built, give_stamped as give, take};
use allocator_api2::alloc::Layout;
use caching_allocator::{Budget, CachingAllocator, FRONT_CACHE_BYTES};

fn block(size: usize) -> Layout {
    Layout::from_size_align(size, 64).unwrap()
}

fn capped(cap: usize) -> (CachingAllocator<Counting>, Counting) {
    built(
        CachingAllocator::builder()
            .max_cached_bytes(cap)
            .front_cache_bytes(FRONT_CACHE_BYTES),
    )
}

/// One thread: frees beyond the cap are given back, the front and the shared
/// cache together never hold more than the cap, and the stats agree with the
/// backing's ledger after every step.
#[test]
fn a_capped_cache_with_a_front_stays_within_the_cap() {
    let cap = 64 << 10;
    let (cache, backing) = capped(cap);
    let held: Vec<Held> = (0..40).map(|_| take(&cache, block(4096))).collect();
    for (freed, one) in held.into_iter().enumerate() {
        give(&cache, one);
        let stats = cache.stats();
        assert!(stats.bytes_cached <= cap, "{stats:?}");
        assert_eq!(
            stats.bytes_cached,
            ((freed + 1) * 4096).min(cap),
            "{stats:?}"
        );
        assert_cache_agrees(&stats, &backing);
    }
    // The cached blocks are hits again, from the front first.
    let again: Vec<Held> = (0..16).map(|_| take(&cache, block(4096))).collect();
    let stats = cache.stats();
    assert_eq!(stats.misses, 40);
    assert_eq!(stats.hits, 16);
    assert_eq!(stats.bytes_cached, 0);
    for one in again {
        give(&cache, one);
    }
    assert_eq!(cache.release_cached(), cap);
    assert_eq!(cache.stats().bytes_reserved, 0);
    backing.assert_all_returned();
}

/// Four threads on one capped cache: after they join, the cached bytes are
/// within the cap and the books agree; idle fronts' credit does not keep a
/// later free out (cap pressure drains them).
#[test]
fn threads_on_a_capped_cache_keep_the_cap() {
    let cap = 256 << 10;
    let (cache, backing) = capped(cap);
    let barrier = Barrier::new(5);
    thread::scope(|scope| {
        for thread in 0..4 {
            let (cache, barrier) = (&cache, &barrier);
            scope.spawn(move || {
                for round in 0..200 {
                    let size = 1024 << ((thread + round) % 5);
                    let blocks: Vec<Held> = (0..4).map(|_| take(cache, block(size))).collect();
                    for one in blocks {
                        give(cache, one);
                    }
                }
                // Idle, alive, holding fronts and credit.
                barrier.wait();
                barrier.wait();
            });
        }
        barrier.wait();
        struct Release<'a>(&'a Barrier);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.wait();
            }
        }
        let _release = Release(&barrier);
        let stats = cache.stats();
        assert!(stats.bytes_cached <= cap, "{stats:?}");
        assert_cache_agrees(&stats, &backing);
        // A block as large as the cap fits only once the idle fronts give
        // their credit back.
        let big = take(&cache, block(cap));
        give(&cache, big);
        let stats = cache.stats();
        assert!(stats.bytes_cached <= cap, "{stats:?}");
        assert_eq!(
            stats.bytes_cached, cap,
            "the big block is cached: {stats:?}"
        );
        assert_cache_agrees(&stats, &backing);
    });
    assert_eq!(cache.trim(0), cap);
    assert_eq!(cache.stats().bytes_reserved, 0);
    backing.assert_all_returned();
}

/// Two caches with fronts on one budget: the budget counts the fronts'
/// credit, never exceeds its limit, and an idle cache's fronts give their
/// credit back when the busy one needs room.
#[test]
fn a_budget_takes_back_an_idle_caches_front_credit() {
    let budget = Budget::new(512 << 10);
    let member = || {
        built(
            CachingAllocator::builder()
                .budget(&budget)
                .front_cache_bytes(FRONT_CACHE_BYTES),
        )
    };
    let (idle, idle_backing) = member();
    let (busy, busy_backing) = member();
    // The idle cache's thread frees into its front, then stays alive.
    let barrier = Barrier::new(2);
    thread::scope(|scope| {
        scope.spawn(|| {
            let blocks: Vec<Held> = (0..16).map(|_| take(&idle, block(16 << 10))).collect();
            for one in blocks {
                give(&idle, one);
            }
            barrier.wait();
            barrier.wait();
        });
        barrier.wait();
        // Whatever happens below, let the idle thread go (a failed check
        // must not leave it waiting).
        struct Release<'a>(&'a Barrier);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.wait();
            }
        }
        let _release = Release(&barrier);
        assert!(budget.bytes_cached() <= budget.limit(), "{budget:?}");
        assert_eq!(idle.stats().bytes_cached, 256 << 10);
        // The busy cache frees 448 KiB: the budget must take the idle
        // cache's front credit back to fit it.
        let blocks: Vec<Held> = (0..7).map(|_| take(&busy, block(64 << 10))).collect();
        for one in blocks {
            give(&busy, one);
            assert!(budget.bytes_cached() <= budget.limit(), "{budget:?}");
        }
        assert_eq!(busy.stats().bytes_cached, 448 << 10);
        assert!(idle.stats().bytes_cached <= 64 << 10, "{:?}", idle.stats());
        assert_cache_agrees(&idle.stats(), &idle_backing);
        assert_cache_agrees(&busy.stats(), &busy_backing);
    });
    idle.release_cached();
    busy.release_cached();
    assert_eq!(budget.bytes_cached(), 0, "{budget:?}");
    idle_backing.assert_all_returned();
    busy_backing.assert_all_returned();
}

//! Decay (`Builder::release_after`): free memory nobody reused for a whole
//! window goes back without a call from the user. With a manual clock
//! (`decay::Clock::manual`), windows close exactly when the test says; with
//! the background thread (`decay::spawn`), in real time over short windows.

use std::time::{Duration, Instant};

use allocator_api2::vec::Vec;
use caching_allocator::decay::{self, Clock};
use caching_allocator::{Budget, Builder, CachingAllocator, SizePolicy};

use crate::fixture::{Counting, give, l, take};

const WINDOW: Duration = Duration::from_secs(10);

fn policies() -> [SizePolicy; 3] {
    [
        SizePolicy::Exact,
        SizePolicy::PowerOfTwoDivisions(4),
        SizePolicy::BestFit,
    ]
}

fn decaying(policy: SizePolicy, clock: &Clock) -> Builder {
    CachingAllocator::builder()
        .size_policy(policy)
        .release_after(WINDOW)
        .decay_clock(clock)
}

/// Two buffers, one reused every half window, one used once: the idle one
/// goes after a whole window free, the busy one stays.
fn idle_goes_busy_stays<A: allocator_api2::alloc::Allocator>(
    cache: &CachingAllocator<A>,
    clock: &Clock,
    what: &str,
) {
    let idle = take(cache, l(300_000));
    let busy = take(cache, l(100_000));
    give(cache, idle);
    give(cache, busy);
    for _ in 0..3 {
        clock.advance(WINDOW / 2);
        give(cache, take(cache, l(100_000))); // a slow path each time
    }
    let stats = cache.stats();
    assert_eq!(stats.decays, 1, "{what}: one window closed: {stats:?}");
    assert_eq!(stats.bytes_decayed, 0, "{what}: both were freed inside it");
    for _ in 0..2 {
        clock.advance(WINDOW / 2);
        give(cache, take(cache, l(100_000)));
    }
    let stats = cache.stats();
    assert_eq!(stats.decays, 2, "{what}: {stats:?}");
    assert!(
        stats.bytes_decayed >= 300_000 && stats.bytes_decayed < 300_000 + 64 * 1024,
        "{what}: the idle buffer went, the busy one stayed: {stats:?}"
    );
    assert_eq!(stats.evictions, 0, "{what}: decay is not eviction");
    let again = take(cache, l(100_000));
    assert_eq!(cache.stats().misses, stats.misses, "{what}: still cached");
    give(cache, again);
}

#[test]
fn memory_free_a_whole_window_goes_back_and_memory_reused_stays() {
    for policy in [SizePolicy::Exact, SizePolicy::PowerOfTwoDivisions(4)] {
        let clock = Clock::manual();
        let backing = Counting::new();
        let cache = decaying(policy, &clock).build_in(backing.clone());
        idle_goes_busy_stays(&cache, &clock, &format!("{policy:?}"));
        drop(cache);
        backing.assert_all_returned();
    }
    // Best fit over its reservation: the idle bytes are uncommitted or
    // decommitted in place. No fronts: per-thread fronts (where the system
    // has no rseq: ThreadSanitizer, Miri, other systems) would serve the
    // busy 100 KB block without a slow path, and only slow paths (or the
    // background thread) look at the clock.
    let clock = Clock::manual();
    let cache = decaying(SizePolicy::BestFit, &clock)
        .front_cache_bytes(0)
        .build();
    idle_goes_busy_stays(&cache, &clock, "BestFit");
    let stats = cache.stats();
    assert!(stats.bytes_reserved < 300_000, "{stats:?}");
    // Best fit over fixed segments (a backing of the user's; Miri and other
    // systems for `build` too): the idle block's segment goes whole, the
    // busy block's stays.
    let clock = Clock::manual();
    let backing = Counting::new();
    let cache = decaying(SizePolicy::BestFit, &clock)
        .front_cache_bytes(0)
        .build_in(backing.clone());
    idle_goes_busy_stays(&cache, &clock, "BestFit over fixed segments");
    assert_eq!(backing.live_blocks(), 1, "the busy segment stays");
    drop(cache);
    backing.assert_all_returned();
}

/// The layout of the ledger's live block (a fixed segment) that holds `addr`.
fn segment_holding(backing: &Counting, addr: usize) -> std::alloc::Layout {
    backing
        .live_layouts()
        .into_iter()
        .find(|&(start, layout)| (start..start + layout.size()).contains(&addr))
        .map(|(_, layout)| layout)
        .expect("a live segment holds the block")
}

/// Best fit over fixed segments (`build_in`), with the fronts `builder`
/// has: an `idle` block and a `reused` one, each in a segment of its own,
/// both freed; every half window a block of `again` bytes (which best fit
/// carves from the reused one's segment) is taken and freed. Decay is
/// called by hand each half window, so that windows close also where a
/// front serves the blocks without a slow path. After two windows exactly the
/// idle block's segment has gone back, and the next `again` is served from
/// the segment that stayed.
fn only_the_idle_segment_goes(
    builder: Builder,
    clock: &Clock,
    idle: usize,
    reused: usize,
    again: usize,
    what: &str,
) {
    let backing = Counting::new();
    let cache = builder
        .size_policy(SizePolicy::BestFit)
        .release_after(WINDOW)
        .decay_clock(clock)
        .build_in(backing.clone());
    let idle = take(&cache, l(idle));
    let reused = take(&cache, l(reused));
    let idle_segment = segment_holding(&backing, idle.addr());
    let reused_segment = segment_holding(&backing, reused.addr());
    assert_eq!(backing.allocs(), 2, "{what}: a segment each");
    give(&cache, idle);
    give(&cache, reused);
    let half_window = |cache: &CachingAllocator<Counting>| {
        clock.advance(WINDOW / 2);
        cache.decay();
        give(cache, take(cache, l(again)));
    };
    for _ in 0..3 {
        half_window(&cache);
    }
    let stats = cache.stats();
    assert_eq!(stats.decays, 1, "{what}: one window closed: {stats:?}");
    assert_eq!(stats.bytes_decayed, 0, "{what}: both were freed inside it");
    assert_eq!(
        backing.allocs(),
        2,
        "{what}: {again} B fits the reused segment"
    );
    for _ in 0..2 {
        half_window(&cache);
    }
    let stats = cache.stats();
    assert_eq!(stats.decays, 2, "{what}: {stats:?}");
    assert_eq!(
        stats.bytes_decayed,
        idle_segment.size() as u64,
        "{what}: the idle segment ({} B) went, the reused one ({} B) stayed: {stats:?}",
        idle_segment.size(),
        reused_segment.size()
    );
    assert_eq!(stats.backing_frees, 1, "{what}: {stats:?}");
    assert_eq!(backing.frees(), 1, "{what}");
    assert_eq!(
        backing
            .live_layouts()
            .into_iter()
            .map(|(_, layout)| layout)
            .collect::<std::vec::Vec<_>>(),
        [reused_segment],
        "{what}: the reused segment is the one left"
    );
    assert_eq!(stats.evictions, 0, "{what}: decay is not eviction");
    assert_eq!(stats.releases, 0, "{what}: decay is not a release");
    let (hits, misses) = (stats.hits, stats.misses);
    let block = take(&cache, l(again));
    let stats = cache.stats();
    assert_eq!(backing.allocs(), 2, "{what}: no new segment: {stats:?}");
    assert_eq!(stats.misses, misses, "{what}: still cached: {stats:?}");
    assert_eq!(stats.hits, hits + 1, "{what}: a hit: {stats:?}");
    give(&cache, block);
    drop(cache);
    backing.assert_all_returned();
}

/// Best fit over fixed segments gives back a whole segment only when it was
/// wholly free the whole window: a small segment idle beside one whose
/// block is reused every half window goes alone (the free bytes that
/// stayed free all window, the idle segment and the reused one's tail, are
/// more than the idle segment, and no whole segment but the idle one may
/// go). With no fronts, per-thread fronts (which hold both blocks and serve
/// the reused one without a slow path until decay drains them) and the
/// default fronts.
#[test]
fn best_fit_over_fixed_segments_gives_back_only_the_segment_idle_a_whole_window() {
    let fronts = [
        (
            "no fronts",
            CachingAllocator::builder().front_cache_bytes(0),
        ),
        (
            "per-thread fronts",
            CachingAllocator::builder().per_cpu_fronts(false),
        ),
        ("default fronts", CachingAllocator::builder()),
    ];
    for (what, builder) in fronts {
        let clock = Clock::manual();
        only_the_idle_segment_goes(builder, &clock, 300_000, 100_000, 100_000, what);
    }
    // A small block reused in the smaller segment: freed onto a quick list
    // (best fit's exact-length lists of small blocks), it counts in its
    // segment when it merges.
    let clock = Clock::manual();
    let no_fronts = CachingAllocator::builder().front_cache_bytes(0);
    only_the_idle_segment_goes(no_fronts, &clock, 300_000, 100_000, 2_000, "quick list");
}

/// The mirror case: the idle segment is the small one, and the segment
/// reused every half window is a large one whose front part alone is
/// reused (most of it stays free all window, so the bytes free all window
/// are far more than the idle segment). Only the wholly idle segment goes:
/// a trim to the low-water mark by address takes the large one too (or
/// alone), and largest first takes the large one first.
#[test]
fn best_fit_over_fixed_segments_keeps_a_large_segment_whose_front_part_is_reused() {
    let clock = Clock::manual();
    only_the_idle_segment_goes(
        CachingAllocator::builder().front_cache_bytes(0),
        &clock,
        200_000,
        1_000_000,
        300_000,
        "no fronts",
    );
}

#[test]
fn the_exact_cache_keeps_c10s_semantics_and_best_fit_decays_by_default() {
    let clock = Clock::manual();
    let exact = CachingAllocator::builder().decay_clock(&clock).build();
    let best_fit = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .decay_clock(&clock)
        .build();
    for cache in [&exact, &best_fit] {
        drop(Vec::<u8, _>::with_capacity_in(1 << 20, cache.clone()));
    }
    for _ in 0..3 {
        clock.advance(caching_allocator::DEFAULT_RELEASE_AFTER);
        exact.decay();
        best_fit.decay();
    }
    assert_eq!(exact.stats().bytes_cached, 1 << 20, "{:?}", exact.stats());
    assert_eq!(exact.stats().decays, 0);
    assert_eq!(best_fit.stats().bytes_cached, 0, "{:?}", best_fit.stats());
    assert!(best_fit.stats().bytes_decayed >= 1 << 20);
    let never = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .release_after(Duration::MAX)
        .decay_clock(&clock)
        .build();
    drop(Vec::<u8, _>::with_capacity_in(1 << 20, never.clone()));
    clock.advance(Duration::from_secs(1 << 20));
    never.decay();
    assert_eq!(never.stats().bytes_cached, 1 << 20);
}

#[test]
fn decay_reaches_the_fronts_of_idle_threads() {
    for builder in [
        CachingAllocator::builder().size_policy(SizePolicy::BestFit),
        CachingAllocator::builder()
            .size_policy(SizePolicy::BestFit)
            .per_cpu_fronts(false),
        CachingAllocator::builder().front_cache_bytes(caching_allocator::FRONT_CACHE_BYTES),
    ] {
        let clock = Clock::manual();
        let cache = builder.release_after(WINDOW).decay_clock(&clock).build();
        let (park, parked) = std::sync::mpsc::channel::<()>();
        let (ready, readied) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|threads| {
            let cache = &cache;
            threads.spawn(move || {
                // Small blocks: they stay in this thread's (or CPU's) front.
                let held: std::vec::Vec<_> = (0..8).map(|_| take(cache, l(1000))).collect();
                held.into_iter().for_each(|held| give(cache, held));
                ready.send(()).unwrap();
                let _ = parked.recv(); // idle, alive
            });
            readied.recv().unwrap();
            assert!(cache.stats().bytes_cached >= 8000);
            for _ in 0..2 {
                clock.advance(WINDOW);
                cache.decay();
            }
            let stats = cache.stats();
            assert!(
                stats.bytes_cached < 8000,
                "{:?}: {stats:?}",
                cache.front_kind()
            );
            assert!(stats.bytes_decayed >= 8000, "{stats:?}");
            park.send(()).unwrap();
        });
    }
}

#[test]
fn decay_keeps_the_budget_in_step() {
    let clock = Clock::manual();
    let budget = Budget::new(4 << 20);
    let caches: std::vec::Vec<_> = policies()
        .into_iter()
        .map(|policy| decaying(policy, &clock).budget(&budget).build())
        .collect();
    for cache in &caches {
        drop(Vec::<u8, _>::with_capacity_in(600_000, cache.clone()));
    }
    assert!(budget.bytes_cached() >= 3 * 600_000);
    for _ in 0..2 {
        clock.advance(WINDOW);
        for cache in &caches {
            cache.decay();
        }
    }
    let cached: usize = caches.iter().map(|cache| cache.stats().bytes_cached).sum();
    assert_eq!(cached, 0);
    assert_eq!(budget.bytes_cached(), 0);
}

#[test]
fn the_background_thread_gives_back_what_an_idle_program_holds() {
    if cfg!(miri) {
        return; // real time, and Miri's clock is slow
    }
    let window = Duration::from_millis(40);
    let _decay = decay::spawn();
    let caches: std::vec::Vec<_> = policies()
        .into_iter()
        .map(|policy| {
            CachingAllocator::builder()
                .size_policy(policy)
                .release_after(window)
                .build()
        })
        .collect();
    for cache in &caches {
        drop(Vec::<u8, _>::with_capacity_in(1 << 20, cache.clone()));
    }
    // No call at all from here on: only the thread can give it back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while caches.iter().any(|cache| cache.stats().bytes_cached > 0) {
        assert!(Instant::now() < deadline, "nothing decayed in 10 s");
        std::thread::sleep(window);
    }
    let first = caches
        .iter()
        .map(|cache| cache.stats().bytes_decayed)
        .min()
        .unwrap();
    assert!(first >= 1 << 20);
}

/// A cache built while the thread naps (a second, with no cache of a short
/// window to look after) wakes it: its memory goes back within a few of its
/// windows, not after the nap. Run alone, a thread that is not woken fails
/// this; beside other tests, their short windows may wake it earlier, which
/// only makes it pass.
#[test]
fn a_new_cache_wakes_the_napping_thread() {
    if cfg!(miri) {
        return; // real time, and Miri's clock is slow
    }
    let window = Duration::from_millis(20);
    let _decay = decay::spawn();
    std::thread::sleep(Duration::from_millis(100)); // it naps now
    let cache = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .release_after(window)
        .build();
    drop(Vec::<u8, _>::with_capacity_in(1 << 20, cache.clone()));
    let started = Instant::now();
    while cache.stats().bytes_cached > 0 {
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "not given back in 800 ms: {}",
            cache.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// With the system's clock, the slow paths look at it once in a few dozen
/// calls: a program that keeps calling still decays, without the thread.
#[test]
fn slow_paths_read_the_system_clock_often_enough() {
    for policy in policies() {
        let cache = CachingAllocator::builder()
            .size_policy(policy)
            .release_after(Duration::from_millis(20))
            .build();
        let idle = take(&cache, l(300_000));
        give(&cache, idle);
        // Two windows pass: the first closes with the idle block free, the
        // second with it still unused.
        let started = Instant::now();
        while cache.stats().decays < 2 && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(25));
            // A few dozen slow-path calls (blocks too large for any front).
            for _ in 0..64 {
                give(&cache, take(&cache, l(100_000)));
            }
        }
        let stats = cache.stats();
        assert!(stats.decays >= 2, "{policy:?}: {stats}");
        // Best fit carves the busy blocks out of the idle one's range: what
        // stays free all along is the rest of it.
        assert!(
            stats.bytes_decayed >= 150_000,
            "{policy:?}: the idle block stayed: {stats}"
        );
    }
}

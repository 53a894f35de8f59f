//! One cache shared by several threads through clones, with blocks freed on
//! other threads than the ones that allocated them.

use std::sync::mpsc;
use std::thread;

use crate::fixture::Counting;
use allocator_api2::alloc::Global;
use allocator_api2::boxed::Box;
use allocator_api2::vec::Vec;
use caching_allocator::CachingAllocator;

const THREADS: usize = 4;
const ROUNDS: usize = 300;
const SIZES: [usize; 6] = [1, 24, 64, 100, 1000, 4096];

/// A block in flight between threads: (sender, round, block).
type Parcel = (usize, usize, Vec<u8, CachingAllocator<Counting>>);

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn the_handle_is_send_and_sync() {
    assert_send_sync::<CachingAllocator>();
    assert_send_sync::<CachingAllocator<Global>>();
    assert_send_sync::<CachingAllocator<Counting>>();
    assert_send_sync::<Vec<u8, CachingAllocator>>();
    assert_send_sync::<Box<[u64], CachingAllocator>>();
}

/// The bytes thread `thread` writes in its `round`-th block of `len` bytes.
fn stamp(thread: usize, round: usize, len: usize) -> impl Iterator<Item = u8> {
    (0..len).map(move |i| (thread * 61 + round * 7 + i) as u8)
}

#[test]
fn threads_share_one_cache_and_free_each_others_blocks() {
    let backing = Counting::new();
    let cache = CachingAllocator::new_in(backing.clone());
    // Thread t sends some of its blocks to thread t + 1, which checks and
    // frees them.
    let (senders, receivers): (std::vec::Vec<_>, std::vec::Vec<_>) =
        (0..THREADS).map(|_| mpsc::channel()).unzip();
    let mut receivers: std::vec::Vec<Option<mpsc::Receiver<Parcel>>> =
        receivers.into_iter().map(Some).collect();

    let allocations: usize = thread::scope(|scope| {
        let handles: std::vec::Vec<_> = (0..THREADS)
            .map(|t| {
                let cache = cache.clone();
                let to_next = senders[(t + 1) % THREADS].clone();
                let from_prev = receivers[t].take().unwrap();
                scope.spawn(move || {
                    let mut held = std::vec::Vec::new();
                    let mut allocations = 0;
                    for round in 0..ROUNDS {
                        let size = SIZES[(round + t) % SIZES.len()];
                        let mut block: Vec<u8, _> = Vec::with_capacity_in(size, cache.clone());
                        allocations += 1;
                        block.extend(stamp(t, round, size));
                        if round % 3 == 0 {
                            to_next.send((t, round, block)).unwrap();
                        } else {
                            held.push((round, block));
                        }
                        // Free some of the held ones, oldest first, after a
                        // check that no other thread wrote into them.
                        if held.len() > 4 {
                            let (round, block) = held.remove(0);
                            assert!(block.iter().copied().eq(stamp(t, round, block.len())));
                        }
                        // Free what the previous thread sent over.
                        while let Ok((from, round, block)) = from_prev.try_recv() {
                            assert!(block.iter().copied().eq(stamp(from, round, block.len())));
                        }
                    }
                    drop(to_next);
                    for (round, block) in held {
                        assert!(block.iter().copied().eq(stamp(t, round, block.len())));
                    }
                    // Everything still in flight is freed here, on the
                    // receiving thread.
                    for (from, round, block) in from_prev {
                        assert!(block.iter().copied().eq(stamp(from, round, block.len())));
                    }
                    allocations
                })
            })
            .collect();
        drop(senders);
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });

    assert_eq!(allocations, THREADS * ROUNDS);
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.misses, allocations as u64);
    assert_eq!(stats.frees, allocations as u64);
    assert_eq!((stats.bytes_in_use, stats.blocks_in_use), (0, 0));
    assert_eq!(stats.bytes_reserved, stats.bytes_cached);
    assert!(stats.hits > stats.misses, "{stats}");
    assert_eq!(backing.allocs(), stats.misses);
    assert_eq!(backing.live_bytes(), stats.bytes_cached);
    assert_eq!(backing.live_blocks(), stats.blocks_cached);

    assert_eq!(cache.release_cached(), stats.bytes_cached);
    assert_eq!(backing.live_blocks(), 0);
    drop(cache);
    assert_eq!(backing.frees(), backing.allocs());
}

#[test]
fn release_cached_and_stats_race_with_traffic() {
    let backing = Counting::new();
    let cache = CachingAllocator::new_in(backing.clone());
    thread::scope(|scope| {
        for t in 0..THREADS - 1 {
            let cache = cache.clone();
            scope.spawn(move || {
                for round in 0..ROUNDS {
                    let size = SIZES[(round * 5 + t) % SIZES.len()];
                    let mut block: Vec<u8, _> = Vec::with_capacity_in(size, cache.clone());
                    block.extend(stamp(t, round, size));
                    let mut other = Box::new_in([t as u64; 8], cache.clone());
                    other[3] = round as u64;
                    assert!(block.iter().copied().eq(stamp(t, round, size)));
                    assert_eq!((other[0], other[3]), (t as u64, round as u64));
                }
            });
        }
        let cache = cache.clone();
        scope.spawn(move || {
            for _ in 0..ROUNDS {
                cache.release_cached();
                // Every snapshot is taken under the lock: its fields agree.
                let stats = cache.stats();
                assert_eq!(
                    stats.bytes_reserved,
                    stats.bytes_in_use + stats.bytes_cached
                );
                assert_eq!(
                    stats.hits + stats.misses - stats.frees,
                    stats.blocks_in_use as u64
                );
                assert_eq!(
                    stats.backing_allocs - stats.backing_frees,
                    (stats.blocks_in_use + stats.blocks_cached) as u64
                );
                assert!(stats.peak_bytes_in_use >= stats.bytes_in_use);
                assert!(stats.peak_bytes_reserved >= stats.bytes_reserved);
            }
        });
    });
    let stats = cache.stats();
    assert_eq!(
        stats.hits + stats.misses,
        (2 * (THREADS - 1) * ROUNDS) as u64
    );
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(backing.live_bytes(), stats.bytes_cached);
    assert_eq!(
        backing.allocs() - backing.frees(),
        stats.blocks_cached as u64
    );
    drop(cache);
    backing.assert_all_returned();
}

#[test]
fn the_last_handle_may_drop_on_another_thread() {
    let backing = Counting::new();
    let cache = CachingAllocator::new_in(backing.clone());
    let v: Vec<u32, _> = (0..1000).fold(Vec::new_in(cache.clone()), |mut v, i| {
        v.push(i);
        v
    });
    drop(cache);
    let backing2 = backing.clone();
    thread::spawn(move || {
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        drop(v);
        assert!(backing2.live_blocks() == 0);
    })
    .join()
    .unwrap();
    assert_eq!(backing.frees(), backing.allocs());
}

/// Best fit over its own reserved range (and over fixed segments): threads
/// carve, free each other's blocks, grow and shrink in place, while one
/// thread trims, releases and reads the stats. Blocks keep their contents,
/// every snapshot agrees with itself, and with nothing live a release leaves
/// nothing reserved.
#[test]
fn best_fit_threads_carve_and_free_while_one_trims() {
    use caching_allocator::SizePolicy;

    let backing = Counting::new();
    // No fronts: the books are checked exactly while the threads run (the
    // per-CPU fronts' suite, `per_cpu.rs`, runs the same traffic through
    // them and checks the books at rest).
    let best_fit = || {
        CachingAllocator::builder()
            .size_policy(SizePolicy::BestFit)
            .front_cache_bytes(0)
    };
    let caches = [best_fit().build(), best_fit().build_in(Global)];
    let fixed = best_fit().build_in(backing.clone());
    // Each trim and release is a system call under the lock: fewer rounds.
    const BEST_FIT_ROUNDS: usize = 100;
    // Sizes on both sides of the quick lists' limit (4 KiB) and of a page.
    const BEST_FIT_SIZES: [usize; 6] = [24, 1000, 4096, 5000, 70_000, 300_000];
    fn traffic<A: allocator_api2::alloc::Allocator + Clone + Send + Sync>(
        cache: &CachingAllocator<A>,
        sizes: &[usize],
        stats: impl Fn() -> caching_allocator::Stats + Sync,
    ) {
        thread::scope(|scope| {
            for t in 0..THREADS - 1 {
                let cache = cache.clone();
                scope.spawn(move || {
                    let mut held: std::vec::Vec<(usize, Vec<u8, _>)> = std::vec::Vec::new();
                    for round in 0..BEST_FIT_ROUNDS {
                        let size = sizes[(round * 7 + t) % sizes.len()];
                        let mut block: Vec<u8, _> = Vec::with_capacity_in(size, cache.clone());
                        block.extend(stamp(t, round, size));
                        held.push((round, block));
                        if held.len() > 3 {
                            let (round, mut block) = held.remove(round % 3);
                            assert!(block.iter().copied().eq(stamp(t, round, block.len())));
                            // Shrink in place (a tail goes back), then free.
                            let len = block.len() / 2;
                            block.truncate(len);
                            block.shrink_to_fit();
                            assert!(block.iter().copied().eq(stamp(t, round, len)));
                        }
                    }
                    for (round, block) in held {
                        assert!(block.iter().copied().eq(stamp(t, round, block.len())));
                    }
                });
            }
            let cache = cache.clone();
            let stats = &stats;
            scope.spawn(move || {
                for round in 0..BEST_FIT_ROUNDS {
                    match round % 3 {
                        0 => drop(cache.trim(1 << 20)),
                        1 => drop(cache.release_cached()),
                        _ => drop(cache.trim(0)),
                    }
                    let s = stats();
                    assert_eq!(
                        s.bytes_in_use + s.bytes_lost_to_rounding + s.bytes_cached,
                        s.bytes_reserved,
                        "{s:?}"
                    );
                    assert!(s.bytes_pinned <= s.bytes_cached, "{s:?}");
                }
            });
        });
        cache.release_cached();
        let s = stats();
        assert_eq!((s.bytes_in_use, s.blocks_in_use), (0, 0), "{s:?}");
        assert_eq!(
            (s.bytes_reserved, s.bytes_cached, s.bytes_decommitted),
            (0, 0, 0),
            "{s:?}"
        );
        assert_eq!(s.frees, s.hits + s.misses, "{s:?}");
    }
    for cache in &caches {
        traffic(cache, &BEST_FIT_SIZES, || cache.stats());
    }
    traffic(&fixed, &BEST_FIT_SIZES, || fixed.stats());
    drop(fixed);
    backing.assert_all_returned();
}

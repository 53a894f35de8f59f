//! The hit path: one allocation and one deallocation of the same size, again
//! and again, with no writes to the block (the allocator's own cost only).
//!
//! - `hit_path/{cache,system,mimalloc}/SIZE`: one thread; the cache is warm
//!   (a first allocation primed its free list), so every iteration is a hit.
//! - `hit_path_threads/.../SIZE`: time per alloc+free pair for one thread
//!   alone, for two threads sharing one cache (contention on its lock), and
//!   for two threads each with its own cache (no contention: what the two
//!   cores give). Each two-thread sample is the wall time of both threads
//!   doing `iters` pairs each, divided by 2, so every row reads as time per
//!   pair of the whole process: 1 / throughput. The throughput ratio of two
//!   threads to one is `1-thread time / 2-thread time`.
//!
//! See benches/README.md for commands and caveats; docs/benches.md for the
//! figures (`python3 scripts/report.py --only benches` writes it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use allocator_api2::alloc::Allocator;
use caching_allocator::{CachingAllocator, FRONT_CACHE_BYTES, SizePolicy};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mimalloc::MiMalloc;

/// c10 allocates every CPU block 64-byte aligned.
const ALIGN: usize = 64;

const SIZES: [(usize, &str); 5] = [
    (64, "64B"),
    (4 << 10, "4KiB"),
    (64 << 10, "64KiB"),
    (1 << 20, "1MiB"),
    (16 << 20, "16MiB"),
];

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, ALIGN).expect("valid layout")
}

/// One alloc+free pair through the cache.
#[inline]
fn cache_pair(cache: &CachingAllocator, layout: Layout) {
    let block = cache.allocate(layout).expect("allocation");
    let block: NonNull<u8> = black_box(block.cast());
    // SAFETY: just allocated by this cache with `layout`, not used again.
    unsafe { cache.deallocate(block, layout) };
}

/// A cache with per-thread front caches (`FRONT_CACHE_BYTES` each).
fn with_front(policy: SizePolicy) -> CachingAllocator {
    CachingAllocator::builder()
        .size_policy(policy)
        .front_cache_bytes(FRONT_CACHE_BYTES)
        .build()
}

/// One alloc+free pair through a `GlobalAlloc`.
#[inline]
fn global_pair<G: GlobalAlloc>(alloc: &G, layout: Layout) {
    // SAFETY: `layout` is not zero-sized.
    let block = black_box(unsafe { alloc.alloc(layout) });
    assert!(!block.is_null());
    // SAFETY: just allocated with `layout`, not used again.
    unsafe { alloc.dealloc(block, layout) };
}

fn hit_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("hit_path");
    for (size, label) in SIZES {
        let layout = layout(size);
        let cache = CachingAllocator::new();
        cache_pair(&cache, layout); // prime the free list
        group.bench_with_input(BenchmarkId::new("cache", label), &layout, |b, &layout| {
            b.iter(|| cache_pair(&cache, layout));
        });
        let stats = cache.stats();
        assert_eq!(stats.misses, 1, "every iteration after the first is a hit");
        for (name, policy) in [
            ("front", SizePolicy::Exact),
            ("bestfit_front", SizePolicy::BestFit),
        ] {
            let front = with_front(policy);
            cache_pair(&front, layout);
            group.bench_with_input(BenchmarkId::new(name, label), &layout, |b, &layout| {
                b.iter(|| cache_pair(&front, layout));
            });
            let stats = front.stats();
            assert_eq!(stats.misses, 1, "every iteration after the first is a hit");
        }
        // Best fit, with live neighbours on both sides of the freed block's
        // range: every free merges with a free neighbour, every allocation
        // splits a range.
        let best_fit = CachingAllocator::builder()
            .size_policy(SizePolicy::BestFit)
            .build();
        let neighbours: Vec<_> = (0..8)
            .map(|_| best_fit.allocate(layout).expect("allocation"))
            .collect();
        // SAFETY: allocated just above with `layout`, not used again.
        unsafe { best_fit.deallocate(neighbours[3].cast(), layout) };
        let misses = best_fit.stats().misses;
        group.bench_with_input(BenchmarkId::new("bestfit", label), &layout, |b, &layout| {
            b.iter(|| cache_pair(&best_fit, layout));
        });
        assert_eq!(best_fit.stats().misses, misses, "every iteration is a hit");
        for (i, block) in neighbours.into_iter().enumerate() {
            if i != 3 {
                // SAFETY: as above.
                unsafe { best_fit.deallocate(block.cast(), layout) };
            }
        }
        group.bench_with_input(BenchmarkId::new("system", label), &layout, |b, &layout| {
            b.iter(|| global_pair(&System, layout));
        });
        group.bench_with_input(
            BenchmarkId::new("mimalloc", label),
            &layout,
            |b, &layout| {
                b.iter(|| global_pair(&MiMalloc, layout));
            },
        );
    }
    group.finish();
}

/// Wall time of `threads` threads each doing `pairs` alloc+free pairs, each on
/// the cache `cache_for(thread)` gives, started together on a barrier.
fn threaded_pairs(
    threads: usize,
    pairs: u64,
    layout: Layout,
    cache_for: impl Fn(usize) -> CachingAllocator,
) -> Duration {
    let barrier = Barrier::new(threads + 1);
    let caches: Vec<CachingAllocator> = (0..threads).map(&cache_for).collect();
    for cache in &caches {
        cache_pair(cache, layout); // prime
    }
    std::thread::scope(|scope| {
        for cache in &caches {
            let cache = cache.clone();
            let barrier = &barrier;
            scope.spawn(move || {
                barrier.wait();
                for _ in 0..pairs {
                    cache_pair(&cache, layout);
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed()
    })
}

fn hit_path_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("hit_path_threads");
    for (size, label) in [SIZES[0], SIZES[2]] {
        let layout = layout(size);
        group.bench_with_input(
            BenchmarkId::new("cache_1_thread", label),
            &layout,
            |b, &layout| {
                let cache = CachingAllocator::new();
                cache_pair(&cache, layout);
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        cache_pair(&cache, layout);
                    }
                    start.elapsed()
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("cache_2_threads_shared", label),
            &layout,
            |b, &layout| {
                let shared = CachingAllocator::new();
                b.iter_custom(|iters| threaded_pairs(2, iters, layout, |_| shared.clone()) / 2);
            },
        );
        group.bench_with_input(
            BenchmarkId::new("front_1_thread", label),
            &layout,
            |b, &layout| {
                let cache = with_front(SizePolicy::Exact);
                cache_pair(&cache, layout);
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        cache_pair(&cache, layout);
                    }
                    start.elapsed()
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new("front_2_threads_shared", label),
            &layout,
            |b, &layout| {
                let shared = with_front(SizePolicy::Exact);
                b.iter_custom(|iters| threaded_pairs(2, iters, layout, |_| shared.clone()) / 2);
            },
        );
        group.bench_with_input(
            BenchmarkId::new("cache_2_threads_own", label),
            &layout,
            |b, &layout| {
                b.iter_custom(|iters| {
                    threaded_pairs(2, iters, layout, |_| CachingAllocator::new()) / 2
                });
            },
        );
    }
    group.finish();
}

/// What the owner's side of a front cache's drain protocol costs per
/// access, against the alternative the issue names: a per-thread lock that
/// is never contended. `flag`: a store, a compiler fence, a load and a store
/// (what `front.rs` does with `membarrier` on the drainer's side);
/// `seqcst_fence`: the same with a full fence (the fallback without
/// `membarrier`); `uncontended_mutex`: `std::sync::Mutex` lock and unlock.
/// A hit and a free each pay one access.
fn front_protocol(c: &mut Criterion) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering, compiler_fence, fence};
    let mut group = c.benchmark_group("front_protocol");
    let (active, drain) = (AtomicBool::new(false), AtomicBool::new(false));
    let mut counter = 0u64;
    group.bench_function("flag", |b| {
        b.iter(|| {
            active.store(true, Ordering::Relaxed);
            compiler_fence(Ordering::SeqCst);
            if !drain.load(Ordering::Acquire) {
                counter = black_box(counter + 1);
            }
            active.store(false, Ordering::Release);
        })
    });
    group.bench_function("seqcst_fence", |b| {
        b.iter(|| {
            active.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if !drain.load(Ordering::Acquire) {
                counter = black_box(counter + 1);
            }
            active.store(false, Ordering::Release);
        })
    });
    let lock = Mutex::new(0u64);
    group.bench_function("uncontended_mutex", |b| {
        b.iter(|| {
            let mut guard = lock.lock().expect("not poisoned");
            *guard = black_box(*guard + 1);
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Modest defaults (the whole file runs in about a minute and a half);
    // command-line flags override them.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40);
    targets = hit_path, hit_path_threads, front_protocol
}
criterion_main!(benches);

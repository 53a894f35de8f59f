//! What a snapshot costs, and what recording the history adds to a hit.
//!
//! - `snapshot/best_fit_100k`: `CachingAllocator::snapshot` on a best-fit
//!   cache holding 100,000 blocks in use with a free range beside every
//!   other one (about 50,000 free pieces), no history. The cache's lock is
//!   held while its books are copied, the rest runs outside it.
//! - `history/off` and `history/on`: a hit-and-free pair of 64 bytes on a
//!   best-fit cache without and with `record_history` (each recorded event
//!   is an atomic add and a few stores); with `--features backtrace` (this
//!   package's, which turns on the library's: `cargo bench -p
//!   caching-allocator-benches --features backtrace --bench snapshot`),
//!   `history/on_frames_16` also walks 16 frames of the stack an event.

use std::hint::black_box;

use allocator_api2::alloc::{Allocator, Layout};
use caching_allocator::{CachingAllocator, SizePolicy};
use criterion::{Criterion, criterion_group, criterion_main};

fn snapshot(c: &mut Criterion) {
    let cache = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .front_cache_bytes(0)
        .build();
    let layout = Layout::from_size_align(64, 64).unwrap();
    let blocks: Vec<_> = (0..150_000)
        .map(|_| cache.allocate(layout).expect("allocation"))
        .collect();
    for (i, block) in blocks.iter().enumerate() {
        if i % 3 == 1 {
            // SAFETY: allocated above with `layout`, freed once.
            unsafe { cache.deallocate(block.cast(), layout) };
        }
    }
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(20);
    group.bench_function("best_fit_100k", |b| b.iter(|| black_box(cache.snapshot())));
    group.finish();
    for (i, block) in blocks.iter().enumerate() {
        if i % 3 != 1 {
            // SAFETY: as above.
            unsafe { cache.deallocate(block.cast(), layout) };
        }
    }
}

fn history(c: &mut Criterion) {
    let layout = Layout::from_size_align(64, 64).unwrap();
    let mut group = c.benchmark_group("history");
    let mut cases = vec![("off", None, 0), ("on", Some(1 << 16), 0)];
    if cfg!(feature = "backtrace") {
        cases.push(("on_frames_16", Some(1 << 16), 16));
    }
    for (name, history, frames) in cases {
        let mut builder = CachingAllocator::builder().size_policy(SizePolicy::BestFit);
        if let Some(entries) = history {
            builder = builder.record_history(entries);
        }
        #[cfg(feature = "backtrace")]
        if frames > 0 {
            builder = builder.record_frames(frames);
        }
        let _ = frames;
        let cache = builder.build();
        group.bench_function(name, |b| {
            b.iter(|| {
                let block = cache.allocate(layout).expect("allocation");
                // SAFETY: just allocated with `layout`.
                unsafe { cache.deallocate(black_box(block).cast(), layout) };
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(700))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = snapshot, history
}
criterion_main!(benches);

//! `ScopedGlobal` as the `#[global_allocator]`: what code outside any scope
//! pays for it, and what a tensor workload gains inside a scope.
//!
//! `cargo bench --bench scoped_global`; see benches/README.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Duration;

use caching_allocator::{CachingAllocator, ScopedGlobal};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

#[global_allocator]
static GLOBAL: ScopedGlobal = ScopedGlobal::new();

/// alloc + dealloc of one size with no scope: through `ScopedGlobal`, and
/// through its inner allocator alone.
fn no_scope_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("global_no_scope");
    for size in [16usize, 64, 256, 1024, 64 * 1024] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        group.bench_with_input(BenchmarkId::new("system", size), &layout, |b, &layout| {
            b.iter(|| {
                // SAFETY: non-zero layout; freed right away with the same layout.
                unsafe {
                    let ptr = System.alloc(black_box(layout));
                    System.dealloc(black_box(ptr), layout);
                }
            })
        });
        group.bench_with_input(
            BenchmarkId::new("scoped_global", size),
            &layout,
            |b, &layout| {
                b.iter(|| {
                    // SAFETY: as above.
                    unsafe {
                        let ptr = GLOBAL.alloc(black_box(layout));
                        GLOBAL.dealloc(black_box(ptr), layout);
                    }
                })
            },
        );
    }
    group.finish();
}

/// One "pass" of a model: eight 1 MiB activations, each fully written and
/// freed when the next layer's is ready; with and without a cache scope.
fn tensor_pass(c: &mut Criterion) {
    const FLOATS: usize = 256 * 1024;
    fn pass() -> f32 {
        let mut activation = vec![1.0f32; FLOATS];
        for _layer in 0..8 {
            activation = vec![activation[FLOATS - 1] + 1.0; FLOATS];
        }
        black_box(activation[0])
    }
    let mut group = c.benchmark_group("tensor_pass");
    group.bench_function("no_scope", |b| b.iter(pass));
    let cache = CachingAllocator::new();
    group.bench_function("in_scope", |b| {
        let _scope = cache.enter();
        b.iter(pass)
    });
    group.finish();
    println!("cache after the in-scope runs:\n{}", cache.stats());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = no_scope_overhead, tensor_pass
}
criterion_main!(benches);

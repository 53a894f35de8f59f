//! A model written with ndarray, which knows nothing of allocators, run with
//! and without a cache scope: `cargo run --release --example scoped_mlp`.
//!
//! With `ScopedGlobal` installed, every activation ndarray allocates inside
//! `cache.enter()` (at least 4 KiB) comes from the cache: after the first pass
//! no call reaches the system allocator, and no page is faulted in again.

use std::time::{Duration, Instant};

use caching_allocator::{CachingAllocator, ScopedGlobal};
use ndarray::Array2;

#[global_allocator]
static GLOBAL: ScopedGlobal = ScopedGlobal::new();

const BATCH: usize = 256;
const WIDTHS: [usize; 5] = [512, 2048, 2048, 512, 10];
const PASSES: usize = 40;

/// Minor page faults of this process so far.
fn minor_faults() -> i64 {
    // SAFETY: `getrusage` fills the zeroed struct we pass and reads nothing else.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage.ru_minflt
    }
}

/// A GELU MLP written as eager tensor code is: every operation allocates
/// its output (the tanh approximation, one temporary per step).
fn forward(input: &Array2<f32>, weights: &[Array2<f32>]) -> Array2<f32> {
    let mut hidden = input.clone();
    for weight in weights {
        let x = hidden.dot(weight);
        let cube = x.mapv(|v| v * v * v);
        let inner = (&x + &(cube * 0.044_715)) * 0.797_884_6;
        let gate = inner.mapv(|v| 1.0 + v.tanh());
        hidden = &x * &gate * 0.5;
    }
    hidden
}

/// Runs the passes; returns the median pass time and faults per pass after
/// the first.
fn run(input: &Array2<f32>, weights: &[Array2<f32>]) -> (Duration, f64, f32) {
    let mut times = Vec::with_capacity(PASSES);
    let mut checksum = 0.0;
    let mut faults_after_first = 0;
    for pass in 0..PASSES {
        let faults = minor_faults();
        let start = Instant::now();
        let output = forward(input, weights);
        times.push(start.elapsed());
        checksum += output.sum();
        if pass > 0 {
            faults_after_first += minor_faults() - faults;
        }
    }
    times.sort();
    let faults = faults_after_first as f64 / (PASSES - 1) as f64;
    (times[PASSES / 2], faults, checksum)
}

fn main() {
    let input = Array2::from_shape_fn((BATCH, WIDTHS[0]), |(i, j)| {
        ((i * 7 + j) % 13) as f32 / 13.0
    });
    let weights: Vec<Array2<f32>> = WIDTHS
        .windows(2)
        .map(|pair| {
            Array2::from_shape_fn((pair[0], pair[1]), |(i, j)| {
                ((i + 3 * j) % 7) as f32 / 700.0
            })
        })
        .collect();

    let (plain_time, plain_faults, plain_sum) = run(&input, &weights);

    let cache = CachingAllocator::new();
    let (cached_time, cached_faults, cached_sum) = {
        let _scope = cache.enter();
        run(&input, &weights)
    };
    assert_eq!(plain_sum, cached_sum, "same model, same result");

    println!("{PASSES} passes of a {BATCH}x{WIDTHS:?} GELU MLP (ndarray, unchanged code)");
    println!(
        "{:<24} {:>14} {:>22}",
        "", "median pass", "minor faults / pass"
    );
    println!(
        "{:<24} {:>11.3} ms {:>22.1}",
        "system allocator",
        ms(plain_time),
        plain_faults
    );
    println!(
        "{:<24} {:>11.3} ms {:>22.1}",
        "inside cache.enter()",
        ms(cached_time),
        cached_faults
    );
    println!("\ncache stats:\n{}", cache.stats());
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

//! A small inference server loop on a real Rust inference engine: candle's
//! BERT (weights made in code, nothing downloaded), requests of variable
//! length, one best-fit cache for the model, and a scope per request, with
//! `ScopedGlobal` as the global allocator so candle's plain `Vec`s come from
//! the cache. Prints the cache's stats at the end.
//!
//! `cargo run --release -p candle-server -- [REQUESTS]` (default 40). The
//! same requests run twice: first with no scope (everything goes to glibc
//! through `ScopedGlobal`'s inner allocator), then each inside a scope of the
//! model's cache. Then requests of one fixed length are served from a plan
//! recorded on one of them.

use std::time::Instant;

use caching_allocator::plan::{Planned, Recorder};
use caching_allocator::{CachingAllocator, ScopedGlobal, SizePolicy, Stats};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};

#[global_allocator]
static GLOBAL: ScopedGlobal = ScopedGlobal::new();

/// Minor page faults of this process so far (Linux; 0 elsewhere).
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which is in parentheses).
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split(' ').nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// A request: `len` token ids.
fn request(index: usize, len: usize, vocab: usize, device: &Device) -> candle_core::Result<Tensor> {
    let ids: Vec<u32> = (0..len)
        .map(|j| ((index * 31 + j * 7) % vocab) as u32)
        .collect();
    Tensor::from_vec(ids, (1, len), device)
}

/// The request lengths: variable, like a server's (16 to 143 tokens).
fn lengths(requests: usize) -> Vec<usize> {
    (0..requests).map(|i| 16 + (i * 37) % 128).collect()
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(40)
        .max(2);
    assert!(
        ScopedGlobal::is_installed(),
        "this example installs ScopedGlobal"
    );
    let device = Device::Cpu;
    let config = Config {
        vocab_size: 2000,
        hidden_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 1024,
        max_position_embeddings: 256,
        ..Config::default()
    };
    // Weights made in code: every layer initialises its own variables.
    let varmap = VarMap::new();
    let model = BertModel::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        &config,
    )?;
    let forward = |index: usize, len: usize| -> candle_core::Result<f32> {
        let ids = request(index, len, config.vocab_size, &device)?;
        let types = ids.zeros_like()?;
        model
            .forward(&ids, &types, None)?
            .sum_all()?
            .to_scalar::<f32>()
    };
    // Warm up outside any scope: candle's one-time work (gemm's cache-size
    // probes, its thread-local scratch) stays out of the cache.
    forward(0, 32)?;

    let lengths = lengths(requests);
    let mut outputs = Vec::new();
    // Without a scope: the system allocator.
    let mut times = Vec::new();
    let faults = minor_faults();
    for (index, &len) in lengths.iter().enumerate() {
        let start = Instant::now();
        outputs.push(forward(index, len)?);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let glibc_faults = (minor_faults() - faults) as f64 / requests as f64;
    let glibc_ms = median(times);

    // With a scope of the model's best-fit cache per request.
    let cache = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .build();
    let mut times = Vec::new();
    let mut warm: Option<Stats> = None;
    let mut kept = 0;
    let faults = minor_faults();
    let mut steady_faults = faults;
    for (index, &len) in lengths.iter().enumerate() {
        let start = Instant::now();
        let scope = cache.enter();
        let output = forward(index, len)?;
        kept = scope.end().blocks;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(output, outputs[index], "the same output with the cache");
        if index == 0 {
            warm = Some(cache.stats());
            steady_faults = minor_faults();
        }
    }
    let cache_faults = (minor_faults() - steady_faults) as f64 / (requests - 1) as f64;
    let cache_ms = median(times);
    let stats = cache.stats();
    let steady = stats.since(&warm.expect("at least two requests"));

    println!(
        "candle BERT ({} layers, hidden {}), {requests} requests of 16-143 tokens",
        config.num_hidden_layers, config.hidden_size
    );
    println!(
        "no scope (glibc):       median {glibc_ms:.3} ms a request, {glibc_faults:.0} page faults a request"
    );
    println!(
        "best-fit cache scope:   median {cache_ms:.3} ms a request, {cache_faults:.0} page faults a request after the first (first: {} faults)",
        steady_faults - faults
    );
    println!(
        "after the first request: {} hits, {} misses ({:.1}% hit); blocks still live at the last scope's end: {kept}",
        steady.hits,
        steady.misses,
        100.0 * steady.hit_ratio()
    );
    println!("cache stats:\n{stats}");

    // A plan, for requests of one fixed length: record one request (after
    // the warm-up above), then serve each request from the plan's arena
    // with one guard (the scope and the pass).
    let recorder = Recorder::new();
    let fixed = 64;
    let expected = {
        let _record = recorder.enter();
        forward(1, fixed)?
    };
    let plan = recorder.plan();
    let planned = Planned::new(&plan);
    let mut times = Vec::new();
    let faults = minor_faults();
    for index in 0..requests {
        let start = Instant::now();
        let output = {
            let _pass = planned.enter();
            forward(1, fixed)?
        };
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(output, expected, "the same output from the plan");
        let report = planned.last_pass();
        if index == 0 || report.deviations > 0 {
            println!(
                "plan, request {index}: {} allocations, {} in order, {} deviated (first: {:?})",
                report.allocations, report.in_order, report.deviations, report.first_deviation
            );
        }
    }
    let plan_stats = planned.stats();
    println!(
        "plan of one {fixed}-token request: arena {:.2} MiB for {:.2} MiB peak live; median {:.3} ms a request, {:.0} page faults a request; {} of {} allocations from the arena",
        plan.arena_bytes() as f64 / (1 << 20) as f64,
        plan.peak_live_bytes() as f64 / (1 << 20) as f64,
        median(times),
        (minor_faults() - faults) as f64 / requests as f64,
        plan_stats.hits,
        plan_stats.hits + plan_stats.misses
    );
    assert_eq!(plan_stats.misses, 0, "every allocation from the plan");
    // Nothing the requests made is left in use, and a release empties it.
    assert_eq!(stats.bytes_in_use, 0, "{stats}");
    cache.release_cached();
    assert_eq!(cache.stats().bytes_reserved, 0);
    Ok(())
}

//! `--burst`: memory that comes back after a burst.
//!
//! A server sees a burst of concurrent requests, then quiet, then a trickle.
//! One child process per allocator replays, on one allocator: the burst
//! (`--burst-threads` threads each replaying the whole trace at once), an
//! idle gap (`--idle-ms`, no call at all), then the trickle (one thread,
//! `--short-passes` passes). A sampler thread reads resident memory every
//! few milliseconds throughout. A second child replays the trickle alone,
//! on a fresh allocator: what the short passes need. The report compares
//! resident memory during the trickle with that need, and the trickle's
//! pass times with and without decay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use caching_allocator::{CachingAllocator, SizePolicy, decay};
use mimalloc::MiMalloc;
use serde::{Deserialize, Serialize};
use tikv_jemallocator::Jemalloc;

use crate::engine::{self, GlobalAllocRow, Options, ReplayAlloc, Touch};
use crate::measure::RssReader;
use crate::trace::Trace;

static MIMALLOC: MiMalloc = MiMalloc;
static JEMALLOC: Jemalloc = Jemalloc;

/// The rows of a burst report.
pub const ROWS: [&str; 5] = [
    "system",
    "mimalloc",
    "jemalloc",
    "cache-bestfit-decay",
    "cache-bestfit-nodecay",
];

/// What a burst child is asked to do.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Threads replaying the whole trace at once in the burst.
    pub burst_threads: usize,
    /// The idle gap after the burst.
    pub idle: Duration,
    /// Passes of the trickle, on one thread.
    pub short_passes: usize,
    /// The decay window of the `cache-bestfit-decay` row.
    pub release_after: Duration,
    /// Only the trickle (the reference run).
    pub short_only: bool,
    /// How new blocks are written.
    pub touch: Touch,
}

/// One resident-memory reading: ms since the start, bytes above the
/// baseline.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Reading {
    /// Milliseconds since the child started.
    pub ms: f64,
    /// Resident bytes above the baseline.
    pub rss: usize,
}

/// A burst child's report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BurstReport {
    /// The row.
    pub allocator: String,
    /// Whether this was the trickle alone (the reference).
    pub short_only: bool,
    /// When the burst ended and the trickle began, ms.
    pub burst_end_ms: f64,
    /// When the trickle began, ms.
    pub short_start_ms: f64,
    /// Resident memory every few milliseconds.
    pub readings: Vec<Reading>,
    /// Resident bytes above the baseline at the end of the idle gap.
    pub rss_after_idle: usize,
    /// The highest resident bytes above the baseline during the trickle.
    pub rss_short_peak: usize,
    /// The trickle's median pass, ms.
    pub short_median_ms: f64,
}

/// Runs a burst child for `row`.
pub fn child(row: &str, trace: &Trace, schedule: Schedule) -> Result<BurstReport, String> {
    match row {
        "system" => run(row, trace, &GlobalAllocRow(&std::alloc::System), schedule),
        "mimalloc" => run(row, trace, &GlobalAllocRow(&MIMALLOC), schedule),
        "jemalloc" => run(row, trace, &GlobalAllocRow(&JEMALLOC), schedule),
        "cache-bestfit-decay" | "cache-bestfit-nodecay" => {
            let decays = row == "cache-bestfit-decay";
            let cache = CachingAllocator::builder()
                .size_policy(SizePolicy::BestFit)
                .release_after(if decays {
                    schedule.release_after
                } else {
                    Duration::MAX
                })
                .build();
            // The helper thread: the idle gap makes no call at all.
            let _decay = decays.then(decay::spawn);
            run(row, trace, &cache, schedule)
        }
        other => Err(format!("no burst row {other}")),
    }
}

fn run<A: ReplayAlloc>(
    row: &str,
    trace: &Trace,
    alloc: &A,
    schedule: Schedule,
) -> Result<BurstReport, String> {
    let start = Instant::now();
    let rss = RssReader::new();
    let baseline = rss.resident();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let rss = RssReader::new();
            let mut readings = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                if readings.len() < readings.capacity() {
                    readings.push(Reading {
                        ms: start.elapsed().as_secs_f64() * 1e3,
                        rss: rss.resident().saturating_sub(baseline),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            readings
        })
    };
    let options = |threads: usize, passes: usize| Options {
        passes,
        touch: schedule.touch,
        threads,
        ..Options::default()
    };
    if !schedule.short_only {
        engine::replay(
            trace,
            alloc,
            &options(schedule.burst_threads, trace.passes.len().max(2)),
        )?;
    }
    let burst_end_ms = start.elapsed().as_secs_f64() * 1e3;
    if !schedule.short_only {
        std::thread::sleep(schedule.idle);
    }
    let rss_after_idle = rss.resident().saturating_sub(baseline);
    let short_start_ms = start.elapsed().as_secs_f64() * 1e3;
    let outcome = engine::replay(trace, alloc, &options(1, schedule.short_passes.max(2)))?;
    stop.store(true, Ordering::Relaxed);
    let readings = sampler.join().map_err(|_| "the sampler panicked")?;
    let rss_short_peak = readings
        .iter()
        .filter(|reading| reading.ms >= short_start_ms)
        .map(|reading| reading.rss)
        .max()
        .unwrap_or(0)
        .max(rss.resident().saturating_sub(baseline));
    let mut steady: Vec<u64> = outcome.pass_ns[1..].to_vec();
    steady.sort_unstable();
    let short_median_ms = steady[steady.len() / 2] as f64 / 1e6;
    Ok(BurstReport {
        allocator: row.to_string(),
        short_only: schedule.short_only,
        burst_end_ms,
        short_start_ms,
        readings,
        rss_after_idle,
        rss_short_peak,
        short_median_ms,
    })
}

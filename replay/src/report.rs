//! What a child reports, and the rows and tables the parent makes of it.

use std::fmt::Write as _;

use caching_allocator::Stats;
use serde::{Deserialize, Serialize};

use crate::allocators::AllocatorKind;
use crate::engine::{Outcome, Sample};
use crate::trace::Trace;

/// The cache's [`Stats`], as plain serializable fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct StatsRecord {
    pub hits: u64,
    pub misses: u64,
    pub frees: u64,
    pub bytes_in_use: usize,
    pub bytes_cached: usize,
    pub bytes_reserved: usize,
    pub blocks_in_use: usize,
    pub blocks_cached: usize,
    pub peak_bytes_in_use: usize,
    pub peak_bytes_cached: usize,
    pub peak_bytes_reserved: usize,
    pub backing_allocs: u64,
    pub backing_frees: u64,
    pub releases: u64,
    pub bytes_released: u64,
    pub retries: u64,
    pub failures: u64,
    pub bytes_hit: u64,
    pub bytes_missed: u64,
    pub bytes_lost_to_rounding: usize,
    pub evictions: u64,
    pub bytes_evicted: u64,
}

impl From<Stats> for StatsRecord {
    fn from(stats: Stats) -> Self {
        Self {
            hits: stats.hits,
            misses: stats.misses,
            frees: stats.frees,
            bytes_in_use: stats.bytes_in_use,
            bytes_cached: stats.bytes_cached,
            bytes_reserved: stats.bytes_reserved,
            blocks_in_use: stats.blocks_in_use,
            blocks_cached: stats.blocks_cached,
            peak_bytes_in_use: stats.peak_bytes_in_use,
            peak_bytes_cached: stats.peak_bytes_cached,
            peak_bytes_reserved: stats.peak_bytes_reserved,
            backing_allocs: stats.backing_allocs,
            backing_frees: stats.backing_frees,
            releases: stats.releases,
            bytes_released: stats.bytes_released,
            retries: stats.retries,
            failures: stats.failures,
            bytes_hit: stats.bytes_hit,
            bytes_missed: stats.bytes_missed,
            bytes_lost_to_rounding: stats.bytes_lost_to_rounding,
            evictions: stats.evictions,
            bytes_evicted: stats.bytes_evicted,
        }
    }
}

/// The one JSON line a child prints on stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildReport {
    /// The row.
    pub allocator: AllocatorKind,
    /// Time of each pass, ns (slowest thread).
    pub pass_ns: Vec<u64>,
    /// Minor page faults during pass 0.
    pub faults_first: u64,
    /// Minor page faults over the steady passes.
    pub faults_steady: u64,
    /// Resident bytes before the replay.
    pub baseline_rss: usize,
    /// Peak resident bytes (`VmHWM`) of the child.
    pub peak_rss: usize,
    /// Peak resident bytes over the steady passes.
    pub steady_peak_rss: usize,
    /// Whether the peak was reset just before the replay.
    pub peak_rss_reset: bool,
    /// Cache counters at the end of pass 0.
    pub cache_after_first: Option<StatsRecord>,
    /// Cache counters after the last pass.
    pub cache_final: Option<StatsRecord>,
    /// `Display` of the final cache counters.
    pub cache_summary: Option<String>,
    /// Passes at whose end the cache's `bytes_in_use` differed from the
    /// trace's live bytes (times threads); 0 unless something is wrong.
    pub in_use_mismatches: usize,
    /// Memory samples.
    pub samples: Vec<Sample>,
}

impl ChildReport {
    /// Packs an outcome of `trace` replayed with `threads` threads.
    pub fn new(allocator: AllocatorKind, trace: &Trace, threads: usize, outcome: Outcome) -> Self {
        // A plan's arena does not count blocks of set-up or of the recorded
        // pass: only caches must match the trace's live bytes.
        let in_use_mismatches = if allocator.is_cache() {
            outcome
                .in_use_at_pass_end
                .iter()
                .enumerate()
                .filter(|&(pass, &in_use)| in_use != trace.live_at_end_of_pass(pass) * threads)
                .count()
        } else {
            0
        };
        Self {
            allocator,
            pass_ns: outcome.pass_ns,
            faults_first: outcome.faults_first,
            faults_steady: outcome.faults_steady,
            baseline_rss: outcome.baseline_rss,
            peak_rss: outcome.peak_rss,
            steady_peak_rss: outcome.steady_peak_rss,
            peak_rss_reset: outcome.peak_rss_reset,
            cache_after_first: outcome.cache_after_first.map(StatsRecord::from),
            cache_final: outcome.cache_final.map(StatsRecord::from),
            cache_summary: outcome.cache_final.map(|stats| stats.to_string()),
            in_use_mismatches,
            samples: outcome.samples,
        }
    }
}

/// One row of a trace's table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// Allocator name.
    pub allocator: String,
    /// Pass 0, ms.
    pub cold_ms: f64,
    /// Median of passes 1.., ms.
    pub median_ms: f64,
    /// 90th percentile (nearest rank) of passes 1.., ms.
    pub p90_ms: f64,
    /// Peak resident bytes over the steady passes minus the baseline, over
    /// the trace's peak live bytes (times threads).
    pub steady_rss_x_live: f64,
    /// `median_ms` / the system row's.
    pub vs_system: Option<f64>,
    /// `median_ms` / the fastest peer row's (system, mimalloc, jemalloc).
    pub vs_best_peer: Option<f64>,
    /// Minor page faults per steady pass.
    pub faults_per_steady_pass: f64,
    /// Minor page faults in pass 0.
    pub faults_first_pass: u64,
    /// Peak resident bytes above the child's baseline.
    pub peak_rss_bytes: usize,
    /// `peak_rss_bytes` / (the trace's peak live bytes * threads).
    pub peak_rss_x_live: f64,
    /// The child's resident bytes before the replay.
    pub baseline_rss_bytes: usize,
    /// Cache hits in passes 1.. .
    pub steady_hits: Option<u64>,
    /// Cache misses in passes 1.. .
    pub steady_misses: Option<u64>,
    /// `steady_hits / (steady_hits + steady_misses)`.
    pub steady_hit_ratio: Option<f64>,
    /// Requested bytes served from the cache after pass 0, over all
    /// requested bytes after pass 0.
    pub steady_byte_hit_ratio: Option<f64>,
    /// The cache's peak `bytes_reserved` (live + cached, block sizes) over
    /// the trace's peak live bytes (times threads).
    pub peak_held_x_live: Option<f64>,
    /// The cache's counters after the last pass.
    pub cache_final: Option<StatsRecord>,
    /// `Display` of those counters.
    pub cache_summary: Option<String>,
    /// Passes whose end `bytes_in_use` disagreed with the trace.
    pub in_use_mismatches: usize,
    /// Every pass's time, ms.
    pub pass_ms: Vec<f64>,
}

/// Median of sorted `values` (mean of the middle two for an even count).
pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile `p` (0..=100) of sorted `values`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Turns children's reports for one trace into rows (ratios filled in).
pub fn rows(trace: &Trace, threads: usize, reports: &[ChildReport]) -> Vec<Row> {
    let live = (trace.peak_live_bytes * threads).max(1) as f64;
    let mut rows: Vec<Row> = reports
        .iter()
        .map(|report| {
            let pass_ms: Vec<f64> = report.pass_ns.iter().map(|&ns| ns as f64 / 1e6).collect();
            let mut steady: Vec<f64> = pass_ms.iter().skip(1).copied().collect();
            steady.sort_by(f64::total_cmp);
            let steady_passes = steady.len().max(1) as f64;
            let peak_rss_bytes = report.peak_rss.saturating_sub(report.baseline_rss);
            let steady_counts = match (report.cache_after_first, report.cache_final) {
                (Some(first), Some(last)) => {
                    Some((last.hits - first.hits, last.misses - first.misses))
                }
                _ => None,
            };
            let steady_bytes = match (report.cache_after_first, report.cache_final) {
                (Some(first), Some(last)) => Some((
                    last.bytes_hit - first.bytes_hit,
                    last.bytes_missed - first.bytes_missed,
                )),
                _ => None,
            };
            Row {
                allocator: report.allocator.name().to_string(),
                cold_ms: pass_ms.first().copied().unwrap_or(f64::NAN),
                median_ms: median(&steady),
                p90_ms: percentile(&steady, 90.0),
                vs_system: None,
                vs_best_peer: None,
                faults_per_steady_pass: report.faults_steady as f64 / steady_passes,
                faults_first_pass: report.faults_first,
                peak_rss_bytes,
                peak_rss_x_live: peak_rss_bytes as f64 / live,
                steady_rss_x_live: report.steady_peak_rss.saturating_sub(report.baseline_rss)
                    as f64
                    / live,
                baseline_rss_bytes: report.baseline_rss,
                steady_hits: steady_counts.map(|(hits, _)| hits),
                steady_misses: steady_counts.map(|(_, misses)| misses),
                steady_hit_ratio: steady_counts.map(|(hits, misses)| {
                    if hits + misses == 0 {
                        0.0
                    } else {
                        hits as f64 / (hits + misses) as f64
                    }
                }),
                steady_byte_hit_ratio: steady_bytes.map(|(hit, missed)| {
                    if hit + missed == 0 {
                        0.0
                    } else {
                        hit as f64 / (hit + missed) as f64
                    }
                }),
                peak_held_x_live: report
                    .cache_final
                    .map(|stats| stats.peak_bytes_reserved as f64 / live),
                cache_final: report.cache_final,
                cache_summary: report.cache_summary.clone(),
                in_use_mismatches: report.in_use_mismatches,
                pass_ms,
            }
        })
        .collect();
    let system = reports
        .iter()
        .zip(&rows)
        .find(|(report, _)| report.allocator == AllocatorKind::System)
        .map(|(_, row)| row.median_ms);
    let best_peer = reports
        .iter()
        .zip(&rows)
        .filter(|(report, _)| report.allocator.is_peer())
        .map(|(_, row)| row.median_ms)
        .min_by(f64::total_cmp);
    for row in &mut rows {
        row.vs_system = system.map(|system| row.median_ms / system);
        row.vs_best_peer = best_peer.map(|best| row.median_ms / best);
    }
    rows
}

fn opt(value: Option<f64>, precision: usize) -> String {
    match value {
        Some(value) if value.is_finite() => format!("{value:.precision$}"),
        _ => "-".to_string(),
    }
}

/// The column titles of the table.
pub const COLUMNS: [&str; 15] = [
    "allocator",
    "cold_ms",
    "median_ms",
    "p90_ms",
    "vs_system",
    "vs_best",
    "faults/pass",
    "peak_MiB",
    "x_live",
    "steady_x",
    "hits",
    "misses",
    "hit_%",
    "hitB_%",
    "held_x",
];

/// A trace's table: a title line, a header line, one line per row.
pub fn table(title: &str, rows: &[Row]) -> String {
    let widths = [14, 9, 10, 9, 10, 8, 12, 9, 7, 8, 8, 7, 7, 7, 7];
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let mut line = String::new();
    for (index, (column, width)) in COLUMNS.iter().zip(widths).enumerate() {
        if index == 0 {
            let _ = write!(line, "{column:<width$}");
        } else {
            let _ = write!(line, " {column:>width$}");
        }
    }
    let _ = writeln!(out, "{}", line.trim_end());
    for row in rows {
        let cells = [
            row.allocator.clone(),
            format!("{:.3}", row.cold_ms),
            opt(Some(row.median_ms), 3),
            opt(Some(row.p90_ms), 3),
            opt(row.vs_system, 2),
            opt(row.vs_best_peer, 2),
            format!("{:.1}", row.faults_per_steady_pass),
            format!("{:.2}", row.peak_rss_bytes as f64 / (1 << 20) as f64),
            format!("{:.2}", row.peak_rss_x_live),
            format!("{:.2}", row.steady_rss_x_live),
            row.steady_hits.map_or("-".into(), |hits| hits.to_string()),
            row.steady_misses
                .map_or("-".into(), |misses| misses.to_string()),
            opt(row.steady_hit_ratio.map(|ratio| 100.0 * ratio), 2),
            opt(row.steady_byte_hit_ratio.map(|ratio| 100.0 * ratio), 2),
            opt(row.peak_held_x_live, 2),
        ];
        let mut line = String::new();
        for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if index == 0 {
                let _ = write!(line, "{cell:<width$}");
            } else {
                let _ = write!(line, " {cell:>width$}");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentile() {
        assert_eq!(median(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&values, 90.0), 9.0);
        assert_eq!(percentile(&[5.0], 90.0), 5.0);
        assert!(median(&[]).is_nan());
    }
}

//! The table of allocators a replay compares. Adding a row is adding a
//! variant here: its name, whether it is a general-purpose peer the cache is
//! measured against, and how to build it.

use std::alloc::System;

use caching_allocator::{CachingAllocator, SizePolicy};
use mimalloc::MiMalloc;
use serde::{Deserialize, Serialize};
use tikv_jemallocator::Jemalloc;

use crate::engine::{self, GlobalAllocRow, Options, Outcome};
use crate::trace::Trace;

static MIMALLOC: MiMalloc = MiMalloc;
static JEMALLOC: Jemalloc = Jemalloc;

/// One row of the comparison. Each runs in its own child process.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    Serialize,
    Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum AllocatorKind {
    /// glibc malloc, through `std::alloc::System`.
    System,
    /// mimalloc, through its `GlobalAlloc` impl (not installed globally).
    Mimalloc,
    /// jemalloc (tikv-jemallocator), through its `GlobalAlloc` impl.
    Jemalloc,
    /// `CachingAllocator::new()` (backed by the global allocator, glibc
    /// malloc here), through the allocator-api2 `Allocator` trait: c10's
    /// exact sizes, no cap.
    Cache,
    /// Size classes, `SizePolicy::PowerOfTwoDivisions(2)`.
    CacheP2d2,
    /// Size classes, `SizePolicy::PowerOfTwoDivisions(4)`.
    CacheP2d4,
    /// Size classes, `SizePolicy::PowerOfTwoDivisions(8)`.
    CacheP2d8,
    /// Exact sizes, `max_cached_bytes` = the trace's peak live bytes.
    CacheCap,
    /// `PowerOfTwoDivisions(2)` with the cap.
    CacheP2d2Cap,
    /// `PowerOfTwoDivisions(4)` with the cap.
    CacheP2d4Cap,
    /// `PowerOfTwoDivisions(8)` with the cap.
    CacheP2d8Cap,
    /// Best fit, `SizePolicy::BestFit`: blocks carved from one reserved,
    /// growing address range (Linux), split and coalesced; with its default
    /// fronts (per CPU where the system has restartable sequences).
    CacheBestfit,
    /// Best fit without fronts (`front_cache_bytes(0)`): the arena alone.
    CacheBestfitNofront,
    /// Best fit with the cap.
    CacheBestfitCap,
    /// Exact sizes with per-thread front caches
    /// (`front_cache_bytes(FRONT_CACHE_BYTES)`).
    CacheFront,
    /// Best fit with per-thread front caches of 1 MiB (its fallback where
    /// there are no per-CPU fronts; small: a block in a front is not merged
    /// with its neighbours, so a large front costs best fit its footprint).
    CacheBestfitFront,
    /// `plan::Recorder` for pass 0, then `plan::Planned` from its plan, one
    /// `pass()` per pass.
    Planned,
}

/// The front cache limit of the `cache-bestfit-front` row.
pub const BEST_FIT_FRONT_BYTES: usize = 1 << 20;

impl AllocatorKind {
    /// Every row, in report order.
    pub const ALL: &'static [AllocatorKind] = &[
        AllocatorKind::System,
        AllocatorKind::Mimalloc,
        AllocatorKind::Jemalloc,
        AllocatorKind::Cache,
        AllocatorKind::CacheP2d2,
        AllocatorKind::CacheP2d4,
        AllocatorKind::CacheP2d8,
        AllocatorKind::CacheCap,
        AllocatorKind::CacheP2d2Cap,
        AllocatorKind::CacheP2d4Cap,
        AllocatorKind::CacheP2d8Cap,
        AllocatorKind::CacheBestfit,
        AllocatorKind::CacheBestfitNofront,
        AllocatorKind::CacheBestfitCap,
        AllocatorKind::CacheFront,
        AllocatorKind::CacheBestfitFront,
        AllocatorKind::Planned,
    ];

    /// The row's name (as given to `--allocators` and `--child`).
    pub fn name(self) -> &'static str {
        match self {
            AllocatorKind::System => "system",
            AllocatorKind::Mimalloc => "mimalloc",
            AllocatorKind::Jemalloc => "jemalloc",
            AllocatorKind::Cache => "cache",
            AllocatorKind::CacheP2d2 => "cache-p2d2",
            AllocatorKind::CacheP2d4 => "cache-p2d4",
            AllocatorKind::CacheP2d8 => "cache-p2d8",
            AllocatorKind::CacheCap => "cache-cap",
            AllocatorKind::CacheP2d2Cap => "cache-p2d2-cap",
            AllocatorKind::CacheP2d4Cap => "cache-p2d4-cap",
            AllocatorKind::CacheP2d8Cap => "cache-p2d8-cap",
            AllocatorKind::CacheBestfit => "cache-bestfit",
            AllocatorKind::CacheBestfitNofront => "cache-bestfit-nofront",
            AllocatorKind::CacheBestfitCap => "cache-bestfit-cap",
            AllocatorKind::CacheFront => "cache-front",
            AllocatorKind::CacheBestfitFront => "cache-bestfit-front",
            AllocatorKind::Planned => "planned",
        }
    }

    /// A general-purpose allocator the caches are compared with (the "best
    /// peer" column is the fastest of these).
    pub fn is_peer(self) -> bool {
        matches!(
            self,
            AllocatorKind::System | AllocatorKind::Mimalloc | AllocatorKind::Jemalloc
        )
    }

    /// Whether the row is a cache (its bytes in use must equal the trace's
    /// live bytes at every pass end).
    pub fn is_cache(self) -> bool {
        self.cache_config().is_some()
    }

    /// Whether the row reports the crate's `Stats` (caches and plans).
    pub fn has_stats(self) -> bool {
        self.is_cache() || self == AllocatorKind::Planned
    }

    /// For cache rows: the size policy, and whether the cap (the trace's
    /// peak live bytes) is set.
    pub fn cache_config(self) -> Option<(SizePolicy, bool)> {
        let p2d = SizePolicy::PowerOfTwoDivisions;
        Some(match self {
            AllocatorKind::System
            | AllocatorKind::Mimalloc
            | AllocatorKind::Jemalloc
            | AllocatorKind::Planned => {
                return None;
            }
            AllocatorKind::Cache => (SizePolicy::Exact, false),
            AllocatorKind::CacheP2d2 => (p2d(2), false),
            AllocatorKind::CacheP2d4 => (p2d(4), false),
            AllocatorKind::CacheP2d8 => (p2d(8), false),
            AllocatorKind::CacheCap => (SizePolicy::Exact, true),
            AllocatorKind::CacheP2d2Cap => (p2d(2), true),
            AllocatorKind::CacheP2d4Cap => (p2d(4), true),
            AllocatorKind::CacheP2d8Cap => (p2d(8), true),
            AllocatorKind::CacheBestfit => (SizePolicy::BestFit, false),
            AllocatorKind::CacheBestfitNofront => (SizePolicy::BestFit, false),
            AllocatorKind::CacheBestfitCap => (SizePolicy::BestFit, true),
            AllocatorKind::CacheFront => (SizePolicy::Exact, false),
            AllocatorKind::CacheBestfitFront => (SizePolicy::BestFit, false),
        })
    }

    /// Parses a row name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|kind| kind.name() == name)
    }

    /// Replays `trace` through a fresh allocator of this row, in this
    /// process.
    pub fn replay(self, trace: &Trace, options: &Options) -> Result<Outcome, String> {
        match self {
            AllocatorKind::System => engine::replay(trace, &GlobalAllocRow(&System), options),
            AllocatorKind::Mimalloc => engine::replay(trace, &GlobalAllocRow(&MIMALLOC), options),
            AllocatorKind::Jemalloc => engine::replay(trace, &GlobalAllocRow(&JEMALLOC), options),
            AllocatorKind::Planned => {
                engine::replay(trace, &engine::PlannedRow::new(options.threads), options)
            }
            cache => {
                let (policy, capped) = cache.cache_config().unwrap_or_default();
                let mut builder = CachingAllocator::builder().size_policy(policy);
                if capped {
                    // The cap: the trace's peak live bytes (each thread replays it).
                    builder = builder.max_cached_bytes(trace.peak_live_bytes * options.threads);
                }
                match cache {
                    AllocatorKind::CacheFront => {
                        builder = builder.front_cache_bytes(options.front_bytes);
                    }
                    AllocatorKind::CacheBestfitNofront => {
                        builder = builder.front_cache_bytes(0);
                    }
                    AllocatorKind::CacheBestfitFront => {
                        builder = builder
                            .front_cache_bytes(BEST_FIT_FRONT_BYTES)
                            .per_cpu_fronts(false);
                    }
                    _ => {}
                }
                engine::replay(trace, &builder.build(), options)
            }
        }
    }
}

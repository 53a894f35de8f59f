//! The table of allocators a replay compares. Adding a row is adding a
//! variant here: its name, whether it is a general-purpose peer the cache is
//! measured against, and how to build it.

use std::alloc::System;

use caching_allocator::CachingAllocator;
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
    /// malloc here), through the allocator-api2 `Allocator` trait.
    Cache,
}

impl AllocatorKind {
    /// Every row, in report order.
    pub const ALL: &'static [AllocatorKind] = &[
        AllocatorKind::System,
        AllocatorKind::Mimalloc,
        AllocatorKind::Jemalloc,
        AllocatorKind::Cache,
    ];

    /// The row's name (as given to `--allocators` and `--child`).
    pub fn name(self) -> &'static str {
        match self {
            AllocatorKind::System => "system",
            AllocatorKind::Mimalloc => "mimalloc",
            AllocatorKind::Jemalloc => "jemalloc",
            AllocatorKind::Cache => "cache",
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

    /// Whether the row reports cache counters.
    pub fn is_cache(self) -> bool {
        matches!(self, AllocatorKind::Cache)
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
            AllocatorKind::Cache => engine::replay(trace, &CachingAllocator::new(), options),
        }
    }
}

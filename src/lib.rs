//! A caching memory allocator: freed blocks are kept on free lists and handed
//! out again instead of going back to the system, so a loop that allocates the
//! same buffers every pass stops paying for `malloc`, page faults and `munmap`
//! after the first pass. A Rust port of PyTorch's
//! `c10/mobile/CPUCachingAllocator`.
//!
//! [`CachingAllocator`] is a cheaply clonable handle over one shared,
//! lock-protected cache. It implements [`allocator_api2::alloc::Allocator`],
//! so allocator-api2's `Vec`/`Box` and hashbrown's `HashMap` take it on
//! stable; with the `nightly` feature it also implements
//! `core::alloc::Allocator`, so std's own `Vec::new_in` and `Box::new_in` do.
//!
//! ```
//! use allocator_api2::vec::Vec;
//! use caching_allocator::CachingAllocator;
//!
//! let cache = CachingAllocator::new();
//! for _ in 0..10 {
//!     let tensor: Vec<f32, _> = Vec::with_capacity_in(224 * 224 * 3, cache.clone());
//!     drop(tensor);
//! }
//! assert_eq!(cache.stats().misses, 1);
//! assert_eq!(cache.stats().hits, 9);
//! ```
//!
#![cfg_attr(
    feature = "nightly",
    doc = r#"
With the `nightly` feature, std's collections take the cache too:

```
#![feature(allocator_api)]
use caching_allocator::CachingAllocator;

let cache = CachingAllocator::new();
let first = Box::new_in([1u64; 512], cache.clone());
drop(first);
let mut again: Vec<u64, _> = Vec::with_capacity_in(512, cache.clone());
again.push(7);
assert_eq!(cache.stats().hits, 1);
```
"#
)]
//! See the README for the feature table, how the crate maps onto c10's
//! allocator, and measured figures.
#![cfg_attr(feature = "nightly", feature(allocator_api))]

mod alloc;
mod best_fit;
mod budget;
mod builder;
mod cache;
pub mod decay;
mod eviction;
pub mod frames;
mod free_ranges;
mod front;
#[cfg(not(loom))]
mod global;
mod handle;
pub mod history;
mod page;
mod per_cpu;
mod pickle;
pub mod plan;
mod poison;
mod policy;
mod reentry;
mod reservation;
mod rseq;
// Under loom only its model tests use it (the global allocator is std-only).
#[cfg_attr(loom, allow(dead_code))]
mod registry;
/// The scope registry, for loom-tests/tests/registry.rs only: its models
/// race a free through the registry against a cache's last handle. Exists
/// only under `--cfg loom`; not part of the API.
#[cfg(loom)]
#[doc(hidden)]
pub use registry::Registry as LoomRegistry;
#[cfg(not(loom))]
mod scope;
mod size_bins;
pub mod snapshot;
mod stats;
mod sync;
mod unwind;

pub use allocator_api2::alloc::{AllocError, Allocator, Global};
pub use budget::Budget;
pub use builder::Builder;
pub use decay::DEFAULT_RELEASE_AFTER;
pub use front::FRONT_CACHE_BYTES;
#[cfg(not(loom))]
pub use global::{DEFAULT_MIN_SIZE, ScopedGlobal};
pub use handle::{CachingAllocator, FrontKind};
pub use per_cpu::{MAX_BLOCK as PER_CPU_FRONT_MAX_BLOCK, MAX_SLAB_BYTES as PER_CPU_FRONT_BYTES};
pub use policy::{MIN_ALIGN, SIZE_GRANULARITY, SizePolicy};
#[cfg(not(loom))]
pub use scope::{LiveBlocks, Scope};
pub use snapshot::Snapshot;
pub use stats::Stats;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/guide.md")]
struct GuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/design.md")]
struct DesignDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/fronts.md")]
struct FrontsDoctests;

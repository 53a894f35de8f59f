//! The integration tests that install no `#[global_allocator]`, in one test
//! binary (one link instead of one per file). The suites that install one
//! (`tests/scope.rs`, `tests/plan_scope.rs`, `tests/soak.rs`) stay separate
//! and share [`fixture`] through `#[path]`.
#![cfg_attr(feature = "nightly", feature(allocator_api))]

mod fixture;
mod plan_support;

/// Only built with `-Zsanitizer=address` (the crate's build script sets
/// `cfg(asan)`).
#[cfg(asan)]
mod asan_poison;
mod best_fit;
mod budget;
mod collections;
mod decay;
mod failure;
mod front_credit;
mod fronts;
mod installed;
mod limit;
#[cfg(feature = "nightly")]
mod nightly;
mod per_cpu;
mod plan;
#[cfg(feature = "nightly")]
mod plan_nightly;
mod plan_properties;
mod policy;
mod properties;
mod snapshot;
mod threads;

//! Replays recorded allocation traces of real models through the caching
//! allocator and its peers (glibc malloc, mimalloc, jemalloc) and measures
//! each: pass times, page faults, resident memory, cache hits.
//!
//! The `replay` binary runs every allocator in its own child process (a
//! re-execution of itself with `--child NAME`), so each one's resident memory
//! and page faults are its own; this library is the part both sides share and
//! tests call: the trace parser ([`trace`]), the replay core ([`engine`]),
//! the allocator table ([`allocators`]), the report rows ([`report`]) and the
//! SVG plot ([`plot`]).

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "tool")]
pub mod allocators;
#[cfg(feature = "tool")]
pub mod burst;
#[cfg(feature = "tool")]
pub mod engine;
#[cfg(feature = "tool")]
pub mod measure;
#[cfg(feature = "tool")]
pub mod page;
#[cfg(feature = "tool")]
pub mod plot;
#[cfg(feature = "tool")]
pub mod report;
pub mod trace;

#[cfg(feature = "tool")]
pub use allocators::AllocatorKind;
#[cfg(feature = "tool")]
pub use engine::{Options, Outcome, Touch, replay};
pub use trace::{Event, ParseError, Trace};

/// The traces bundled with the repository (`traces/`, found from this
/// crate's manifest directory at compile time).
pub const BUNDLED_TRACES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../traces");

/// Fewest passes a default run replays, for stable medians.
pub const MIN_DEFAULT_PASSES: usize = 200;

/// The default number of passes for a trace with `file_passes` passes: the
/// smallest whole number of repetitions of the file that reaches
/// [`MIN_DEFAULT_PASSES`] (resnet18: 20 x 10, bert_dynamic: 10 x 20,
/// gpt_decode_small: 4 x 65).
pub fn default_passes(file_passes: usize) -> usize {
    let file_passes = file_passes.max(1);
    file_passes * MIN_DEFAULT_PASSES.div_ceil(file_passes)
}

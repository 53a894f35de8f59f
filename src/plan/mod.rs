//! Allocation plans: a model's passes served from one arena of its peak live
//! bytes (c10's `CPUProfilingAllocator`, made safe).
//!
//! Record one pass through a [`Recorder`], [`plan`](Recorder::plan) it, and
//! serve the next passes from a [`Planned`] arena, one [`pass`](Planned::pass)
//! at a time. Use a plan instead of a cache when shapes are static and memory
//! matters: a cache holds every block it ever needed at once per size, a plan
//! only the peak.
//!
//! The placement: blocks largest first (equal sizes in allocation order),
//! each at the lowest 64-aligned offset free for its whole lifetime. c10 plans
//! online, in allocation order with best fit, and needs 1.2–1.6x the peak
//! live bytes on static traces; largest first reaches the peak. A deviating
//! pass never gets overlapping memory: see [`Planned`].

mod planned;
mod planner;
mod recorder;

#[cfg(not(loom))]
pub use planned::PlannedScope;
pub use planned::{Pass, PassReport, Planned};
pub use recorder::Recorder;

/// Where one recorded block goes in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Offset from the arena's start; a multiple of `align`.
    pub offset: usize,
    /// Bytes reserved: the recorded size rounded up to 64.
    pub size: usize,
    /// The recorded alignment, at least 64.
    pub align: usize,
}

/// A layout for a pass: a slot for each recorded allocation that was freed
/// within the recording, by allocation index. Made by
/// [`Recorder::plan`]; cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    slots: std::vec::Vec<Option<Slot>>,
    /// By allocation index: every planned block allocated from `settled[i]`
    /// up to `i` had been freed when `i` was allocated. A pass that goes
    /// from there straight to `i` left out finished one-time work; one that
    /// goes to `i` from further back skipped blocks the recording still
    /// had live (more likely, the request is not `i`).
    settled: std::vec::Vec<usize>,
    arena_bytes: usize,
    peak_live_bytes: usize,
}

impl Plan {
    fn new(
        slots: std::vec::Vec<Option<Slot>>,
        settled: std::vec::Vec<usize>,
        arena_bytes: usize,
        peak_live_bytes: usize,
    ) -> Self {
        debug_assert_eq!(slots.len(), settled.len());
        Self {
            slots,
            settled,
            arena_bytes,
            peak_live_bytes,
        }
    }

    /// An empty plan of `allocations` allocations, none of them planned.
    fn unplanned(allocations: usize) -> Self {
        Self::new(
            std::vec![None; allocations],
            (0..allocations).collect(),
            0,
            0,
        )
    }

    /// The arena's size in bytes.
    pub fn arena_bytes(&self) -> usize {
        self.arena_bytes
    }

    /// The most bytes the planned blocks had live at once, sizes as the
    /// arena lays them out (rounded up to 64): the least any arena could be.
    pub fn peak_live_bytes(&self) -> usize {
        self.peak_live_bytes
    }

    /// How many allocations the recording had (planned or not).
    pub fn allocations(&self) -> usize {
        self.slots.len()
    }

    /// How many of them have a slot.
    pub fn planned_blocks(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_some()).count()
    }

    /// The slot of the recording's `index`-th allocation, if it has one.
    pub fn slot(&self, index: usize) -> Option<Slot> {
        self.slots.get(index).copied().flatten()
    }

    /// Where the run of finished blocks before allocation `index` starts
    /// (see `settled`); `index` itself if there is none.
    fn settled(&self, index: usize) -> usize {
        self.settled.get(index).copied().unwrap_or(index)
    }

    /// The alignment the arena needs: the largest slot's, at least 64.
    fn arena_align(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .map(|slot| slot.align)
            .max()
            .unwrap_or(crate::MIN_ALIGN)
    }
}

//! [`Planned`]: serves a pass from one arena laid out by a [`Plan`].

use core::alloc::Layout;
use core::fmt;
use core::ptr::{self, NonNull};
use std::collections::{BTreeMap, HashMap};

use allocator_api2::alloc::{AllocError, Allocator, Global};

use super::Plan;
use crate::alloc::{RawAllocator, allocator_impls, dangling};
use crate::poison;
use crate::reentry;
use crate::stats::Stats;
use crate::sync::{Arc, Mutex};

/// Serves the allocations of a pass from one arena of the plan's size: the
/// i-th allocation of a pass gets the recording's i-th block's slot, and a
/// pass that deviates (extra, missing or changed allocations) is
/// re-synchronised by size (see [`last_pass`](Self::last_pass) and the
/// README's "Passes that deviate").
///
/// Where a cache holds as many blocks of each size as were ever live at once
/// (3.5x the peak live bytes on resnet18), a plan holds one arena of about
/// the peak live bytes, and never calls the backing allocator for a pass that
/// goes as recorded. Unlike c10's profiling allocator it does not trust the
/// plan: a slot is used only if the request fits it (size and alignment at
/// most the recorded ones) and no live block overlaps it. Anything else — a
/// bigger or extra allocation, a slot still overlapped by a block freed later
/// than planned, an allocation outside a pass — comes from the backing
/// allocator. No two live blocks ever share memory.
///
/// A cheaply clonable handle; the arena goes back to the backing allocator
/// when the last handle drops (collections hold handles, so the arena
/// outlives its blocks). [`pass`](Self::pass) starts a pass and restarts the
/// allocation index that all handles share; passes on several threads at
/// once are safe, but only one pass at a time is guaranteed its slots.
///
/// # Examples
///
/// ```
/// use allocator_api2::vec::Vec;
/// use caching_allocator::Allocator;
/// use caching_allocator::plan::{Planned, Recorder};
///
/// /// A pass: an activation, and an output computed from it.
/// fn forward<A: Allocator + Clone>(alloc: &A) -> f32 {
///     let mut hidden = Vec::with_capacity_in(4096, alloc.clone());
///     hidden.resize(4096, 1.0f32);
///     let mut output = Vec::with_capacity_in(4096, alloc.clone());
///     output.extend(hidden.iter().map(|x| x * 2.0));
///     output.iter().sum()
/// }
///
/// let recorder = Recorder::new();
/// forward(&recorder);
/// let plan = recorder.plan();
///
/// let planned = Planned::new(&plan);
/// for _ in 0..3 {
///     let _pass = planned.pass();
///     assert_eq!(forward(&planned), 8192.0);
/// }
/// let stats = planned.stats();
/// assert_eq!((stats.hits, stats.misses), (6, 0)); // every block from the arena
/// assert_eq!(plan.arena_bytes(), 2 * 4096 * 4);
/// ```
pub struct Planned<A: Allocator = Global> {
    pub(crate) inner: Arc<PlanArena<A>>,
}

/// The arena a [`Planned`] serves its plan's slots from (named apart from
/// best fit's `best_fit::Arena`).
pub(crate) struct PlanArena<A: Allocator> {
    plan: Plan,
    /// Slot indices by slot size, ascending: where a pass that deviated
    /// from the recording finds the slot of a request again.
    by_size: HashMap<usize, std::vec::Vec<usize>>,
    /// By slot index: no slot allocated after it in the recording shares
    /// any of its memory, so a block left in it longer than planned can
    /// cost no later allocation its slot.
    alone: std::vec::Vec<bool>,
    /// The arena, `None` if the plan is empty or it could not be allocated
    /// (then everything comes from the backing allocator).
    base: Option<NonNull<u8>>,
    layout: Layout,
    state: Mutex<PassState>,
    backing: A,
}

// SAFETY: `base` is memory owned by the arena (freed in `Drop`); which thread
// holds the arena does not matter to it. Access to the blocks carved from it
// is arbitrated under `state`'s lock.
unsafe impl<A: Allocator + Send> Send for PlanArena<A> {}
// SAFETY: as above; `&PlanArena` only hands out disjoint blocks, under the lock.
unsafe impl<A: Allocator + Sync> Sync for PlanArena<A> {}

struct PassState {
    /// Live pass guards.
    passes: usize,
    /// The slot the pass's next allocation gets if the pass goes as
    /// recorded.
    next: usize,
    /// Counts passes; `used[i] == epoch`: slot `i` served this pass.
    epoch: u32,
    used: std::vec::Vec<u32>,
    /// Per slot size: where in `PlanArena::by_size` to look first.
    cursors: HashMap<usize, usize>,
    /// Where the sequence goes on if the last request that re-synchronised
    /// but was not given the slot (it could have been an extra one) was in
    /// fact the recording's: the next request confirms it by fitting there.
    resume: Option<usize>,
    /// The slot size of the last re-synchronisation while every request in
    /// order since has been of that size: until one of another size
    /// confirms it, the pass may be a block off the recording (it guessed
    /// wrong between blocks of that size), and the next request that steps
    /// over blocks is taken as the pass getting back in step.
    unconfirmed: Option<usize>,
    /// Live arena blocks: offset -> end offset.
    live: BTreeMap<usize, usize>,
    report: PassReport,
    stats: Stats,
}

/// How the last pass of a [`Planned`] arena followed its plan: returned by
/// [`Planned::last_pass`].
///
/// An allocation *deviates* when it is not the one the recording had next:
/// extra (one-time work on a first call, a lazily filled cache), changed (a
/// different size), or after a run of recorded allocations that did not
/// happen. A deviating allocation still gets the slot of its size that the
/// recording shows is its own, if it is free (the arena re-synchronises);
/// else it comes from the backing allocator, so that an extra one costs no
/// other allocation its slot. `first_deviation` says where to look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PassReport {
    /// Allocations the pass made.
    pub allocations: usize,
    /// Of them, served from their recorded slot in order.
    pub in_order: usize,
    /// Of them, deviating from the recording.
    pub deviations: usize,
    /// The first deviating allocation: its index in the pass and its layout.
    pub first_deviation: Option<(usize, Layout)>,
}

impl PassState {
    /// Whether `[start, end)` overlaps a live arena block.
    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.live
            .range(..end)
            .next_back()
            .is_some_and(|(_, &live_end)| live_end > start)
    }
}

/// A pass: created by [`Planned::pass`], ends when dropped.
#[must_use = "the pass ends when the guard is dropped"]
pub struct Pass<A: Allocator = Global> {
    planned: Planned<A>,
}

impl Planned {
    /// An arena for `plan`, taken from the global allocator.
    pub fn new(plan: &Plan) -> Self {
        Self::new_in(plan, Global)
    }
}

impl<A: Allocator> Planned<A> {
    /// An arena for `plan`, taken from `backing`, which also serves whatever
    /// the plan does not. If the arena cannot be allocated, every request
    /// goes to `backing` (and `stats().failures` counts the failed arena).
    pub fn new_in(plan: &Plan, backing: A) -> Self {
        let mut stats = Stats::default();
        let layout = match Layout::from_size_align(plan.arena_bytes(), plan.arena_align()) {
            Ok(layout) => layout,
            Err(_) => {
                // An arena no layout can describe: serve everything from the
                // backing allocator, and say so.
                stats.failures += 1;
                Layout::new::<()>()
            }
        };
        let base = if layout.size() == 0 {
            None
        } else {
            let _inside = reentry::inside();
            match backing.allocate(layout) {
                Ok(arena) => {
                    stats.on_arena_reserved(layout.size());
                    // Free arena ranges are off limits until a slot is handed out.
                    poison::poison(arena.cast(), layout.size());
                    Some(arena.cast::<u8>())
                }
                Err(AllocError) => {
                    stats.failures += 1;
                    None
                }
            }
        };
        // No lock is held: these tables may be scope blocks like the plan's
        // copy (freed to their owner when the arena goes).
        let mut by_size: HashMap<usize, std::vec::Vec<usize>> = HashMap::new();
        for index in 0..plan.allocations() {
            if let Some(slot) = plan.slot(index) {
                by_size.entry(slot.size).or_default().push(index);
            }
        }
        // Latest first, against the union of the later slots' ranges
        // (start -> end, disjoint).
        let mut alone = std::vec![false; plan.allocations()];
        let mut later: BTreeMap<usize, usize> = BTreeMap::new();
        for index in (0..plan.allocations()).rev() {
            let Some(slot) = plan.slot(index) else {
                continue;
            };
            let (mut start, mut end) = (slot.offset, slot.offset + slot.size);
            alone[index] = !later
                .range(..end)
                .next_back()
                .is_some_and(|(_, &later_end)| later_end > start);
            if let Some((&before, &before_end)) = later.range(..=start).next_back()
                && before_end >= start
            {
                later.remove(&before);
                start = before;
                end = end.max(before_end);
            }
            while let Some((&after, &after_end)) = later.range(start..=end).next() {
                later.remove(&after);
                end = end.max(after_end);
            }
            later.insert(start, end);
        }
        Self {
            inner: Arc::new(PlanArena {
                plan: plan.clone(),
                by_size,
                alone,
                base,
                layout,
                state: Mutex::new(PassState {
                    passes: 0,
                    next: 0,
                    epoch: 0,
                    used: std::vec![0; plan.allocations()],
                    cursors: HashMap::new(),
                    resume: None,
                    unconfirmed: None,
                    live: BTreeMap::new(),
                    report: PassReport::default(),
                    stats,
                }),
                backing,
            }),
        }
    }

    /// Starts a pass: the next allocation is the pass's first, and gets the
    /// recording's first slot. The pass ends when the guard drops; passes
    /// may overlap (on several threads), sharing one allocation index.
    pub fn pass(&self) -> Pass<A> {
        let mut state = self.inner.state.lock();
        state.passes += 1;
        state.next = 0;
        state.epoch = state.epoch.wrapping_add(1);
        if state.epoch == 0 {
            // Wrapped: forget every stamp so none looks current.
            state.used.fill(0);
            state.epoch = 1;
        }
        state.cursors.clear();
        state.resume = None;
        state.unconfirmed = None;
        state.report = PassReport::default();
        drop(state);
        Pass {
            planned: self.clone(),
        }
    }

    /// The counters: `hits` are allocations served from the arena, `misses`
    /// from the backing allocator; `bytes_reserved` includes the arena.
    pub fn stats(&self) -> Stats {
        self.inner.state.lock().stats
    }

    /// The arena at this instant, as a [`Snapshot`](crate::Snapshot): one
    /// segment of kind [`Plan`](crate::snapshot::SegmentKind::Plan), its
    /// blocks in use (with their requested sizes, from the arena's own
    /// books) and the free gaps between them. Blocks of unplanned requests
    /// live in the backing allocator and are counted in the `Stats` only.
    /// The lock is held while the live blocks are copied; nothing comes
    /// from the arena.
    ///
    /// ```
    /// use caching_allocator::plan::{Planned, Recorder};
    /// use caching_allocator::snapshot::BlockState;
    /// use allocator_api2::vec::Vec;
    ///
    /// let recorder = Recorder::new();
    /// drop(Vec::<u8, _>::with_capacity_in(1000, recorder.clone()));
    /// let planned = Planned::new(&recorder.plan());
    /// let _pass = planned.pass();
    /// let block = Vec::<u8, _>::with_capacity_in(1000, planned.clone());
    /// let snapshot = planned.snapshot();
    /// assert_eq!(snapshot.bytes_in(BlockState::InUse), 1000);
    /// drop(block);
    /// assert_eq!(planned.snapshot().bytes_in(BlockState::InUse), 0);
    /// ```
    pub fn snapshot(&self) -> crate::Snapshot {
        use crate::snapshot::{Block, BlockState, Segment, SegmentKind};
        let _inside = reentry::inside();
        let (stats, live) = {
            let state = self.inner.state.lock();
            let live: std::vec::Vec<(usize, usize)> = state
                .live
                .iter()
                .map(|(&start, &end)| (start, end))
                .collect();
            (state.stats, live)
        };
        let segments = match self.inner.base {
            Some(base) => {
                let (address, size) = (base.as_ptr().addr(), self.inner.layout.size());
                let mut blocks = std::vec::Vec::with_capacity(2 * live.len() + 1);
                let mut at = 0;
                let free = |from: usize, to: usize| Block {
                    address: address + from,
                    size: to - from,
                    requested: None,
                    state: BlockState::Free,
                };
                for (start, end) in live {
                    if start > at {
                        blocks.push(free(at, start));
                    }
                    blocks.push(Block {
                        address: address + start,
                        size: end - start,
                        requested: Some(end - start),
                        state: BlockState::InUse,
                    });
                    at = end;
                }
                if at < size {
                    blocks.push(free(at, size));
                }
                vec![Segment {
                    address,
                    size,
                    kind: SegmentKind::Plan,
                    blocks,
                }]
            }
            None => std::vec::Vec::new(),
        };
        crate::Snapshot {
            stats,
            segments,
            history: std::vec::Vec::new(),
            frames: std::vec::Vec::new(),
            recorded: 0,
        }
    }

    /// How the current pass (or the last one, once it ended) followed the
    /// plan: how many allocations deviated, and the first that did.
    pub fn last_pass(&self) -> PassReport {
        self.inner.state.lock().report
    }

    /// The plan this arena follows.
    pub fn plan(&self) -> &Plan {
        &self.inner.plan
    }

    /// The allocator the arena and every unplanned block come from.
    pub fn backing(&self) -> &A {
        &self.inner.backing
    }
}

#[cfg(not(loom))]
impl<A: Allocator + Send + Sync + 'static> Planned<A> {
    /// Makes this arena the current thread's scope (see
    /// [`CachingAllocator::enter`](crate::CachingAllocator::enter)) and
    /// starts a pass: with [`ScopedGlobal`](crate::ScopedGlobal) installed,
    /// a model written with plain `Vec`s is served from its plan. One guard
    /// per pass: the scope and the pass end when it drops. (A
    /// [`pass`](Self::pass) inside restarts the pass, as always.)
    pub fn enter(&self) -> PlannedScope<A> {
        // The pass starts first and ends last.
        let pass = self.pass();
        PlannedScope {
            scope: crate::scope::enter(self.inner.clone()),
            _pass: pass,
        }
    }
}

// SAFETY: a slot is handed out only if no live arena block overlaps the
// requested range, which is inside the arena and aligned for the request (the
// plan's slot alignment is at least the request's, the arena's base at least
// every slot's); other blocks come from the backing allocator and go back to
// it. The arena lives as long as any handle. `resize` is the default.
unsafe impl<A: Allocator> RawAllocator for PlanArena<A> {
    fn allocate(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        if let Some(block) = self.allocate_planned(layout) {
            if zeroed {
                // SAFETY: the slot was just reserved for this request: no
                // live block overlaps its `layout.size()` bytes.
                unsafe { ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
            }
            return Ok(NonNull::slice_from_raw_parts(block, layout.size()));
        }
        let block = reentry::allocate_from(&self.backing, layout, zeroed);
        let mut state = self.state.lock();
        match block {
            Ok(block) => {
                state.stats.on_miss(layout.size(), layout.size());
                Ok(block)
            }
            Err(error) => {
                state.stats.failures += 1;
                Err(error)
            }
        }
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        if let Some(offset) = self.offset_of(ptr) {
            let mut state = self.state.lock();
            // Poisoned under the lock, before the range can be handed out again.
            poison::poison(ptr, layout.size());
            let _inside = reentry::inside();
            if state.live.remove(&offset).is_some() {
                state.stats.on_arena_free(layout.size());
            }
            return;
        }
        self.state
            .lock()
            .stats
            .on_free_to_backing(layout.size(), layout.size());
        let _inside = reentry::inside();
        // SAFETY: not in the arena, so the backing allocator made it, with
        // `layout` (the caller's contract).
        unsafe { self.backing.deallocate(ptr, layout) };
    }
}

impl<A: Allocator> PlanArena<A> {
    /// The arena range of a pointer, if it is in the arena.
    fn offset_of(&self, ptr: NonNull<u8>) -> Option<usize> {
        let base = self.base?.as_ptr() as usize;
        let addr = ptr.as_ptr() as usize;
        (addr >= base && addr < base + self.layout.size()).then(|| addr - base)
    }

    /// A slot for the pass's next allocation, if one fits and no live block
    /// overlaps it; counts the allocation either way.
    ///
    /// In order, the `next` slot serves a request of its size. Otherwise the
    /// pass deviated from the recording, and a request takes, in this order:
    ///
    /// - the slot after the one an earlier request re-synchronised to but
    ///   was refused (`resume`), if it is of its size: it confirms that
    ///   re-synchronisation;
    /// - the `next` slot, if it fits it and is at least half its size (the
    ///   same tensor, a smaller shape);
    /// - the first slot of its size not yet used this pass at or after
    ///   `next` (from a per-size cursor, so extra allocations of other sizes
    ///   change nothing), and the sequence continues after it, only if that
    ///   slot is provably its own as far as the recording tells: every block
    ///   recorded from `next` up to it was freed by then (one-time work the
    ///   pass skips), or the pass is getting back in step after a guess (see
    ///   `unconfirmed`). An extra allocation kept live in a slot that is not
    ///   its own would cover the later blocks planned in the same memory
    ///   for as long as it lives; refused, it costs only itself;
    /// - else, without moving on, the first slot of its size that no later
    ///   slot shares memory with (it can cost at most that slot's owner), or
    ///   nothing: the backing allocator.
    fn allocate_planned(&self, layout: Layout) -> Option<NonNull<u8>> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.passes == 0 {
            return None;
        }
        let position = state.report.allocations;
        state.report.allocations += 1;
        let base = self.base?;
        let len = layout.size().checked_next_multiple_of(crate::MIN_ALIGN)?;
        let epoch = state.epoch;
        // `exact`: the slot's size is the request's; else the request fits
        // a slot at most twice its size (the same tensor, a smaller shape).
        let usable = |state: &PassState, index: usize, exact: bool| {
            self.plan.slot(index).filter(|slot| {
                (if exact {
                    slot.size == len
                } else {
                    layout.size() <= slot.size && slot.size / 2 <= len
                }) && layout.align() <= slot.align
                    && state.used[index] != epoch
                    && !state.overlaps(slot.offset, slot.offset + layout.size())
            })
        };
        let next = state.next;
        if next < self.plan.allocations() && self.plan.slot(next).is_none() {
            // The recording's allocation here has no slot (it outlived the
            // recording): this one takes its place in the sequence, from the
            // backing allocator.
            state.next = next + 1;
            state.report.in_order += 1;
            return None;
        }
        if let Some(slot) = usable(state, next, true) {
            state.report.in_order += 1;
            state.resume = None;
            state.unconfirmed = state.unconfirmed.filter(|&size| size == slot.size);
            state.next = next + 1;
            return Some(self.hand_out(state, base, next, slot, layout));
        }
        if let Some(resume) = state.resume
            && let Some(slot) = usable(state, resume, true)
        {
            state.report.in_order += 1;
            state.resume = None;
            state.unconfirmed = Some(slot.size);
            state.next = resume + 1;
            return Some(self.hand_out(state, base, resume, slot, layout));
        }
        state.report.deviations += 1;
        state
            .report
            .first_deviation
            .get_or_insert((position, layout));
        if let Some(slot) = usable(state, next, false) {
            state.resume = None;
            state.next = next + 1;
            return Some(self.hand_out(state, base, next, slot, layout));
        }
        // A request of the `next` slot's size and alignment is that slot's
        // (which a block freed late still covers, or which a deviating
        // request took): any other slot it could take is someone else's.
        let owns_next = self
            .plan
            .slot(next)
            .is_some_and(|slot| slot.size == len && layout.align() <= slot.align);
        let (ahead, alone) =
            self.resync(state, len, next, |state, index| usable(state, index, true));
        if let Some(index) = ahead
            && !owns_next
            && (state.unconfirmed.is_some() || self.plan.settled(index) <= next)
            && let Some(slot) = usable(state, index, true)
        {
            state.resume = None;
            state.unconfirmed = Some(slot.size);
            state.next = index + 1;
            return Some(self.hand_out(state, base, index, slot, layout));
        }
        // Not provably the recording's: an extra allocation, or one of a
        // pass that left out blocks the recording still had live. The
        // next request tells (see `resume`).
        if !owns_next && let Some(index) = ahead {
            state.resume = Some(index + 1);
        }
        // The sequence stays where it is, unless this request took the
        // place of the `next` block (a changed shape, or the block's slot is
        // covered).
        if self
            .plan
            .slot(next)
            .is_none_or(|slot| slot.size / 2 <= len && len <= slot.size.saturating_mul(2))
        {
            state.next = next + 1;
        }
        let (index, slot) = alone?;
        Some(self.hand_out(state, base, index, slot, layout))
    }

    /// Marks slot `index` used and live for a request of `layout`, and
    /// returns its block.
    fn hand_out(
        &self,
        state: &mut PassState,
        base: NonNull<u8>,
        index: usize,
        slot: super::Slot,
        layout: Layout,
    ) -> NonNull<u8> {
        state.used[index] = state.epoch;
        let (start, end) = (slot.offset, slot.offset + layout.size());
        {
            let _inside = reentry::inside();
            state.live.insert(start, end);
        }
        state.stats.on_arena_hit(layout.size());
        // SAFETY: the plan keeps every slot inside the arena (`slot.offset +
        // slot.size <= arena_bytes`), so the offset is in bounds.
        let block = unsafe { base.add(start) };
        poison::unpoison(block, layout.size());
        block
    }
}

impl<A: Allocator> PlanArena<A> {
    /// Among the first few slots of `len` bytes from the size's cursor on:
    /// the first not used this pass at or after `next` (the request's own
    /// if the pass skipped the recording's blocks before it), and the first
    /// for which `usable` holds that no later slot shares memory with.
    /// Moves the cursor past the used ones.
    fn resync(
        &self,
        state: &mut PassState,
        len: usize,
        next: usize,
        usable: impl Fn(&PassState, usize) -> Option<super::Slot>,
    ) -> (Option<usize>, Option<(usize, super::Slot)>) {
        /// Candidates tried per request.
        const TRIES: usize = 8;
        let Some(indices) = self.by_size.get(&len) else {
            return (None, None);
        };
        let cursor = state.cursors.get(&len).copied().unwrap_or(0);
        // Step over the slots this pass already used.
        let cursor = cursor
            + indices[cursor..]
                .iter()
                .take_while(|&&index| state.used[index] == state.epoch)
                .count();
        {
            let _inside = reentry::inside();
            state.cursors.insert(len, cursor);
        }
        let tried = &indices[cursor..indices.len().min(cursor + TRIES)];
        let ahead = tried
            .iter()
            .copied()
            .find(|&index| index >= next && state.used[index] != state.epoch);
        let alone = tried.iter().find_map(|&index| {
            self.alone[index]
                .then(|| usable(state, index))
                .flatten()
                .map(|slot| (index, slot))
        });
        (ahead, alone)
    }
}

impl<A: Allocator> Drop for PlanArena<A> {
    fn drop(&mut self) {
        if let Some(base) = self.base {
            poison::unpoison(base, self.layout.size());
            let _inside = reentry::inside();
            // SAFETY: the arena was taken from `backing` with `layout`; the
            // last handle is gone, so no block of it is in use.
            unsafe { self.backing.deallocate(base, self.layout) };
        }
    }
}

impl<A: Allocator> Drop for Pass<A> {
    fn drop(&mut self) {
        let mut state = self.planned.inner.state.lock();
        state.passes -= 1;
    }
}

/// The guard of [`Planned::enter`]: a scope and a pass, ending together.
#[cfg(not(loom))]
#[must_use = "the scope and the pass end when the guard is dropped"]
pub struct PlannedScope<A: Allocator = Global> {
    // Dropped in this order: the scope ends before the pass.
    scope: crate::Scope,
    _pass: Pass<A>,
}

#[cfg(not(loom))]
impl<A: Allocator> PlannedScope<A> {
    /// The blocks this scope handed out that are still live (see
    /// [`Scope::live_blocks`](crate::Scope::live_blocks)).
    pub fn live_blocks(&self) -> crate::LiveBlocks {
        self.scope.live_blocks()
    }
}

#[cfg(not(loom))]
impl<A: Allocator> fmt::Debug for PlannedScope<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlannedScope")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl<A: Allocator> fmt::Debug for Pass<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pass").finish_non_exhaustive()
    }
}

allocator_impls!(Planned, inner);

impl<A: Allocator> Clone for Planned<A> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<A: Allocator> fmt::Debug for Planned<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Planned")
            .field("arena_bytes", &self.inner.layout.size())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

//! `SizePolicy::BestFit` in the cache: blocks carved out of the arena's
//! segments (`best_fit.rs`), and the cap, the budget, trims and releases over
//! its free bytes.
//!
//! Locking: the arena changes only under the cache's lock, with the thread
//! marked inside (its tables allocate through the global allocator). A
//! reservation's system calls (`mprotect`, `madvise`, `mmap`) run under the
//! lock: they call no user code, and running them there means no other thread
//! can carve a range while its pages are being dropped. The backing
//! allocator and the budget are called with the lock released, as everywhere
//! in the cache.

use core::alloc::Layout;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};

use super::state::{Reconcile, State};
use super::{Cache, hand_out};
use crate::alloc::RawAllocator;
use crate::best_fit::{self, Carved, Shed};
use crate::budget::Budget;
use crate::front::Deltas;
use crate::reentry;
use crate::stats::Count;
use crate::unwind::Deferred;

/// Brings the budget's hard limit in step when dropped (at the end of an
/// operation that may have shed).
struct SyncOnDrop<'a, A: Allocator>(&'a Cache<A>);

impl<A: Allocator> Drop for SyncOnDrop<'_, A> {
    fn drop(&mut self) {
        self.0.sync_budget();
    }
}

/// Why no block could be carved.
enum Refused {
    /// The hard limit (`Builder::max_bytes`).
    Limit,
    /// The backing allocator or the system.
    Backing(AllocError),
}

/// What an operation leaves for `settle`: the free bytes now, and whether
/// caching stopped.
#[derive(Clone, Copy)]
struct After {
    cached: usize,
    stopped: bool,
}

impl After {
    fn of(state: &State) -> Self {
        After {
            cached: state.stats().bytes_cached,
            stopped: state.caching_stopped(),
        }
    }
}

impl<A: Allocator> Cache<A> {
    pub(super) fn allocate_carved(
        &self,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        self.allocate_carved_folding(layout, zeroed, None)
    }

    /// `allocate_carved`, folding a front's counters under the same lock as
    /// the carve (one lock for a front's slow path, not two).
    pub(super) fn allocate_carved_folding(
        &self,
        layout: Layout,
        zeroed: bool,
        mut fold: Option<Deltas>,
    ) -> Result<NonNull<[u8]>, AllocError> {
        self.decay_if_due();
        let Some((len, align)) = best_fit::block_of(layout) else {
            self.state.lock().count().on_failure();
            return Err(AllocError);
        };
        let (carved, after) = match self.carve_anywhere(layout, len, align, &mut fold) {
            Ok(done) => done,
            Err(Refused::Backing(error)) => return Err(error),
            // Past the hard limit: this cache's free memory goes back
            // first, then once more.
            Err(Refused::Limit) => {
                self.release_cached();
                match self.carve_anywhere(layout, len, align, &mut fold) {
                    Ok(done) => done,
                    Err(Refused::Backing(error)) => return Err(error),
                    Err(Refused::Limit) => {
                        self.state.lock().count().on_limit_failure();
                        self.record(crate::history::Action::LimitFailure, layout.size(), 0);
                        return Err(AllocError);
                    }
                }
            }
        };
        self.settle(after);
        // SAFETY: a carved block lies inside a segment of the arena, and is
        // used only while it is live (its segment stays until it is freed).
        let block = unsafe { best_fit::pointer(carved.start) };
        // SAFETY: the block was just carved for us: nobody else references
        // it, and it holds `carved.len >= layout.size()` writable bytes.
        Ok(unsafe { hand_out(block, layout, zeroed) })
    }

    /// A block from the free ranges; or, before the arena grows, from the
    /// blocks sitting in per-CPU fronts, which come back into it (they may
    /// merge into a fit: a cache with fronts holds no more than one
    /// without, but for what its fronts hold between growths); or from a
    /// reservation grown for it; or from a new fixed segment.
    fn carve_anywhere(
        &self,
        layout: Layout,
        len: usize,
        align: usize,
        fold: &mut Option<Deltas>,
    ) -> Result<(Carved, After), Refused> {
        if let Some(done) = self.carve_existing(layout, len, align, false, fold) {
            return Ok(done);
        }
        if self.drain_cpu_fronts_for(len)
            && let Some(done) = self.carve_existing(layout, len, align, false, fold)
        {
            return Ok(done);
        }
        // Growth: counted on the budget's hard limit first (with the lock
        // released: it may evict other members), the surplus given back
        // after.
        let bound = len
            .saturating_add(align)
            .saturating_add(crate::reservation::page_size());
        if !self.precommit(bound) {
            return Err(Refused::Limit);
        }
        let grown = match self.carve_existing(layout, len, align, true, fold) {
            Some(done) => Ok(done),
            None => self.carve_new_segment(layout, len, align),
        };
        self.sync_budget();
        grown
    }

    /// A block from the free ranges, or (with `grow`) from a reservation
    /// grown for it within the hard limit.
    fn carve_existing(
        &self,
        layout: Layout,
        len: usize,
        align: usize,
        grow: bool,
        fold: &mut Option<Deltas>,
    ) -> Option<(Carved, After)> {
        let mut state = self.state.lock();
        if let Some(deltas) = fold.take() {
            state.fold(&deltas);
        }
        let _inside = reentry::inside();
        let arena = state.arena();
        let (carved, grew) = match arena.carve(len, align) {
            Some(carved) => (carved, false),
            None if grow => {
                let room = state.room(self.config.max_bytes);
                (state.arena().grow_and_carve(len, align, room)?, true)
            }
            None => return None,
        };
        state
            .count()
            .on_carved(layout.size(), carved.len, !carved.fresh);
        state.sync_held(self.config.budget.as_ref());
        state.note_reuse();
        if grew {
            state.count().on_growth();
            if let Some((start, len)) = state.arena().take_growth() {
                self.record(crate::history::Action::SegmentMap, len, start);
            }
        }
        Some((carved, After::of(&state)))
    }

    /// A block from a new fixed segment taken from the backing allocator; if
    /// that fails, the cache is released and it is tried once more (c10's
    /// out-of-memory path).
    fn carve_new_segment(
        &self,
        layout: Layout,
        len: usize,
        align: usize,
    ) -> Result<(Carved, After), Refused> {
        let segment = self.state.lock().arena().fixed_segment_layout(len, align);
        if let Some(segment) = segment
            && !self.precommit(segment.size())
        {
            return Err(Refused::Limit);
        }
        let segment = {
            let mut state = self.state.lock();
            match segment {
                Some(segment) if segment.size() > state.room(self.config.max_bytes) => {
                    return Err(Refused::Limit);
                }
                Some(segment) => {
                    state.begin_pending(segment.size());
                    Some(segment)
                }
                None => None,
            }
        };
        let Some(segment) = segment else {
            self.state.lock().count().on_failure();
            return Err(Refused::Backing(AllocError));
        };
        let taken = self.backing_allocate_or_retry(segment, false);
        // Out of `pending` in the same breath as the segment joins the
        // arena (or fails).
        let mut state = self.state.lock();
        state.end_pending(segment.size());
        let memory = taken.map_err(Refused::Backing)?;
        let start = memory.cast::<u8>().as_ptr().expose_provenance();
        let _inside = reentry::inside();
        let arena = state.arena();
        arena.add_fixed(start, segment);
        self.record(crate::history::Action::SegmentAlloc, segment.size(), start);
        // The segment fits the block at its start (it is at least `len`
        // bytes, aligned to at least `align`), and no other thread carved from
        // it: the lock was held since it was added.
        let carved = arena.carve(len, align);
        state.count().on_growth();
        let Some(carved) = carved else {
            // Only if the live-block table could not grow.
            state.count().on_failure();
            state.sync_held(self.config.budget.as_ref());
            return Err(Refused::Backing(AllocError));
        };
        state.count().on_carved(layout.size(), carved.len, false);
        state.sync_held(self.config.budget.as_ref());
        Ok((carved, After::of(&state)))
    }

    /// # Safety
    ///
    /// `block` was carved by this cache for `layout` and is not used after.
    pub(super) unsafe fn deallocate_carved(&self, block: NonNull<u8>, layout: Layout) {
        // SAFETY: this function's contract.
        unsafe { self.deallocate_carved_folding(block, layout, None) }
    }

    /// `deallocate_carved`, folding a front's counters under its lock.
    ///
    /// # Safety
    ///
    /// As for `deallocate_carved`.
    pub(super) unsafe fn deallocate_carved_folding(
        &self,
        block: NonNull<u8>,
        layout: Layout,
        fold: Option<Deltas>,
    ) {
        let after = {
            let mut state = self.state.lock();
            if let Some(deltas) = &fold {
                state.fold(deltas);
            }
            let _inside = reentry::inside();
            // A layout a block was carved for has a block length.
            let Some((len, _)) = best_fit::block_of(layout) else {
                return;
            };
            let len = state.arena().uncarve(block.as_ptr().addr(), len);
            state.count().on_uncarved(layout.size(), len);
            state.sync_held(self.config.budget.as_ref());
            After::of(&state)
        };
        self.settle(after);
    }

    /// In place when the block already holds the new layout (a shrink gives
    /// its tail back), else through a new block, copying.
    ///
    /// # Safety
    ///
    /// `block` is live and was carved by this cache for `old`.
    pub(super) unsafe fn resize_carved(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() != 0
            && new.size() != 0
            && let Some((old_request, _)) = best_fit::block_of(old)
            && let Some((len, align)) = best_fit::block_of(new)
            && block.as_ptr().addr().is_multiple_of(align)
        {
            let resized = {
                let mut state = self.state.lock();
                let _inside = reentry::inside();
                let arena = state.arena();
                let start = block.as_ptr().addr();
                let old_len = arena.block_len(start, old_request);
                match (len <= old_len).then(|| arena.shrink(start, old_request, len)) {
                    Some(Some(new_len)) => {
                        state.count().resize_in_use(
                            old.size(),
                            new.size(),
                            new_len.wrapping_sub(old_len),
                        );
                        state.sync_held(self.config.budget.as_ref());
                        Some(After::of(&state))
                    }
                    _ => None,
                }
            };
            if let Some(after) = resized {
                if zeroed && new.size() > old.size() {
                    // SAFETY: the block is live, ours to write, and holds at
                    // least `len >= new.size()` bytes.
                    unsafe {
                        ptr::write_bytes(block.as_ptr().add(old.size()), 0, new.size() - old.size())
                    };
                }
                self.settle(after);
                return Ok(NonNull::slice_from_raw_parts(block, new.size()));
            }
        }
        // Through `RawAllocator::allocate`: a zero-sized `new` is dangling.
        let moved = RawAllocator::allocate(self, new, zeroed)?;
        let kept = old.size().min(new.size());
        // SAFETY: `block` is live with `old.size()` readable bytes and `moved`
        // is a different live block (the arena never carves a live range
        // twice) with `new.size()` writable bytes; both hold at least `kept`.
        unsafe { ptr::copy_nonoverlapping(block.as_ptr(), moved.cast::<u8>().as_ptr(), kept) };
        if old.size() != 0 {
            // SAFETY: `block` was carved for `old` (contract), and the caller
            // stops using it once we return the new one.
            unsafe { self.deallocate_carved(block, old) };
        }
        Ok(moved)
    }

    /// After an operation: caching stopped sheds everything, the cap sheds
    /// down to it, and the budget learns the free bytes.
    fn settle(&self, after: After) {
        let cap = self.config.max_cached_bytes;
        let over_cap = cap.is_some_and(|cap| after.cached > cap);
        if !after.stopped && !over_cap && self.config.budget.is_none() {
            return;
        }
        // Whatever this operation shed, the budget's hard limit learns it
        // (after the shedding below).
        let _synced = SyncOnDrop(self);
        let mut panics = Deferred::new();
        if after.stopped {
            self.shed_carved(0, Count::Evict, &mut panics);
        } else if let Some(cap) = cap
            && over_cap
        {
            self.shed_carved(cap, Count::Evict, &mut panics);
        }
        if let Some(budget) = &self.config.budget {
            self.reconcile(budget, &mut panics);
        }
        panics.resume();
    }

    /// Brings the bytes reserved on `budget` to the cache's free bytes:
    /// gives back a surplus; reserves a shortfall, and if the budget has no
    /// room even after evicting its oldest, sheds the cache's own free memory
    /// instead. Bytes that cannot be shed (pinned) are counted anyway.
    ///
    /// Between a free and this call the budget may count a few bytes too few:
    /// a best-fit cache learns its free bytes only once the range merged.
    fn reconcile(&self, budget: &Budget, panics: &mut Deferred) {
        for _ in 0..8 {
            let shortfall = match self.state.lock().reconcile() {
                Reconcile::Surplus(surplus) => {
                    budget.unreserve(surplus);
                    return;
                }
                Reconcile::Shortfall(shortfall) => shortfall,
            };
            if panics.catch(|| budget.reserve(shortfall)) == Some(true) {
                self.state.lock().reserved_on_budget(shortfall);
                continue;
            }
            let held = self.state.lock().reserved();
            if self.shed_carved(held, Count::Evict, panics) == 0 {
                budget.force(shortfall);
                self.state.lock().reserved_on_budget(shortfall);
            }
        }
    }

    /// Gives the budget back what the cache no longer holds (after an
    /// eviction the budget asked for: never reserves, so never recurses).
    fn unreserve_surplus(&self, budget: &Budget) {
        let surplus = self.state.lock().take_budget_surplus();
        budget.unreserve(surplus);
    }

    /// Sheds free memory down to `target` cached bytes (see `Arena::shed`;
    /// a decay: `Arena::decay`, whose fixed segments are those idle a whole
    /// window, whatever the target) and gives the emptied fixed segments
    /// back; the bytes shed.
    pub(super) fn shed_carved(&self, target: usize, count: Count, panics: &mut Deferred) -> usize {
        let Shed {
            segments,
            bytes,
            unmapped,
            ..
        } = {
            let mut state = self.state.lock();
            let _inside = reentry::inside();
            let shed = match count {
                Count::Decay => state.arena().decay(target),
                Count::Release | Count::Evict => state.arena().shed(target),
            };
            state
                .count()
                .on_shed(count, shed.pieces, shed.bytes, shed.segment_frees);
            state.sync_held(self.config.budget.as_ref());
            shed
        };
        if self.history().is_some() {
            use crate::history::Action;
            let mut given = 0;
            for &(start, layout) in &segments {
                self.record(Action::SegmentFree, layout.size(), start);
                given += layout.size();
            }
            for &(start, len) in &unmapped {
                self.record(Action::SegmentUnmap, len, start);
                given += len;
            }
            if bytes > given {
                // The rest: pages decommitted in place.
                self.record(Action::Decommit, bytes - given, 0);
            }
        }
        let _inside = reentry::inside();
        for (start, layout) in segments {
            panics.catch(|| {
                // SAFETY: the segment was taken from the backing allocator
                // with `layout` at `start` (its pointer exposed then), and
                // left the arena under the lock with no live block in it:
                // ours alone, given back once.
                unsafe { self.backing.deallocate(best_fit::pointer(start), layout) }
            });
        }
        bytes
    }

    /// The arena's side of `Cache::give_back_free`: sheds down to
    /// `target`, then gives the budget back what it no longer holds.
    pub(super) fn shed_arena(&self, target: usize, count: Count, panics: &mut Deferred) -> usize {
        let bytes = self.shed_carved(target, count, panics);
        if let Some(budget) = &self.config.budget {
            self.unreserve_surplus(budget);
        }
        bytes
    }

    /// One piece of free memory back, for the budget: whether any was.
    pub(super) fn evict_carved(&self) -> bool {
        let cached = self.state.lock().stats().bytes_cached;
        let mut panics = Deferred::new();
        let mut shed = self.shed_carved(cached.saturating_sub(1), Count::Evict, &mut panics);
        if shed == 0 && self.drain_cpu_fronts_for(1) {
            // The arena had nothing left to shed: what its per-CPU fronts
            // held (an idle model's, say) comes back into it and goes.
            let cached = self.state.lock().stats().bytes_cached;
            shed = self.shed_carved(cached.saturating_sub(1), Count::Evict, &mut panics);
        }
        if let Some(budget) = &self.config.budget {
            self.unreserve_surplus(budget);
        }
        panics.resume();
        shed > 0
    }

    /// The cache is going away: every segment goes back (all free: no user
    /// is left), the fixed ones to the backing allocator, and the budget
    /// gets back every byte it counted for this cache.
    pub(super) fn drop_segments(&self, panics: &mut Deferred) {
        let (fixed, reservations, reserved) = {
            let mut state = self.state.lock();
            let _inside = reentry::inside();
            let reserved = state.take_reserved_on_budget();
            let arena = state.arena();
            // SAFETY: the cache is dropping: no user is left to hold a block
            // in a reservation, and nothing carves after this.
            let reservations = unsafe { arena.take_reservations() };
            (arena.take_fixed(), reservations, reserved)
        };
        drop(reservations);
        self.unreserve(reserved);
        let _inside = reentry::inside();
        for (start, layout) in fixed {
            panics.catch(|| {
                // SAFETY: as in `shed_carved`: taken with `layout`, out of
                // the arena, and no user is left to hold a block in it.
                unsafe { self.backing.deallocate(best_fit::pointer(start), layout) }
            });
        }
    }
}

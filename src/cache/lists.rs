//! `SizePolicy::SizeClasses` and `SizePolicy::Exact` in the cache: a free
//! list a key, each block its own backing allocation; a cap or a budget
//! evicts block by block (`eviction.rs` picks which). The cache's dispatch
//! (`cache.rs`) sends each operation here or to `carving.rs`, once.
//!
//! Locking: as everywhere in the cache, the lists change only under the
//! lock, and the backing allocator and the budget are called with it
//! released.

use core::alloc::Layout;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};

use super::state::Evicted;
use super::{Cache, fronts, hand_out};
use crate::alloc::RawAllocator;
use crate::eviction::Victim;
use crate::front::{Bin, DEPTH, Deltas, Owner};
use crate::history::Action;
use crate::poison;
use crate::policy::Key;
use crate::reentry;
use crate::stats::Count;
use crate::unwind::Deferred;

/// Blocks a front miss takes from the shared lists beyond the one it serves.
const REFILL: usize = DEPTH / 2;

impl<A: Allocator> Cache<A> {
    /// A cached block of the layout's key, else a new one.
    #[inline]
    pub(super) fn allocate_listed(
        &self,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        self.decay_if_due();
        let Some(key) = self.key(layout) else {
            self.state.lock().count().on_failure();
            return Err(AllocError);
        };
        let popped = {
            let mut state = self.state.lock();
            let popped = state.pop(key);
            if popped.is_some() {
                state.count().on_hit(layout.size(), key.size());
                state.note_reuse();
            }
            popped
        };
        let Some(block) = popped else {
            let block = self.allocate_block(key, layout.size(), zeroed)?;
            return Ok(NonNull::slice_from_raw_parts(block, layout.size()));
        };
        poison::unpoison(block, key.size());
        if let Some(budget) = &self.config.budget {
            budget.unreserve(key.size());
        }
        // SAFETY: the block was just taken off a free list, so nobody else
        // references it, and it holds `key.size() >= layout.size()` bytes.
        Ok(unsafe { hand_out(block, layout, zeroed) })
    }

    /// A front miss on the free lists: the slot's counters folded, one
    /// block of `key` for the request and up to [`REFILL`] more for the
    /// front, under one lock.
    pub(super) fn allocate_listed_for_front(
        &self,
        slot: &Owner<'_>,
        key: Key,
        layout: Layout,
        zeroed: bool,
        deltas: Deltas,
        panics: &mut Deferred,
    ) -> Result<NonNull<[u8]>, AllocError> {
        let mut refill = [ptr::null_mut(); REFILL];
        let mut taken = 0;
        let popped = {
            let mut state = self.state.lock();
            state.fold(&deltas);
            let popped = state.pop(key);
            if popped.is_some() {
                state.count().on_hit(layout.size(), key.size());
                state.note_reuse();
                while taken < REFILL {
                    let Some(block) = state.pop(key) else { break };
                    refill[taken] = block.as_ptr();
                    taken += 1;
                    state.count().on_moved_to_front(key.size());
                }
            }
            popped
        };
        let Some(block) = popped else {
            let block = self.allocate_block(key, layout.size(), zeroed)?;
            return Ok(NonNull::slice_from_raw_parts(block, layout.size()));
        };
        let kept = slot.refill(key, &refill[..taken]);
        // The user's block and the kept ones left the shared lists: the
        // budget counted them as cached; now one is in use and the others
        // sit in the front's credit.
        if let Some(budget) = &self.config.budget {
            budget.unreserve(key.size() * (1 + kept));
        }
        if kept < taken {
            let mut batch = Bin::EMPTY;
            batch.key = Some(key);
            batch.len = taken - kept;
            batch.blocks[..batch.len].copy_from_slice(&refill[kept..taken]);
            // Listed again: they left the lists above, uncounted as moves.
            self.relist_batch(&Deltas::default(), &batch, false, panics);
        }
        poison::unpoison(block, key.size());
        // SAFETY: the block just left the free lists, so nobody else
        // references it; it holds `key.size() >= layout.size()` bytes.
        Ok(unsafe { hand_out(block, layout, zeroed) })
    }

    /// A new block of `key` for a request of `requested` bytes from the
    /// backing allocator, counted as a miss. If it fails, the cache is
    /// released and the allocation tried once more (c10's out-of-memory
    /// path); a hard limit is checked first (`take_room`).
    fn allocate_block(
        &self,
        key: Key,
        requested: usize,
        zeroed: bool,
    ) -> Result<NonNull<u8>, AllocError> {
        let size = key.size();
        if !self.take_room(size) {
            return Err(AllocError);
        }
        let taken = self
            .backing_allocate_or_retry(key.block_layout(), zeroed)
            .map(NonNull::cast::<u8>);
        let limited = self.config.max_bytes.is_some() || self.limiting_budget().is_some();
        let mut state = self.state.lock();
        if limited {
            state.end_pending(size);
        }
        if let Ok(block) = &taken {
            // In the books in the same breath as it leaves `pending`.
            state.count().on_miss(requested, size);
            self.record(Action::SegmentAlloc, size, block.as_ptr().addr());
        }
        drop(state);
        if taken.is_err() {
            self.sync_budget();
        }
        taken
    }

    /// Lists a freed block, or gives it back if it may not be cached
    /// (larger than the cap or the budget, or caching stopped); then the
    /// budget's hard limit learns what went back.
    ///
    /// # Safety
    ///
    /// `RawAllocator::deallocate`'s contract.
    pub(super) unsafe fn deallocate_listed(&self, block: NonNull<u8>, layout: Layout) {
        // SAFETY: this function's contract.
        unsafe { self.list_or_free(block, layout) };
        // A block given back, or evicted to make room: the budget's hard
        // limit learns it.
        self.sync_budget();
    }

    /// `deallocate_listed` before the budget's hard limit learns it.
    ///
    /// # Safety
    ///
    /// `RawAllocator::deallocate`'s contract.
    unsafe fn list_or_free(&self, block: NonNull<u8>, layout: Layout) {
        // A block handed out for `layout` proves the key exists.
        let Some(key) = self.key(layout) else {
            return;
        };
        let requested = layout.size();
        if self
            .config
            .max_cached_bytes
            .is_some_and(|cap| key.size() > cap)
        {
            // SAFETY: this function's contract.
            return unsafe { self.free_to_backing(block, key, requested) };
        }
        // The budget's share is reserved before the block is listed, so the
        // caches on it never hold more than it, not even for a moment; and
        // only for a block this cache will list, since reserving may evict
        // other caches' blocks.
        // A panic reached through the budget or a backing call: resumed once
        // the block is listed or given back.
        let mut panics = Deferred::new();
        if let Some(budget) = &self.config.budget
            && (self.state.lock().caching_stopped()
                || panics.catch(|| budget.reserve(key.size())) != Some(true))
        {
            // SAFETY: this function's contract.
            unsafe { self.free_to_backing(block, key, requested) };
            return panics.resume();
        }
        // Poisoned before it is listed: once listed, another thread may take
        // (and unpoison) it at any moment.
        poison::poison(block, key.size());
        let mut drains = 0;
        loop {
            let mut state = self.state.lock();
            if state.caching_stopped() {
                drop(state);
                self.unreserve(key.size());
                // SAFETY: this function's contract.
                unsafe { self.free_to_backing(block, key, requested) };
                return panics.resume();
            }
            if let Some(cap) = self.config.max_cached_bytes
                && state.stats().bytes_cached + state.credit_out() + key.size() > cap
            {
                // Make room: the cheapest cached block goes back. One at a
                // time, with the lock released around the backing call.
                let evicted = state.evict(Victim::Cheapest);
                let credit_out = state.credit_out();
                drop(state);
                let Some(evicted) = evicted else {
                    // The fronts' credit is in the way: take it back (a
                    // drain returns it), at most twice.
                    if credit_out > 0 && drains < 2 {
                        drains += 1;
                        let _ = self.drain_fronts(fronts::Drain::Live, &mut panics);
                        continue;
                    }
                    self.unreserve(key.size());
                    // SAFETY: this function's contract.
                    unsafe { self.free_to_backing(block, key, requested) };
                    return panics.resume();
                };
                // Caught: `block` is still to be listed.
                self.give_back_evicted(evicted, &mut panics);
                continue;
            }
            let age = state.next_age(self.config.budget.as_ref());
            if state.push(key, block, age).is_err() {
                drop(state);
                self.unreserve(key.size());
                // SAFETY: this function's contract.
                unsafe { self.free_to_backing(block, key, requested) };
                return panics.resume();
            }
            state.count().on_free(requested, key.size());
            drop(state);
            return panics.resume();
        }
    }

    /// A block in use goes straight back to the backing allocator.
    ///
    /// # Safety
    ///
    /// `block` is a live block of this cache for a request of `requested`
    /// bytes under `key`, unused from now on.
    unsafe fn free_to_backing(&self, block: NonNull<u8>, key: Key, requested: usize) {
        self.state
            .lock()
            .count()
            .on_free_uncached(requested, key.size());
        // SAFETY: the caller's contract: the block is ours and was taken with
        // `key`'s layout.
        unsafe { self.give_back(block, key) };
    }

    /// Gives back a block `State::evict` took (its books are done): the
    /// budget's share, then the backing allocator, a panic kept in
    /// `panics`.
    pub(super) fn give_back_evicted(&self, evicted: Evicted, panics: &mut Deferred) {
        self.unreserve(evicted.key().size());
        panics.catch(|| {
            // SAFETY: an `Evicted` left the free lists under the lock, so
            // the block is ours alone, and it was taken with its key's
            // layout (see `state::Evicted`).
            unsafe { self.give_back(evicted.block(), evicted.key()) }
        });
    }

    /// `grow` and `shrink`: in place when both layouts map to the same
    /// free list, else through a block of the new key (cached if one is),
    /// copying.
    ///
    /// # Safety
    ///
    /// `block` is live and was handed out by this cache for `old`.
    pub(super) unsafe fn resize_listed(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() != 0 && new.size() != 0 && self.key(old) == self.key(new) {
            // Same key: the block already has the new layout's size class and
            // alignment class.
            let deltas = self.front().map(|owner| owner.take_counters());
            let mut state = self.state.lock();
            if let Some(deltas) = &deltas {
                state.fold(deltas);
            }
            state.count().on_resize_in_place(old.size(), new.size());
            drop(state);
            if zeroed && new.size() > old.size() {
                // SAFETY: the block is live, ours to write, and holds at least
                // `new.size()` bytes (its key's size).
                unsafe {
                    ptr::write_bytes(block.as_ptr().add(old.size()), 0, new.size() - old.size())
                };
            }
            return Ok(NonNull::slice_from_raw_parts(block, new.size()));
        }
        let moved = RawAllocator::allocate(self, new, zeroed)?;
        let kept = old.size().min(new.size());
        // SAFETY: `block` is live with `old.size()` readable bytes and `moved`
        // is a different live block (a free list never holds a live block) with
        // `new.size()` writable bytes; both hold at least `kept`.
        unsafe { ptr::copy_nonoverlapping(block.as_ptr(), moved.cast::<u8>().as_ptr(), kept) };
        // SAFETY: `block` was handed out for `old` (contract), and the caller
        // stops using it once we return the new one.
        unsafe { RawAllocator::deallocate(self, block, old) };
        Ok(moved)
    }

    /// Gives cached blocks back until at most `target_bytes` stay cached,
    /// counted as `count` says (a release takes every list at once); the
    /// bytes given back. A panicking backing `deallocate` stops none of it.
    pub(super) fn shed_lists(
        &self,
        target_bytes: usize,
        count: Count,
        panics: &mut Deferred,
    ) -> usize {
        match count {
            Count::Release => self.release_lists(panics),
            Count::Evict | Count::Decay => self.trim_lists(target_bytes, count, panics),
        }
    }

    /// Every list at once back to the backing allocator.
    fn release_lists(&self, panics: &mut Deferred) -> usize {
        let released = self.state.lock().release_lists();
        self.unreserve(released.bytes);
        // The blocks left the free lists under the lock, so no other thread
        // can hand them out; give them back without holding it.
        let _inside = reentry::inside();
        for (key, list) in released.lists {
            for cached in list {
                panics.catch(|| {
                    // SAFETY: every listed block was taken from the backing
                    // allocator with `key`'s layout, is owned by the cache
                    // alone, and is no longer listed, so it is given back once.
                    unsafe { self.give_back(cached.block, key) }
                });
            }
        }
        drop(released.index);
        released.bytes
    }

    /// Oldest first, one block at a time with the lock released around the
    /// backing call.
    fn trim_lists(&self, target_bytes: usize, count: Count, panics: &mut Deferred) -> usize {
        let mut trimmed = 0;
        loop {
            let evicted = {
                let mut state = self.state.lock();
                if state.stats().bytes_cached <= target_bytes {
                    break;
                }
                let evicted = state.evict(Victim::Oldest);
                if count == Count::Decay
                    && let Some(evicted) = &evicted
                {
                    state.count().evicted_by_decay(evicted.key().size());
                }
                evicted
            };
            let Some(evicted) = evicted else {
                break;
            };
            trimmed += evicted.key().size();
            self.give_back_evicted(evicted, panics);
        }
        trimmed
    }

    /// One block back for the budget (or a front's credit): whether any
    /// was.
    pub(super) fn evict_listed(&self) -> bool {
        let (oldest, credit_out) = {
            let state = self.state.lock();
            (state.oldest(), state.credit_out())
        };
        // A panic of the backing while fronts give their blocks back is
        // resumed once the drain is done (the budget's caller catches it).
        let mut panics = Deferred::new();
        if credit_out > 0
            && self.oldest_front(oldest).is_some()
            && self.evict_oldest_front(&mut panics)
        {
            panics.resume();
            return true;
        }
        let evicted = self.state.lock().evict(Victim::Oldest);
        let Some(evicted) = evicted else {
            // Drained fronts give their credit back to the budget.
            let drained = credit_out > 0 && self.drain_fronts(fronts::Drain::Live, &mut panics) > 0;
            panics.resume();
            return drained;
        };
        self.give_back_evicted(evicted, &mut panics);
        panics.resume();
        true
    }
}

//! The cache's side of the per-thread front caches (`front.rs`): the slow
//! paths behind a front miss or a full front, the batches that move blocks
//! between a front and the shared free lists (or the best-fit arena), and the
//! drains that bring every front's blocks home for a release, a trim or the
//! cache's drop.
//!
//! Locking: a slot is drained with the shared lock released, and the shared
//! lock is then taken once for the whole magazine. No path holds the shared
//! lock while it waits for a slot. Blocks that cannot be listed (bookkeeping
//! out of memory, caching stopped) go back to the backing allocator after
//! the lock is released.

use core::alloc::Layout;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};

use super::{Cache, State};
use crate::front::{Batch, Bin, DEPTH, Deltas, Fronts, Slot};
use crate::poison;
use crate::policy::Key;
use crate::reentry;
use crate::stats::{Stats, raise};
use crate::unwind::Deferred;

/// Blocks a front miss takes from the shared lists beyond the one it serves.
const REFILL: usize = DEPTH / 2;

#[inline]
fn add(value: usize, delta: i64) -> usize {
    value.wrapping_add(delta as usize)
}

impl State {
    /// Adds a slot's counters to the stats (see `front::Deltas`).
    pub(super) fn fold(&mut self, deltas: &Deltas) {
        let stats = &mut self.stats;
        raise(
            &mut stats.peak_bytes_in_use,
            add(stats.bytes_in_use, deltas.peak_in_use),
        );
        raise(
            &mut stats.peak_bytes_cached,
            add(stats.bytes_cached + self.front_bytes, deltas.peak_front),
        );
        stats.hits += deltas.hits;
        stats.frees += deltas.frees;
        stats.bytes_hit += deltas.bytes_hit;
        stats.bytes_in_use = add(stats.bytes_in_use, deltas.in_use());
        stats.blocks_in_use = add(stats.blocks_in_use, deltas.blocks_in_use());
        stats.bytes_lost_to_rounding = add(stats.bytes_lost_to_rounding, deltas.lost());
        self.front_bytes = add(self.front_bytes, deltas.front_bytes());
        self.front_blocks = add(self.front_blocks, deltas.front_blocks());
    }
}

/// The stats as `stats()` reports them: the shared books, plus what the
/// front caches hold and their counters not yet folded.
pub(super) fn with_fronts(
    mut stats: Stats,
    front_bytes: usize,
    front_blocks: usize,
    slots: &[Deltas],
) -> Stats {
    let (mut bytes, mut blocks) = (front_bytes, front_blocks);
    // Each slot's peak, over the shared books as they stand: exact when one
    // thread works at a time (its slow paths fold it, and nothing else
    // moves the shared books meanwhile), an upper bound otherwise.
    let mut peak = stats.bytes_in_use;
    let mut peak_cached = stats.bytes_cached + front_bytes;
    for deltas in slots {
        peak = add(peak, deltas.peak_in_use);
        peak_cached = add(peak_cached, deltas.peak_front);
        stats.hits += deltas.hits;
        stats.frees += deltas.frees;
        stats.bytes_hit += deltas.bytes_hit;
        stats.bytes_in_use = add(stats.bytes_in_use, deltas.in_use());
        stats.blocks_in_use = add(stats.blocks_in_use, deltas.blocks_in_use());
        stats.bytes_lost_to_rounding = add(stats.bytes_lost_to_rounding, deltas.lost());
        bytes = add(bytes, deltas.front_bytes());
        blocks = add(blocks, deltas.front_blocks());
    }
    stats.bytes_cached += bytes;
    stats.blocks_cached += blocks;
    raise(&mut stats.peak_bytes_in_use, peak);
    raise(&mut stats.peak_bytes_in_use, stats.bytes_in_use);
    raise(&mut stats.peak_bytes_cached, peak_cached);
    raise(&mut stats.peak_bytes_cached, stats.bytes_cached);
    stats
}

impl<A: Allocator> Cache<A> {
    /// The calling thread's front cache, if this cache has them.
    #[inline]
    pub(super) fn front(&self) -> Option<&Slot> {
        self.fronts.as_ref()?.slot()
    }

    /// Takes a block of `key` from the shared side for a front miss,
    /// folding the slot's counters and refilling it with a few more blocks
    /// of the key (free lists) on the way.
    #[cold]
    pub(super) fn allocate_behind_front(
        &self,
        slot: &Slot,
        key: Key,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        self.adopt_orphans();
        let deltas = slot.take_counters();
        if self.carves() {
            self.state.lock().fold(&deltas);
            return self.allocate_carved(layout, zeroed);
        }
        let mut refill = [ptr::null_mut(); REFILL];
        let mut taken = 0;
        let popped = {
            let mut state = self.state.lock();
            state.fold(&deltas);
            let popped = state.pop(key);
            if popped.is_some() {
                state.stats.on_hit(layout.size(), key.size());
                while taken < REFILL {
                    let Some(block) = state.pop(key) else { break };
                    refill[taken] = block.as_ptr();
                    taken += 1;
                    state.stats.bytes_cached -= key.size();
                    state.stats.blocks_cached -= 1;
                }
            }
            popped
        };
        let Some(block) = popped else {
            let block = self.allocate_block(key, zeroed)?;
            self.state.lock().stats.on_miss(layout.size(), key.size());
            return Ok(NonNull::slice_from_raw_parts(block, layout.size()));
        };
        let kept = slot.refill(key, &refill[..taken]);
        if kept < taken {
            let mut batch = Batch::EMPTY;
            batch.key = Some(key);
            batch.len = taken - kept;
            batch.blocks[..batch.len].copy_from_slice(&refill[kept..taken]);
            // Listed again: they left the lists above, uncounted as moves.
            self.relist_batch(&Deltas::default(), &batch);
        }
        poison::unpoison(block, key.size());
        if zeroed {
            // SAFETY: the block just left the free lists, so nobody else
            // references it; it holds `key.size() >= layout.size()` bytes.
            unsafe { ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
        }
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    /// A free the front had no room for: moves what stands in the way to
    /// the shared side in one batch, and keeps the block; a block larger
    /// than a whole front goes to the shared side itself.
    ///
    /// # Safety
    ///
    /// `RawAllocator::deallocate`'s contract for `block` and `layout`, and
    /// `key` is the layout's key.
    #[cold]
    pub(super) unsafe fn deallocate_behind_front(
        &self,
        slot: &Slot,
        key: Key,
        block: NonNull<u8>,
        layout: Layout,
    ) {
        self.adopt_orphans();
        // Each round empties one bin or half of one; a front has few.
        for _ in 0..=crate::front::BINS + 1 {
            let Some((batch, deltas)) = slot.make_room(key) else {
                // Larger than a whole front: the shared side takes it.
                self.fold_mine();
                break;
            };
            let moved = batch.len;
            self.relist_batch(&deltas, &batch);
            if slot.push(key, block, layout.size()) {
                return;
            }
            if moved == 0 {
                break;
            }
        }
        // SAFETY: this function's contract.
        unsafe { self.deallocate_shared(block, layout) }
    }

    /// Folds the calling thread's front counters into the shared books,
    /// before a shared operation changes them (so a thread alone keeps them
    /// exact, peaks included).
    pub(super) fn fold_mine(&self) {
        if let Some(slot) = self.front() {
            let deltas = slot.take_counters();
            self.state.lock().fold(&deltas);
        }
    }

    /// Folds `deltas` and lists a batch from a front; blocks that cannot be
    /// listed go back to the backing allocator.
    fn relist_batch(&self, deltas: &Deltas, batch: &Batch) {
        let mut panics = Deferred::new();
        let mut unlisted = Batch::EMPTY;
        unlisted.key = batch.key;
        {
            let mut state = self.state.lock();
            state.fold(deltas);
            for (key, block) in batch.iter() {
                if !self.relist(&mut state, key, block) {
                    unlisted.blocks[unlisted.len] = block.as_ptr();
                    unlisted.len += 1;
                }
            }
            self.after_relist(&mut state);
        }
        for (key, block) in unlisted.iter() {
            self.give_back_unlisted(key, block, &mut panics);
        }
        panics.resume();
    }

    /// Lists one block that came back from a front, under the lock; false
    /// if it must go back to the backing allocator instead.
    fn relist(&self, state: &mut State, key: Key, block: NonNull<u8>) -> bool {
        // A carved block has no backing allocation of its own: it always
        // goes back into the arena.
        if self.carves() {
            let _inside = reentry::inside();
            let len = state.arena().uncarve(block.as_ptr().addr(), key.size());
            // A block longer than its key (see `best_fit.rs`'s extras) had
            // its surplus counted as lost to rounding.
            state.stats.bytes_lost_to_rounding -= len - key.size();
            return true;
        }
        state.clock += 1;
        let cached = state.stamp(key, block, state.clock);
        if state.caching_stopped || state.push(key, cached).is_err() {
            state.stats.evictions += 1;
            state.stats.bytes_evicted += key.size() as u64;
            state.stats.backing_frees += 1;
            state.stats.bytes_reserved -= key.size();
            return false;
        }
        state.stats.bytes_cached += key.size();
        state.stats.blocks_cached += 1;
        true
    }

    /// After a run of `relist`s: a best-fit arena's held memory into the
    /// stats.
    fn after_relist(&self, state: &mut State) {
        if self.carves() {
            state.clock += 1;
            let clock = state.clock;
            state.arena().cached_since.get_or_insert(clock);
            state.sync_held();
        }
    }

    /// Gives back a block `relist` refused (its books are already done).
    fn give_back_unlisted(&self, key: Key, block: NonNull<u8>, panics: &mut Deferred) {
        panics.catch(|| {
            // SAFETY: the block came out of a front, where the cache owned
            // it alone; it was taken with its key's layout and is listed
            // nowhere.
            unsafe { self.backing_deallocate(block, key) }
        });
    }

    /// Takes in the magazine of a drained slot: its counters and all its
    /// blocks, under one lock.
    fn take_in(&self, deltas: &Deltas, mut bins: [Bin; crate::front::BINS]) {
        let mut panics = Deferred::new();
        {
            let mut state = self.state.lock();
            state.fold(deltas);
            let mut moved = Deltas::default();
            for bin in &mut bins {
                let Some(key) = bin.key else { continue };
                moved.moved_bytes += (key.size() * bin.len) as u64;
                moved.moved_blocks += bin.len as u64;
                for at in 0..bin.len {
                    let Some(block) = NonNull::new(bin.blocks[at]) else {
                        continue;
                    };
                    if self.relist(&mut state, key, block) {
                        bin.blocks[at] = ptr::null_mut();
                    }
                }
            }
            state.fold(&moved);
            self.after_relist(&mut state);
        }
        for bin in &bins {
            for (key, block) in bin.held() {
                self.give_back_unlisted(key, block, &mut panics);
            }
        }
        panics.resume();
    }

    /// Brings every front cache's blocks to the shared side: the drainer's
    /// side of the protocol, slot by slot. With `dead` (the cache drops),
    /// the slots are also marked dead and leave the registry.
    pub(super) fn drain_fronts(&self, dead: bool) {
        let Some(fronts) = &self.fronts else {
            return;
        };
        let slots = if dead {
            fronts.take_all_slots()
        } else {
            fronts.slots(false)
        };
        for slot in slots.iter() {
            if let Some(drained) = slot.drain(dead) {
                self.take_in(&drained.deltas, drained.bins);
            }
        }
        if !dead {
            fronts.prune();
        }
    }

    /// Takes in the front caches of threads that exited.
    pub(super) fn adopt_orphans(&self) {
        let Some(fronts) = &self.fronts else {
            return;
        };
        if !fronts.has_orphans() {
            return;
        }
        for slot in fronts.slots(true).iter() {
            if let Some(drained) = slot.drain(true) {
                self.take_in(&drained.deltas, drained.bins);
            }
        }
    }

    /// The stats, fronts included (see `with_fronts`).
    pub(super) fn stats_with_fronts(&self, fronts: &Fronts) -> Stats {
        let slots = fronts.read_all();
        let state = self.state.lock();
        let mut stats = state.stats;
        if let Some(arena) = &state.arena {
            stats.bytes_pinned = arena.pinned();
        }
        with_fronts(stats, state.front_bytes, state.front_blocks, &slots)
    }
}

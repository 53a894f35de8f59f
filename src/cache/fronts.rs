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

use super::state::Kind;
use super::{Cache, hand_out};
use crate::eviction::Victim;
use crate::front::{Bin, Deltas, Drained, Fronts, Owner, ThreadFront};
use crate::per_cpu::{self, PerCpu};
use crate::poison;
use crate::policy::Key;
use crate::reentry;
use crate::stats::{Stats, add, raise};
use crate::unwind::Deferred;

/// Blocks taken out of per-CPU fronts on their way to the shared side: at
/// most a bin's.
#[derive(Default)]
struct Taken {
    blocks: [Option<(Key, NonNull<u8>)>; crate::rseq::layout::DEPTH],
    len: usize,
}

impl Taken {
    fn iter(&self) -> impl Iterator<Item = (Key, NonNull<u8>)> + '_ {
        self.blocks[..self.len].iter().flatten().copied()
    }
}

impl Extend<(Key, NonNull<u8>)> for Taken {
    fn extend<I: IntoIterator<Item = (Key, NonNull<u8>)>>(&mut self, items: I) {
        for item in items {
            if self.len < self.blocks.len() {
                self.blocks[self.len] = Some(item);
                self.len += 1;
            }
        }
    }
}

/// Why a front is drained, which says whether its owner may still write it
/// and where its blocks go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Drain {
    /// Its thread exited, or the cache drops: nobody writes it any more.
    /// Its blocks go to the shared cache.
    Orphaned,
    /// A trim, a decay or a limit while its owner lives: the drain
    /// protocol takes its blocks to the shared cache.
    Live,
    /// A budget's eviction, its owner alive: its blocks go back to the
    /// backing allocator.
    Evicted,
}

impl Drain {
    fn owner_gone(self) -> bool {
        self == Drain::Orphaned
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
    let mut peak_cached = stats.bytes_cached.wrapping_add(front_bytes);
    for deltas in slots {
        peak = add(peak, deltas.peak_in_use);
        peak_cached = add(peak_cached, deltas.peak_front);
        stats.apply(deltas);
        bytes = add(bytes, deltas.front_bytes());
        blocks = add(blocks, deltas.front_blocks());
    }
    stats.bytes_cached = stats.bytes_cached.wrapping_add(bytes);
    stats.blocks_cached = stats.blocks_cached.wrapping_add(blocks);
    raise(&mut stats.peak_bytes_in_use, peak);
    raise(&mut stats.peak_bytes_in_use, stats.bytes_in_use);
    raise(&mut stats.peak_bytes_cached, peak_cached);
    raise(&mut stats.peak_bytes_cached, stats.bytes_cached);
    // Read while other threads work their fronts, a sum can catch a
    // counter half-moved (taken from a slot, not yet folded) and dip
    // below zero: report 0 rather than a wrapped figure.
    for gauge in [
        &mut stats.bytes_in_use,
        &mut stats.blocks_in_use,
        &mut stats.bytes_lost_to_rounding,
        &mut stats.bytes_cached,
        &mut stats.blocks_cached,
    ] {
        if *gauge > isize::MAX as usize {
            *gauge = 0;
        }
    }
    stats
}

impl<A: Allocator> Cache<A> {
    /// The calling thread's front cache, if this cache has them.
    #[inline]
    pub(super) fn front(&self) -> Option<Owner<'_>> {
        self.fronts.as_ref()?.slot()
    }

    /// The per-CPU fronts, if this cache's fronts are per CPU.
    #[inline(always)]
    pub(super) fn per_cpu(&self) -> Option<&PerCpu> {
        self.fronts.as_ref()?.per_cpu()
    }

    /// A block a per-CPU front served: counted, unpoisoned, zeroed if asked.
    #[inline(always)]
    pub(super) fn hit_from_cpu(
        &self,
        block: NonNull<u8>,
        slot: per_cpu::Class,
        layout: Layout,
        zeroed: bool,
    ) -> NonNull<[u8]> {
        match self.front() {
            Some(owner) => owner.count_hit(layout.size(), slot.len()),
            None => self.count_hit_shared(layout.size(), slot.len()),
        }
        poison::unpoison(block, slot.len());
        // SAFETY: the block was just taken from a front, so nobody else
        // references it, and it holds `slot.len() >= layout.size()`
        // writable bytes.
        unsafe { hand_out(block, layout, zeroed) }
    }

    /// A front hit by a thread with no slot (its thread-locals are being
    /// torn down): counted in the shared books.
    #[cold]
    fn count_hit_shared(&self, requested: usize, len: usize) {
        self.state.lock().fold(&Deltas {
            hits: 1,
            bytes_hit: requested as u64,
            hit_block_bytes: len as u64,
            ..Deltas::default()
        });
    }

    #[cold]
    pub(super) fn allocate_behind_cpu_front(
        &self,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        match (self.front(), self.key(layout)) {
            (Some(owner), Some(key)) => self.allocate_behind_front(&owner, key, layout, zeroed),
            _ => self.allocate_carved(layout, zeroed),
        }
    }

    /// Counts a free kept in a per-CPU front: in the thread's slot, or (a
    /// thread with none) in the shared books.
    #[inline(always)]
    fn count_cpu_free(&self, requested: usize, len: usize) {
        match self.front() {
            Some(owner) => owner.count_free(requested, len),
            None => self.state.lock().fold(&Deltas {
                frees: 1,
                bytes_freed: requested as u64,
                freed_block_bytes: len as u64,
                ..Deltas::default()
            }),
        }
    }

    /// A free the per-CPU fast path could not keep: room is made in its bin
    /// (what stands in the way goes to the shared side) and the block kept,
    /// else it goes to the shared side itself.
    ///
    /// # Safety
    ///
    /// `RawAllocator::deallocate`'s contract for `block` and `layout`.
    #[cold]
    pub(super) unsafe fn free_behind_cpu(
        &self,
        per_cpu: &PerCpu,
        slot: per_cpu::Class,
        block: NonNull<u8>,
        layout: Layout,
    ) {
        let mut panics = Deferred::new();
        self.adopt_orphans(&mut panics);
        if !self.fronts.as_ref().is_some_and(Fronts::is_stopped) {
            let mut taken = Taken::default();
            per_cpu.make_room(slot, &mut taken);
            if taken.len > 0 {
                let deltas = self.front().map(|owner| owner.take_counters());
                self.relist_taken(&deltas.unwrap_or_default(), &taken, &mut panics);
            }
            poison::poison(block, slot.len());
            if per_cpu.push(slot, block) {
                self.count_cpu_free(layout.size(), slot.len());
                return panics.resume();
            }
        }
        self.fold_mine();
        // SAFETY: this function's contract.
        unsafe { self.deallocate_shared(block, layout) };
        panics.resume();
    }

    /// Takes a block of `key` from the shared side for a front miss,
    /// folding the slot's counters and refilling it with a few more blocks
    /// of the key (free lists) on the way.
    ///
    /// A panicking backing `deallocate` on the way (adopting an exited
    /// thread's blocks, or giving back blocks that could not be listed)
    /// fails the request: the block taken for it goes back, then the panic
    /// is resumed.
    #[cold]
    pub(super) fn allocate_behind_front(
        &self,
        slot: &Owner<'_>,
        key: Key,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        let mut panics = Deferred::new();
        let taken = self.take_behind_front(slot, key, layout, zeroed, &mut panics);
        if panics.caught()
            && let Ok(block) = taken
        {
            // SAFETY: the block was just handed out for `layout` and the
            // caller never sees it.
            unsafe { self.deallocate_shared(block.cast(), layout) };
        }
        panics.resume();
        taken
    }

    fn take_behind_front(
        &self,
        slot: &Owner<'_>,
        key: Key,
        layout: Layout,
        zeroed: bool,
        panics: &mut Deferred,
    ) -> Result<NonNull<[u8]>, AllocError> {
        self.adopt_orphans(panics);
        self.touch_front(slot);
        let deltas = slot.take_counters();
        match self.kind {
            Kind::Lists => {
                self.allocate_listed_for_front(slot, key, layout, zeroed, deltas, panics)
            }
            Kind::Arena => self.allocate_carved_folding(layout, zeroed, Some(deltas)),
        }
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
        slot: &Owner<'_>,
        key: Key,
        block: NonNull<u8>,
        layout: Layout,
    ) {
        let mut panics = Deferred::new();
        // SAFETY: this function's contract.
        unsafe { self.free_behind_front(slot, key, block, layout, &mut panics) };
        panics.resume();
    }

    /// `deallocate_behind_front`, keeping a panic of the backing allocator
    /// in `panics`: the block is kept or freed whatever happens.
    ///
    /// # Safety
    ///
    /// As for `deallocate_behind_front`.
    unsafe fn free_behind_front(
        &self,
        slot: &Owner<'_>,
        key: Key,
        block: NonNull<u8>,
        layout: Layout,
        panics: &mut Deferred,
    ) {
        self.adopt_orphans(panics);
        self.touch_front(slot);
        // Each round empties one bin or half of one, or takes credit: at
        // most every bin once, then the credit.
        for _ in 0..=2 * crate::front::MAGAZINE_BINS + 1 {
            let Some(room) = slot.make_room(key) else {
                // Larger than a whole front: the shared side takes it.
                self.fold_mine();
                break;
            };
            let moved = room.batch.len;
            self.relist_batch(&room.deltas, &room.batch, true, panics);
            if room.more && moved > 0 {
                continue;
            }
            if room.short > 0 {
                let granted = self.grant_credit(room.short, room.headroom);
                if granted == 0 {
                    break;
                }
                slot.grant(granted);
            } else if moved == 0 {
                if slot.push(key, block, layout.size()) {
                    return;
                }
                break;
            }
            if slot.push(key, block, layout.size()) {
                return;
            }
        }
        // SAFETY: this function's contract.
        unsafe { self.deallocate_shared(block, layout) }
    }

    /// Folds `deltas` and lists blocks taken out of per-CPU fronts; blocks
    /// that cannot be listed go back to the backing allocator.
    fn relist_taken(&self, deltas: &Deltas, taken: &Taken, panics: &mut Deferred) {
        let mut unlisted = Taken::default();
        {
            let budget = self.config.budget.as_ref();
            let mut state = self.state.lock();
            state.fold(deltas);
            for (key, block) in taken.iter() {
                state.left_front(key.size());
                if !state.relist(key, block, false, budget) {
                    unlisted.extend(Some((key, block)));
                }
            }
            state.sync_held(budget);
        }
        for (key, block) in unlisted.iter() {
            self.give_back_from_front(key, block, panics);
        }
    }

    /// The arena has no room for `len` bytes: if the per-CPU fronts hold at
    /// least that much, they are drained into it; whether they were.
    pub(super) fn drain_cpu_fronts_for(&self, len: usize) -> bool {
        let Some(per_cpu) = self.fronts.as_ref().and_then(Fronts::per_cpu) else {
            return false;
        };
        if per_cpu.held().0 < len {
            return false;
        }
        self.drain_cpus(per_cpu) > 0
    }

    /// Brings every per-CPU front's blocks into the arena (stopping each
    /// CPU's slab in turn, under the shared lock: a drain is rare, and the
    /// lock keeps the arena still meanwhile); the bytes they held. Per-CPU
    /// fronts are best fit's, whose blocks always go back into the arena:
    /// no backing call.
    fn drain_cpus(&self, per_cpu: &PerCpu) -> usize {
        let mut bytes = 0;
        let budget = self.config.budget.as_ref();
        let mut state = self.state.lock();
        let _inside = reentry::inside();
        per_cpu.drain(|key, block| {
            bytes += key.size();
            state.left_front(key.size());
            let listed = state.relist(key, block, false, budget);
            debug_assert!(listed, "a carved block always goes back into the arena");
        });
        state.sync_held(budget);
        drop(state);
        if bytes > 0 {
            self.record(crate::history::Action::FrontDrain, bytes, 0);
        }
        bytes
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

    /// Grants a front at least `needed` bytes of credit (up to a batch,
    /// within `headroom`), counted against the cap and reserved on the
    /// budget; 0 if there is no room even after evicting shared blocks.
    fn grant_credit(&self, needed: usize, headroom: usize) -> usize {
        if needed > headroom {
            return 0;
        }
        // A batch: a sixteenth of the cap or the budget, so that a few
        // threads' fronts leave the shared cache most of it.
        let limit = match (self.config.max_cached_bytes, &self.config.budget) {
            (Some(cap), Some(budget)) => cap.min(budget.limit()),
            (Some(cap), None) => cap,
            (None, Some(budget)) => budget.limit(),
            (None, None) => return needed,
        };
        let want = (limit / 16).clamp(needed, headroom);
        // The budget first, with the lock free (it may evict, this very
        // cache's fronts included), and before the grant counts anywhere,
        // so an eviction it triggers never finds it.
        let mut granted = want;
        if let Some(budget) = &self.config.budget {
            let mut panics = Deferred::new();
            granted = if panics.catch(|| budget.reserve(want)) == Some(true) {
                want
            } else if want > needed && panics.catch(|| budget.reserve(needed)) == Some(true) {
                needed
            } else {
                0
            };
            panics.resume();
            if granted == 0 {
                return 0;
            }
        }
        let Some(cap) = self.config.max_cached_bytes else {
            self.state.lock().grant_credit(granted);
            return granted;
        };
        let mut panics = Deferred::new();
        let mut counted = 0;
        loop {
            let mut state = self.state.lock();
            let room = cap.saturating_sub(state.stats().bytes_cached + state.credit_out());
            if room >= needed {
                counted = granted.min(room);
                state.grant_credit(counted);
                break;
            }
            // The cheapest shared block goes back, with the lock released
            // around the backing call, as for a free.
            let Some(evicted) = state.evict(Victim::Cheapest) else {
                break;
            };
            drop(state);
            self.give_back_evicted(evicted, &mut panics);
        }
        // The budget's share beyond what the cap let through goes back.
        self.unreserve(granted - counted);
        panics.resume();
        counted
    }

    /// Folds `deltas` and lists a batch from a front; blocks that cannot be
    /// listed go back to the backing allocator. With `credited`, the blocks
    /// bring their front credit with them (a batch the owner moved out).
    pub(super) fn relist_batch(
        &self,
        deltas: &Deltas,
        batch: &Bin,
        credited: bool,
        panics: &mut Deferred,
    ) {
        let mut unlisted = Bin::EMPTY;
        unlisted.key = batch.key;
        {
            let budget = self.config.budget.as_ref();
            let mut state = self.state.lock();
            state.fold(deltas);
            if credited && self.fronts_hold_credit() {
                let bytes: usize = batch.held().map(|(key, _)| key.size()).sum();
                state.return_credit(bytes);
            }
            for (key, block) in batch.held() {
                if !state.relist(key, block, false, budget) {
                    unlisted.blocks[unlisted.len] = block.as_ptr();
                    unlisted.len += 1;
                }
            }
            state.sync_held(budget);
        }
        for (key, block) in unlisted.held() {
            // Reserved on the budget as cached (or as credit) until now.
            self.unreserve(key.size());
            self.give_back_from_front(key, block, panics);
        }
    }

    /// Whether this cache's fronts hold credit (a cap or a budget).
    fn fronts_hold_credit(&self) -> bool {
        self.config.evicts()
    }

    /// Gives back a block `State::relist` refused (its books are already
    /// done).
    fn give_back_from_front(&self, key: Key, block: NonNull<u8>, panics: &mut Deferred) {
        panics.catch(|| {
            // SAFETY: the block came out of a front, where the cache owned
            // it alone; it was taken with its key's layout and is listed
            // nowhere.
            unsafe { self.give_back(block, key) }
        });
    }

    /// Takes in the magazine of a drained slot: its counters and all its
    /// blocks, under one lock.
    fn take_in(&self, drained: Drained, evict: bool, panics: &mut Deferred) {
        let Drained {
            mut bins,
            len,
            deltas,
            credit,
            ..
        } = drained;
        let deltas = &deltas;
        let bins = &mut bins[..len];
        let held: usize = bins
            .iter()
            .map(|bin| bin.held().map(|(key, _)| key.size()).sum::<usize>())
            .sum();
        {
            let budget = self.config.budget.as_ref();
            let mut state = self.state.lock();
            state.fold(deltas);
            state.return_credit(credit);
            // The blocks leave the front before they join the lists, so no
            // moment counts them twice (peaks included).
            let mut moved = Deltas::default();
            for bin in bins.iter() {
                let Some(key) = bin.key else { continue };
                moved.moved_bytes += (key.size() * bin.len) as u64;
                moved.moved_blocks += bin.len as u64;
            }
            state.fold(&moved);
            for bin in bins.iter_mut() {
                let Some(key) = bin.key else { continue };
                for at in 0..bin.len {
                    let Some(block) = NonNull::new(bin.blocks[at]) else {
                        continue;
                    };
                    if state.relist(key, block, evict, budget) {
                        bin.blocks[at] = ptr::null_mut();
                    }
                }
            }
            state.sync_held(budget);
        }
        // The credit the blocks did not use goes back to the budget (the
        // listed blocks stay reserved, now as cached).
        self.unreserve(credit.saturating_sub(held));
        for bin in bins.iter() {
            for (key, block) in bin.held() {
                if credit > 0 {
                    self.unreserve(key.size());
                }
                self.give_back_from_front(key, block, panics);
            }
        }
    }

    /// Brings every front cache's blocks to the shared side: the drainer's
    /// side of the protocol, slot by slot. With `Drain::Orphaned` (the
    /// cache drops), the slots are also marked dead and leave the registry
    /// (`Drain::Evicted` is one front's, see `evict_oldest_front`). Returns
    /// the credit the fronts gave back. A panicking backing `deallocate`
    /// stops no drain: it is kept in `panics`.
    pub(super) fn drain_fronts(&self, why: Drain, panics: &mut Deferred) -> usize {
        debug_assert!(why != Drain::Evicted, "a budget evicts one front at a time");
        let dead = why.owner_gone();
        let Some(fronts) = &self.fronts else {
            return 0;
        };
        if let Some(per_cpu) = fronts.per_cpu() {
            self.drain_cpus(per_cpu);
            // Threads' slots only count: their owners write the counters
            // without the drain protocol, so only a slot with no owner left
            // (an exited thread's, or any once the cache drops) is taken in.
            if dead {
                for slot in fronts.take_all_slots().iter() {
                    self.drain_slot(slot, Drain::Orphaned, panics);
                }
            } else {
                self.adopt_orphans(panics);
            }
            return 0;
        }
        let mut credit = 0;
        let slots = if dead {
            fronts.take_all_slots()
        } else {
            fronts.slots(false)
        };
        for slot in slots.iter() {
            credit += self.drain_slot(slot, why, panics);
        }
        if !dead {
            fronts.prune();
        }
        credit
    }

    /// A budget's eviction reaching the fronts: the slot active least
    /// recently, if it is older than `than` (the shared cache's oldest
    /// block), and its age.
    pub(super) fn oldest_front(&self, than: Option<u64>) -> Option<u64> {
        let fronts = self.fronts.as_ref()?;
        let age = fronts.oldest_slot()?.age();
        than.is_none_or(|than| age < than).then_some(age)
    }

    /// Gives back the blocks and the credit of the front active least
    /// recently (a budget's eviction); whether it held any credit.
    pub(super) fn evict_oldest_front(&self, panics: &mut Deferred) -> bool {
        let Some(slot) = self.fronts.as_ref().and_then(Fronts::oldest_slot) else {
            return false;
        };
        let credit = self.drain_slot(&slot, Drain::Evicted, panics);
        self.fronts.as_ref().map(Fronts::prune);
        credit > 0
    }

    /// Marks the calling thread's front as active now (its slow paths), on
    /// the budget's clock: a budget takes idle fronts' credit back first.
    pub(super) fn touch_front(&self, slot: &Owner<'_>) {
        if let Some(budget) = &self.config.budget {
            slot.set_age(budget.tick());
        }
    }

    /// Drains one front round by round (a chunk of bins each), taking each
    /// round in (an eviction gives its blocks back); returns the credit it
    /// gave back. An owner still freeing into it can keep it from ending
    /// empty: the rounds stop after one pass over its bins.
    fn drain_slot(&self, slot: &ThreadFront, why: Drain, panics: &mut Deferred) -> usize {
        let mut credit = 0;
        for _ in 0..=crate::front::MAGAZINE_BINS / crate::front::CHUNK {
            let Some(drained) = slot.drain(why.owner_gone()) else {
                break;
            };
            credit += drained.credit;
            let more = drained.more;
            self.take_in(drained, why == Drain::Evicted, panics);
            if !more {
                break;
            }
        }
        credit
    }

    /// Takes in the front caches of threads that exited.
    pub(super) fn adopt_orphans(&self, panics: &mut Deferred) {
        let Some(fronts) = &self.fronts else {
            return;
        };
        if !fronts.has_orphans() {
            return;
        }
        for slot in fronts.slots(true).iter() {
            self.drain_slot(slot, Drain::Orphaned, panics);
        }
    }

    /// The stats, fronts included (see `with_fronts`).
    pub(super) fn stats_with_fronts(&self, fronts: &Fronts) -> Stats {
        let slots = fronts.read_all();
        let mut state = self.state.lock();
        let (front_bytes, front_blocks) = state.front_books();
        let stats = with_fronts(state.report(), front_bytes, front_blocks, &slots);
        // A peak once reported stays reported.
        state.keep_peaks(&stats);
        stats
    }
}

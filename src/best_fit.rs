//! Best fit's memory: segments, the free ranges in them, the blocks carved
//! out of them, and which free pages went back to the system.
//!
//! Everything here runs under the cache's lock and works on addresses; the
//! cache (`cache.rs`) turns them into pointers and calls the backing
//! allocator. Two segment sources:
//!
//! - **a reservation** (Linux, a cache built with `Builder::build`): one
//!   reserved address range whose usable bottom grows in place, so the whole
//!   cache is usually one segment and growth merges with the free range at its
//!   top. The cache owns the mapping: free pages inside it can be decommitted
//!   and its free top uncommitted, so resident memory falls.
//! - **fixed segments** (a cache built with `build_in(backing)`, other
//!   systems, Miri): blocks taken from the backing allocator and given back
//!   only whole. Their free bytes cannot be decommitted (the cache does not
//!   own their pages): while a segment holds a live block, its free bytes are
//!   *pinned* (`Stats::bytes_pinned`). Each remembers the decay window a
//!   block was last freed into it, so that decay gives back only the
//!   segments wholly free a whole window ([`Arena::decay`]), never one that
//!   was reused in it.
//!
//! A block is as long as its request rounded up to [`MIN_ALIGN`], so a free
//! knows its length from the layout; the few blocks that hold more (a tail
//! too small to keep, [`SPLIT_MIN`](crate::free_ranges::SPLIT_MIN), or what an
//! in-place shrink left) are recorded in `extra`, which is usually empty: a
//! free then costs no lookup there.

use core::alloc::Layout;
use std::collections::BTreeMap;

use foldhash::fast::FixedState;
use hashbrown::HashMap;

use allocator_api2::vec::Vec;

use crate::free_ranges::FreeRanges;
use crate::poison;
use crate::policy::MIN_ALIGN;
use crate::reentry::Bookkeeping;
use crate::reservation::{self, FIRST_CAPACITY, HUGE_PAGE, Reservation};

/// Freed blocks up to this length wait on exact-length quick lists before
/// they merge into the free ranges (PyTorch keeps a separate small pool too).
/// Measured on the bundled traces (README "Best fit"): small blocks are most
/// of the allocations of a decode step and placing them exactly matters
/// little, while quick-listing large blocks scatters them and breaks best
/// fit's compaction (resnet18 held 2.9x its peak live with every length
/// quick-listed, 1.04x with 4 KiB and below).
pub(crate) const QUICK_MAX: usize = 4096;

/// The length and alignment of the block that serves `layout`: its size
/// rounded up to [`MIN_ALIGN`], aligned to at least [`MIN_ALIGN`]. `None` if
/// that is absurd (past `isize::MAX`).
#[inline]
pub(crate) fn block_of(layout: Layout) -> Option<(usize, usize)> {
    let len = layout.size().checked_next_multiple_of(MIN_ALIGN)?;
    let align = layout.align().max(MIN_ALIGN);
    Layout::from_size_align(len, align).ok()?;
    Some((len, align))
}

/// A block carved out of a free range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Carved {
    pub(crate) start: usize,
    pub(crate) len: usize,
    /// Whether it needed new memory: a grown segment, or decommitted pages.
    pub(crate) fresh: bool,
}

/// What a shed gave back, and what the cache must still give back to its
/// backing allocator once the lock is released.
#[derive(Debug, Default)]
pub(crate) struct Shed {
    /// Fixed segments with no live block, out of the index: `(start, layout)`.
    pub(crate) segments: Vec<(usize, Layout)>,
    /// Free bytes that stopped holding memory (segments, uncommitted tops,
    /// decommitted pages).
    pub(crate) bytes: usize,
    /// How many pieces: segments, tops and decommitted ranges.
    pub(crate) pieces: u64,
    /// Backing calls made or to make: segments and uncommitted tops.
    pub(crate) segment_frees: u64,
    /// The uncommitted tops of reservations, `(start, len)` (for the
    /// history).
    pub(crate) unmapped: Vec<(usize, usize)>,
}

/// A fixed segment: what it was taken from the backing allocator with, and
/// when it was last in use.
#[derive(Clone, Copy, Debug)]
struct Fixed {
    layout: Layout,
    /// The decay window ([`Arena::next_window`]) a block was last freed
    /// into it (a quick-listed one: merged, which is in the same window),
    /// or the one it was added in. Wholly free now and freed into before
    /// the window that just closed means wholly free all of it: a block in
    /// use at any moment of the window (carved in it, or carved before and
    /// still live when it opened) is freed inside it.
    freed_in: u64,
}

/// Which wholly free fixed segments a shed gives back.
#[derive(Clone, Copy, Debug)]
enum WholeSegments {
    /// By address, until at most this many cached bytes stay: a trim, a
    /// release, the cap, a budget.
    DownTo(usize),
    /// Every one wholly free the whole decay window that just closed,
    /// whatever the target: decay.
    IdleAWindow,
}

/// The memory an arena holds ([`Arena::held`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    /// Committed bytes less the decommitted ones.
    pub(crate) reserved: usize,
    /// Free bytes that hold memory.
    pub(crate) cached: usize,
    /// Free ranges and quick-listed blocks: `Stats::blocks_cached`.
    pub(crate) free_ranges: usize,
    /// Free bytes whose pages went back to the system.
    pub(crate) decommitted: usize,
}

/// Best fit's memory. See the module documentation.
pub(crate) struct Arena {
    ranges: FreeRanges,
    /// `start -> bytes` a live block holds beyond its request's length.
    extra: HashMap<usize, usize, FixedState, Bookkeeping>,
    /// Freed blocks of at most [`QUICK_MAX`] bytes not yet merged into the
    /// free ranges, by length: a request of a length freed before is served
    /// with two hash operations instead of the free ranges' bins and maps. They merge
    /// (`flush`) before the arena grows and before it sheds, so they never
    /// make it hold more.
    quick: HashMap<usize, Vec<usize, Bookkeeping>, FixedState, Bookkeeping>,
    quick_bytes: usize,
    quick_blocks: usize,
    /// `start -> end` of free pages given back to the system: page-aligned,
    /// disjoint, each inside a free range of a reservation.
    decommitted: BTreeMap<usize, usize>,
    decommitted_bytes: usize,
    /// Every fixed segment, by start.
    fixed: BTreeMap<usize, Fixed>,
    /// The decay window now open, counted from 0 ([`Arena::next_window`]);
    /// stays 0 in a cache that does not decay.
    window: u64,
    /// The reservations, oldest first; the last one grows.
    reservations: Vec<Reservation>,
    /// Whether to reserve address ranges (else: fixed segments only).
    reserves: bool,
    /// The page size commits, decommits and pinned bytes are computed in
    /// (`reservation::page_size`; tests pass larger ones).
    page: usize,
    /// The range the last growth of a reservation committed, `(start, len)`,
    /// until the cache records it (`take_growth`).
    last_growth: Option<(usize, usize)>,
    /// Every block exactly its request's length (see `keeps_tail`).
    exact_blocks: bool,
}

impl Arena {
    /// An empty arena; `reserves`: take segments from reserved address
    /// ranges where the system has them.
    pub(crate) fn new(reserves: bool, exact_blocks: bool) -> Self {
        Self::with_page(reserves, exact_blocks, reservation::page_size())
    }

    /// An empty arena computing in pages of `page` bytes: the system's page
    /// size or a multiple of it.
    pub(crate) fn with_page(reserves: bool, exact_blocks: bool, page: usize) -> Self {
        Self {
            page,
            last_growth: None,
            exact_blocks,
            ranges: FreeRanges::new(),
            extra: HashMap::with_hasher_in(FixedState::default(), Bookkeeping),
            quick: HashMap::with_hasher_in(FixedState::default(), Bookkeeping),
            quick_bytes: 0,
            quick_blocks: 0,
            decommitted: BTreeMap::new(),
            decommitted_bytes: 0,
            fixed: BTreeMap::new(),
            window: 0,
            reservations: Vec::new(),
            reserves,
        }
    }

    /// What the arena holds, as `Stats` reports it: decommitted free bytes
    /// hold no memory.
    pub(crate) fn held(&self) -> Held {
        let segments = self.committed_bytes();
        Held {
            reserved: segments - self.decommitted_bytes,
            cached: self.ranges.free_bytes() + self.quick_bytes - self.decommitted_bytes,
            free_ranges: self.ranges.len() + self.quick_blocks,
            decommitted: self.decommitted_bytes,
        }
    }

    fn committed_bytes(&self) -> usize {
        self.ranges.segment_bytes()
    }

    /// Free bytes no shed can give back: those of fixed segments that hold a
    /// live block, and in reservations the parts of free ranges that share a
    /// page with a live block (pages are decommitted whole). Quick-listed
    /// blocks count as the free ranges they merge into before a shed.
    /// `O(n log n)` in the free ranges: for `stats()` and the budget, not the
    /// hot path.
    pub(crate) fn pinned(&self) -> usize {
        let mut free: Vec<(usize, usize), Bookkeeping> = Vec::new_in(Bookkeeping);
        free.extend(self.ranges.largest_first());
        for (&len, starts) in &self.quick {
            free.extend(starts.iter().map(|&start| (start, len)));
        }
        free.sort_unstable();
        let mut pinned = 0;
        // Fixed segments: all their free bytes, unless the segment is free.
        for (&segment, &Fixed { layout, .. }) in &self.fixed {
            let end = segment + layout.size();
            let from = free.partition_point(|&(start, _)| start < segment);
            let bytes: usize = free[from..]
                .iter()
                .take_while(|&&(start, _)| start < end)
                .map(|&(_, len)| len)
                .sum();
            if bytes < layout.size() {
                pinned += bytes;
            }
        }
        // Reservations: merged free runs, less their whole pages.
        let mut run: Option<(usize, usize)> = None;
        let page = self.page;
        let partial = |(start, end): (usize, usize)| {
            let (from, to) = (start.next_multiple_of(page), end / page * page);
            (end - start) - to.saturating_sub(from)
        };
        for &(start, len) in free.iter().filter(|&&(start, _)| !self.in_fixed(start)) {
            run = match run {
                Some((run_start, run_end)) if run_end == start => Some((run_start, start + len)),
                Some(done) => {
                    pinned += partial(done);
                    Some((start, start + len))
                }
                None => Some((start, start + len)),
            };
        }
        pinned + run.map_or(0, partial)
    }

    /// Carves a block of `len` bytes aligned to `align` out of the smallest
    /// free range that holds it; `None` if none does.
    pub(crate) fn carve(&mut self, len: usize, align: usize) -> Option<Carved> {
        if let Some(list) = self.quick.get_mut(&len)
            && let Some(&start) = list.last()
            && start.is_multiple_of(align)
        {
            list.pop();
            self.quick_bytes -= len;
            self.quick_blocks -= 1;
            poison::unpoison_at(start, len);
            return Some(Carved {
                start,
                len,
                fresh: false,
            });
        }
        let taken = match self.ranges.take(len, align) {
            Some(taken) => taken,
            None if self.quick_blocks > 0 => {
                self.flush();
                self.ranges.take(len, align)?
            }
            None => return None,
        };
        let mut taken = taken;
        if taken.len > len {
            if self.keeps_tail(taken.len - len) && self.extra.try_reserve(1).is_ok() {
                self.extra.insert(taken.start, taken.len - len);
            } else {
                // Nowhere to record the tail: it stays free instead.
                self.ranges.give(taken.start + len, taken.len - len);
                taken.len = len;
            }
        }
        let fresh = self.recommit(taken.start, taken.len);
        poison::unpoison_at(taken.start, taken.len);
        Some(Carved {
            start: taken.start,
            len: taken.len,
            fresh,
        })
    }

    /// Grows the newest reservation (or reserves a new one) so that a block
    /// of `len` bytes aligned to `align` fits, and carves it. `None` if this
    /// arena takes no reservations or the system refuses.
    ///
    /// The arena commits at most `room` more bytes (a hard limit's).
    pub(crate) fn grow_and_carve(
        &mut self,
        len: usize,
        align: usize,
        room: usize,
    ) -> Option<Carved> {
        if !self.reserves || len > room {
            return None;
        }
        if !self.grow_newest(len, align, room) {
            let capacity = self
                .reservations
                .last()
                .map_or(FIRST_CAPACITY, |last| last.capacity().saturating_mul(2))
                .max(len.checked_add(align)?.checked_add(self.page)?);
            let Some(reservation) = Reservation::new(capacity, self.page) else {
                // No address space even for the first reservation: fixed
                // segments from now on. A refused larger one (an absurd
                // request) only sends this request to the backing.
                if self.reservations.is_empty() && capacity == FIRST_CAPACITY {
                    self.reserves = false;
                }
                return None;
            };
            self.reservations.push(reservation);
            if !self.grow_newest(len, align, room) {
                return None;
            }
        }
        let mut carved = self.carve(len, align)?;
        carved.fresh = true;
        Some(carved)
    }

    /// Commits enough of the newest reservation for the block, at most
    /// `room` bytes; whether it did.
    fn grow_newest(&mut self, len: usize, align: usize, room: usize) -> bool {
        let Some(reservation) = self.reservations.last_mut() else {
            return false;
        };
        let base = reservation.base();
        let top = base + reservation.committed();
        // The block starts in the free range at the top, if there is one.
        let from = self.ranges.free_top(base).map_or(top, |(start, _)| start);
        let Some(needed) = from
            .checked_next_multiple_of(align)
            .and_then(|at| at.checked_add(len))
            .and_then(|end| reservation::commit_target(end - base, self.page))
        else {
            return false;
        };
        let committed = reservation.committed();
        if needed > reservation.capacity()
            || needed - committed > room
            || !reservation.commit(needed)
        {
            return false;
        }
        // The chunk the old top was in may have been touched with small
        // pages; now that it is wholly committed, it may become one huge
        // page, unless that would make decommitted pages resident behind
        // the books' back.
        if let Some(chunk) = reservation::completed_chunk(committed, needed)
            && !self.any_decommitted(base + chunk, base + chunk + HUGE_PAGE)
            && let Some(reservation) = self.reservations.last()
        {
            reservation.collapse(chunk);
        }
        poison::poison_at(top, needed - committed);
        self.last_growth = Some((top, needed - committed));
        if committed == 0 {
            self.ranges.add_segment(base, needed);
        } else {
            self.ranges.grow_segment(base, needed - committed);
        }
        true
    }

    /// The layout of a new fixed segment for a block of `len` bytes aligned
    /// to `align`: page-aligned (or more), at least the block, and at least
    /// an eighth of what the arena holds (256 KiB to 64 MiB), so a growing
    /// cache takes few segments.
    pub(crate) fn fixed_segment_layout(&self, len: usize, align: usize) -> Option<Layout> {
        let floor = (self.committed_bytes() / 8).clamp(256 << 10, 64 << 20);
        let size = len.max(floor).checked_next_multiple_of(self.page)?;
        Layout::from_size_align(size, align.max(self.page)).ok()
    }

    /// Adds a fixed segment the backing allocator handed out for `layout`,
    /// all of it free.
    pub(crate) fn add_fixed(&mut self, start: usize, layout: Layout) {
        poison::poison_at(start, layout.size());
        self.ranges.add_segment(start, layout.size());
        // Taken for a block now: in use in this window.
        let freed_in = self.window;
        self.fixed.insert(start, Fixed { layout, freed_in });
    }

    /// Takes back the live block at `start`, carved for a request of `len`
    /// bytes (`block_of`); its whole length.
    pub(crate) fn uncarve(&mut self, start: usize, len: usize) -> usize {
        let len = self.block_len(start, len);
        if !self.extra.is_empty() {
            self.extra.remove(&start);
        }
        poison::poison_at(start, len);
        if len > QUICK_MAX {
            freed_into(&mut self.fixed, start, self.window);
            self.ranges.give(start, len);
            return len;
        }
        // A quick-listed block's segment learns of the free when the block
        // merges (`flush`, at the latest when the window closes): the
        // quick path stays two hash operations.
        let list = self
            .quick
            .entry(len)
            .or_insert_with(|| Vec::new_in(Bookkeeping));
        if list.try_reserve(1).is_ok() {
            list.push(start);
            self.quick_bytes += len;
            self.quick_blocks += 1;
        } else {
            freed_into(&mut self.fixed, start, self.window);
            self.ranges.give(start, len);
        }
        len
    }

    /// Merges every quick-listed block into the free ranges. Their fixed
    /// segments count them freed in the window now open: exact, since the
    /// quick lists are flushed every time a window closes (`next_window`).
    pub(crate) fn flush(&mut self) {
        for (len, list) in self.quick.iter_mut() {
            for start in list.drain(..) {
                freed_into(&mut self.fixed, start, self.window);
                self.ranges.give(start, *len);
            }
        }
        self.quick_bytes = 0;
        self.quick_blocks = 0;
    }

    /// The whole length of the live block at `start`, carved for a request
    /// of `len` bytes (`block_of`).
    #[inline]
    pub(crate) fn block_len(&self, start: usize, len: usize) -> usize {
        if self.extra.is_empty() {
            return len;
        }
        len + self.extra.get(&start).copied().unwrap_or(0)
    }

    /// The one rule for a block's length: a carve or a shrink in place
    /// leaves a tail under [`SPLIT_MIN`](crate::free_ranges::SPLIT_MIN)
    /// with the block (recorded in `extra`: a free range that small is
    /// waste), unless the arena keeps `exact_blocks` (a cache with fronts,
    /// which knows a block's length only from its layout): then every tail
    /// goes back and a block is always its request's length. The free
    /// ranges' `take` leaves no larger tail; the fronts' relist and the
    /// cache's choice of `exact_blocks` rely on this and point here.
    fn keeps_tail(&self, tail: usize) -> bool {
        tail > 0 && tail < crate::free_ranges::SPLIT_MIN && !self.exact_blocks
    }

    /// Makes the live block at `start` (carved for `old` bytes) serve a
    /// request of `new` bytes (`block_of`, at most its whole length) in
    /// place: a tail worth keeping goes back to the free ranges. Its whole
    /// length afterwards, or `None` if that cannot be recorded.
    pub(crate) fn shrink(&mut self, start: usize, old: usize, new: usize) -> Option<usize> {
        let whole = self.block_len(start, old);
        let tail = whole.checked_sub(new)?;
        if tail > 0 && !self.keeps_tail(tail) {
            self.extra.remove(&start);
            poison::poison_at(start + new, tail);
            self.ranges.give(start + new, tail);
            return Some(new);
        }
        if tail == 0 {
            self.extra.remove(&start);
        } else {
            self.extra.try_reserve(1).ok()?;
            self.extra.insert(start, tail);
        }
        Some(whole)
    }

    /// Gives free memory back until at most `target` cached bytes hold
    /// memory: fixed segments with no live block, by address (returned for
    /// the caller to free), then the free tops of reservations
    /// (uncommitted), then the pages inside the largest free ranges of
    /// reservations (decommitted). Pinned bytes stay.
    pub(crate) fn shed(&mut self, target: usize) -> Shed {
        let mut shed = Shed::default();
        self.flush();
        self.shed_fixed(WholeSegments::DownTo(target), &mut shed);
        self.shed_reserved(target, &mut shed);
        shed
    }

    /// Decay's shed, when a window closes: every fixed segment wholly free
    /// all of that window (returned for the caller to free), however far
    /// that goes past or short of `target`; then, as `shed`, the
    /// reservations' free memory until at most `target` cached bytes hold
    /// memory.
    ///
    /// A fixed segment goes back only whole, so the window's low-water mark
    /// (the cache's `target`) cannot say which: it counts the never-used
    /// tail of a segment reused in the window as much as a segment nobody
    /// touched, and a trim to it takes the reused segment too (by address,
    /// or largest first, whichever comes first). In an arena with both
    /// sources (a reservation refused for address space), the reservations
    /// may still shed a reused segment's tail's worth of pages.
    pub(crate) fn decay(&mut self, target: usize) -> Shed {
        let mut shed = Shed::default();
        self.flush();
        self.shed_fixed(WholeSegments::IdleAWindow, &mut shed);
        self.shed_reserved(target, &mut shed);
        shed
    }

    /// The decay window closed: frees from now on are in the next one.
    /// Called once a window, after its decay shed. With fixed segments, the
    /// quick lists merge first: a block on them was freed in the window
    /// that closed (a reservation alone keeps them: nothing to count).
    pub(crate) fn next_window(&mut self) {
        if !self.fixed.is_empty() {
            self.flush();
        }
        self.window += 1;
    }

    /// Gives back the fixed segments with no live block that `which` picks
    /// (the caller flushed the quick lists), out of the index, into `shed`.
    fn shed_fixed(&mut self, which: WholeSegments, shed: &mut Shed) {
        // Last freed into before the window that is closing (`window`
        // until `next_window`): no block was in use in it all window.
        let idle = |segment: &Fixed| segment.freed_in < self.window;
        let free_fixed: Vec<usize> = self
            .fixed
            .iter()
            .filter(|&(&start, segment)| {
                self.ranges.is_segment_free(start)
                    && match which {
                        WholeSegments::DownTo(_) => true,
                        WholeSegments::IdleAWindow => idle(segment),
                    }
            })
            .map(|(&start, _)| start)
            .collect();
        for start in free_fixed {
            if let WholeSegments::DownTo(target) = which
                && self.held().cached <= target
            {
                break;
            }
            if self.ranges.remove_segment_if_free(start)
                && let Some(Fixed { layout, .. }) = self.fixed.remove(&start)
            {
                poison::unpoison_at(start, layout.size());
                shed.segments.push((start, layout));
                shed.bytes += layout.size();
                shed.pieces += 1;
                shed.segment_frees += 1;
            }
        }
    }

    /// The reservations' part of a shed, down to `target` cached bytes:
    /// their free tops uncommitted, then pages inside their largest free
    /// ranges decommitted.
    fn shed_reserved(&mut self, target: usize, shed: &mut Shed) {
        let cached = |arena: &Self| arena.held().cached;
        // Free tops of reservations: uncommitted as far as needed, and
        // always past pages at the top that are already decommitted.
        for index in 0..self.reservations.len() {
            let base = self.reservations[index].base();
            let Some((start, _)) = self.ranges.free_top(base) else {
                continue;
            };
            let committed = self.reservations[index].committed();
            let floor = (start - base).next_multiple_of(self.page);
            let mut excess = cached(self).saturating_sub(target);
            let mut keep = committed;
            while keep > floor {
                match self.decommitted_below(base + keep) {
                    // The page below `keep` is decommitted: uncommitting it
                    // costs nothing.
                    Some((from, to)) if to >= base + keep => {
                        keep = (from - base).max(floor);
                    }
                    below => {
                        if excess == 0 {
                            break;
                        }
                        let low = below.map_or(floor, |(_, to)| (to - base).max(floor));
                        let cut = (keep - low).min(excess.next_multiple_of(self.page));
                        keep -= cut;
                        excess = excess.saturating_sub(cut);
                    }
                }
            }
            if keep >= committed {
                continue;
            }
            let before = cached(self);
            if self.forget_decommitted(base + keep, base + committed) > 0 {
                self.allow_huge_pages(base + keep, base + committed);
            }
            self.ranges.shrink_segment(base, committed - keep);
            poison::unpoison_at(base + keep, committed - keep);
            // SAFETY: `[base + keep, base + committed)` was the free top of
            // the segment and just left the index: nobody uses it.
            unsafe { self.reservations[index].uncommit(keep) };
            shed.unmapped.push((base + keep, committed - keep));
            shed.bytes += before - cached(self);
            shed.pieces += 1;
            shed.segment_frees += 1;
        }
        // Whole pages inside free ranges, largest range first, from their
        // tops, skipping pages already decommitted, only as many as needed.
        if cached(self) > target && !self.reservations.is_empty() {
            let candidates: Vec<(usize, usize)> = self
                .ranges
                .largest_first()
                .filter(|&(start, len)| len >= self.page && !self.in_fixed(start))
                .collect();
            let page = self.page;
            for (start, len) in candidates {
                let from = start.next_multiple_of(page);
                let mut high = (start + len) / page * page;
                while high > from {
                    let excess = cached(self).saturating_sub(target);
                    if excess == 0 {
                        return;
                    }
                    let below = self.decommitted_below(high);
                    if let Some((low, end)) = below
                        && end >= high
                    {
                        high = low.max(from);
                        continue;
                    }
                    let low = below.map_or(from, |(_, end)| end.max(from));
                    let low = low.max(high - (high - low).min(excess.next_multiple_of(page)));
                    self.mark_decommitted(low, high);
                    if let Some(reservation) = self.reservation_of(low) {
                        // SAFETY: `[low, high)` is page-aligned and lies
                        // inside a free range of this reservation:
                        // committed, ours, unused.
                        unsafe { reservation.decommit(low, high - low) };
                        // Its chunks stay on small pages while they hold
                        // decommitted pages (see `advise_huge_chunks`).
                        let base = reservation.base();
                        let (from, to) = chunks_over(low - base, high - base);
                        reservation.advise_huge_chunks(from, to, false);
                    }
                    shed.bytes += high - low;
                    shed.pieces += 1;
                    high = low;
                }
            }
        }
    }

    /// Every reservation, out of the arena; dropping one unmaps it.
    ///
    /// # Safety
    ///
    /// - no block carved from a reservation is live, nor used once the
    ///   returned reservations drop (the cache is going away);
    /// - the arena carves nothing afterwards (it has no reservations left,
    ///   and must not grow new ones).
    pub(crate) unsafe fn take_reservations(&mut self) -> Vec<Reservation> {
        for reservation in &self.reservations {
            poison::unpoison_at(reservation.base(), reservation.committed());
        }
        core::mem::take(&mut self.reservations)
    }

    /// Every fixed segment, all free (the cache is going away), out of the
    /// index for the caller to give back.
    pub(crate) fn take_fixed(&mut self) -> Vec<(usize, Layout)> {
        let fixed = core::mem::take(&mut self.fixed);
        fixed
            .into_iter()
            .map(|(start, Fixed { layout, .. })| {
                self.ranges.remove_segment_if_free(start);
                poison::unpoison_at(start, layout.size());
                (start, layout)
            })
            .collect()
    }

    /// The range the last growth of a reservation committed, once.
    pub(crate) fn take_growth(&mut self) -> Option<(usize, usize)> {
        self.last_growth.take()
    }

    /// The bytes each longer block in use holds beyond its request's
    /// length, by start (for a snapshot).
    pub(crate) fn extras(&self) -> BTreeMap<usize, usize> {
        self.extra
            .iter()
            .map(|(&start, &extra)| (start, extra))
            .collect()
    }

    /// The segments, `(start, length, kind)` by address, and their free
    /// pieces (free ranges less their decommitted pages, the decommitted
    /// pages, quick-listed blocks), for a snapshot.
    pub(crate) fn books(
        &self,
    ) -> (
        std::vec::Vec<(usize, usize, crate::snapshot::SegmentKind)>,
        std::vec::Vec<crate::snapshot::Piece>,
    ) {
        use crate::snapshot::{BlockState, Piece, SegmentKind};
        let segments = self
            .ranges
            .segments()
            .map(|(start, end)| {
                let kind = if self.fixed.contains_key(&start) {
                    SegmentKind::Fixed
                } else {
                    SegmentKind::Reserved
                };
                (start, end - start, kind)
            })
            .collect();
        let mut pieces = std::vec::Vec::new();
        for (start, len) in self.ranges.iter() {
            let end = start + len;
            let mut at = start;
            for (&from, &to) in self.decommitted.range(..end) {
                if to <= start {
                    continue;
                }
                let (from, to) = (from.max(start), to.min(end));
                if from > at {
                    pieces.push(Piece {
                        address: at,
                        size: from - at,
                        state: BlockState::Free,
                    });
                }
                pieces.push(Piece {
                    address: from,
                    size: to - from,
                    state: BlockState::Decommitted,
                });
                at = to;
            }
            if end > at {
                pieces.push(Piece {
                    address: at,
                    size: end - at,
                    state: BlockState::Free,
                });
            }
        }
        for (&len, starts) in &self.quick {
            pieces.extend(starts.iter().map(|&address| Piece {
                address,
                size: len,
                state: BlockState::QuickList,
            }));
        }
        (segments, pieces)
    }

    fn in_fixed(&self, addr: usize) -> bool {
        self.fixed
            .range(..=addr)
            .next_back()
            .is_some_and(|(&start, segment)| addr < start + segment.layout.size())
    }

    fn reservation_of(&self, addr: usize) -> Option<&Reservation> {
        self.reservations
            .iter()
            .find(|r| addr >= r.base() && addr < r.base() + r.committed())
    }

    /// The pages under `[start, start + len)` hold memory again; whether any
    /// of them had been decommitted.
    fn recommit(&mut self, start: usize, len: usize) -> bool {
        if self.decommitted.is_empty() {
            return false;
        }
        let from = start / self.page * self.page;
        let to = (start + len).next_multiple_of(self.page);
        let recommitted = self.forget_decommitted(from, to) > 0;
        if recommitted {
            self.allow_huge_pages(from, to);
        }
        recommitted
    }

    /// The huge-page chunks over `[from, to)` that no longer hold a
    /// decommitted page may be backed by huge pages again.
    fn allow_huge_pages(&self, from: usize, to: usize) {
        let Some(reservation) = self.reservation_of(from) else {
            return;
        };
        let base = reservation.base();
        let (first, end) = chunks_over(from - base, to - base);
        for chunk in (first..end).step_by(HUGE_PAGE) {
            if !self.any_decommitted(base + chunk, base + chunk + HUGE_PAGE) {
                reservation.advise_huge_chunks(chunk, chunk + HUGE_PAGE, true);
            }
        }
    }

    /// Whether any page of `[from, to)` is decommitted.
    fn any_decommitted(&self, from: usize, to: usize) -> bool {
        self.decommitted_below(to)
            .is_some_and(|(_, end)| end > from)
    }

    /// The decommitted interval with the highest start below `addr`.
    fn decommitted_below(&self, addr: usize) -> Option<(usize, usize)> {
        self.decommitted
            .range(..addr)
            .next_back()
            .map(|(&from, &to)| (from, to))
    }

    /// Records `[from, to)` (committed free pages) as decommitted, merged with
    /// the decommitted intervals that touch it.
    fn mark_decommitted(&mut self, from: usize, to: usize) {
        self.decommitted_bytes += to - from;
        let mut from = from;
        let mut to = to;
        if let Some((low, end)) = self.decommitted_below(from)
            && end == from
        {
            self.decommitted.remove(&low);
            from = low;
        }
        if let Some(end) = self.decommitted.remove(&to) {
            to = end;
        }
        self.decommitted.insert(from, to);
    }

    /// Removes `[from, to)` from the decommitted pages; how many bytes were.
    fn forget_decommitted(&mut self, from: usize, to: usize) -> usize {
        let overlapping: Vec<(usize, usize)> = self
            .decommitted
            .range(..to)
            .rev()
            .take_while(|&(_, &end)| end > from)
            .map(|(&start, &end)| (start, end))
            .collect();
        let mut forgotten = 0;
        for (start, end) in overlapping {
            self.decommitted.remove(&start);
            if start < from {
                self.decommitted.insert(start, from);
            }
            if end > to {
                self.decommitted.insert(to, end);
            }
            forgotten += end.min(to) - start.max(from);
        }
        self.decommitted_bytes -= forgotten;
        forgotten
    }
}

impl core::fmt::Debug for Arena {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Arena")
            .field("free_ranges", &self.ranges.len())
            .field("longer_blocks", &self.extra.len())
            .field("fixed_segments", &self.fixed.len())
            .field("reservations", &self.reservations.len())
            .finish_non_exhaustive()
    }
}

/// A block at `start` was freed in `window`: if a fixed segment holds it,
/// the segment was in use in that window. A reservation alone (the usual
/// arena on Linux) has no fixed segment to look up; in window 0 (every
/// window of a cache that does not decay) every segment's stamp is 0
/// already, so the free skips the lookup.
#[inline]
fn freed_into(fixed: &mut BTreeMap<usize, Fixed>, start: usize, window: u64) {
    if window != 0
        && !fixed.is_empty()
        && let Some((&segment_start, segment)) = fixed.range_mut(..=start).next_back()
        // Not a block of a reservation above the segment (an arena with
        // both): that would keep an idle segment a window longer.
        && start < segment_start + segment.layout.size()
    {
        segment.freed_in = window;
    }
}

/// The huge-page chunks (offsets into a reservation) that `[from, to)`
/// overlaps: `[first, end)`, chunk-aligned.
fn chunks_over(from: usize, to: usize) -> (usize, usize) {
    (from / HUGE_PAGE * HUGE_PAGE, to.next_multiple_of(HUGE_PAGE))
}

/// The pointer to `addr`, an address inside a segment.
///
/// # Safety
///
/// - `addr` lies inside a segment of an arena (a reservation, whose pointer
///   the kernel's mapping exposed, or a fixed segment, whose pointer the
///   cache exposed when it added it), so it is not null and its provenance
///   is exposed;
/// - the caller uses the pointer only within that segment, while it lives.
#[inline]
pub(crate) unsafe fn pointer(addr: usize) -> core::ptr::NonNull<u8> {
    let raw = core::ptr::with_exposed_provenance_mut::<u8>(addr);
    // SAFETY: segments never start at address 0 (the caller's contract puts
    // `addr` inside one), so no address inside one is null.
    unsafe { core::ptr::NonNull::new_unchecked(raw) }
}

#[cfg(all(test, target_os = "linux", not(miri)))]
mod tests {
    //! The reservation's page arithmetic with the page size as a parameter:
    //! with 16 and 64 KiB pages (arm64 kernels ship both; a multiple of this
    //! machine's page is a valid page for every call), random carves, frees,
    //! shrinks and sheds never decommit a byte of a live block, every
    //! decommitted range is whole pages, and every live block keeps its
    //! contents.

    use super::*;

    /// A live block: its start, whole length, request length and fill byte.
    struct Live {
        start: usize,
        whole: usize,
        request: usize,
        fill: u8,
    }

    fn bytes(live: &Live) -> &'static mut [u8] {
        // SAFETY: the block is carved and live: `whole` committed bytes of
        // the arena's reservation that only this test touches.
        unsafe { core::slice::from_raw_parts_mut(pointer(live.start).as_ptr(), live.whole) }
    }

    fn check(arena: &Arena, live: &[Live], page: usize) {
        for (&from, &to) in &arena.decommitted {
            assert!(
                from.is_multiple_of(page) && to.is_multiple_of(page),
                "{from:#x}..{to:#x}"
            );
            for block in live {
                let end = block.start + block.whole;
                assert!(
                    to <= block.start || from >= end,
                    "pages {from:#x}..{to:#x} decommitted under the live block {:#x}..{end:#x}",
                    block.start
                );
            }
        }
        for reservation in &arena.reservations {
            assert!(reservation.committed().is_multiple_of(page));
        }
        for block in live {
            let request = &bytes(block)[..block.request];
            assert!(
                request.iter().all(|&byte| byte == block.fill),
                "block {:#x} changed",
                block.start
            );
        }
    }

    fn run(page: usize, seed: u64) {
        let mut arena = Arena::with_page(true, seed.is_multiple_of(2), page);
        let mut live: std::vec::Vec<Live> = std::vec::Vec::new();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below as u64) as usize
        };
        for step in 0..400 {
            match next(10) {
                0..=4 => {
                    let len = match next(8) {
                        0 => (1 + next(3 * page / MIN_ALIGN)) * MIN_ALIGN,
                        1 => (1 + next(40)) * page / 2 + MIN_ALIGN * next(4),
                        _ => (1 + next(64)) * MIN_ALIGN,
                    };
                    let align = if next(4) == 0 { page } else { MIN_ALIGN };
                    let carved = arena
                        .carve(len, align)
                        .or_else(|| arena.grow_and_carve(len, align, usize::MAX))
                        .expect("a reservation has room");
                    let block = Live {
                        start: carved.start,
                        whole: carved.len,
                        request: len,
                        fill: step as u8,
                    };
                    bytes(&block)[..len].fill(block.fill);
                    live.push(block);
                }
                5..=7 if !live.is_empty() => {
                    let block = live.swap_remove(next(live.len()));
                    assert_eq!(arena.uncarve(block.start, block.request), block.whole);
                }
                8 if !live.is_empty() => {
                    let at = next(live.len());
                    let block = &mut live[at];
                    let new = (block.request / 2)
                        .next_multiple_of(MIN_ALIGN)
                        .max(MIN_ALIGN);
                    if let Some(whole) = arena.shrink(block.start, block.request, new) {
                        block.whole = whole;
                        block.request = new;
                    }
                }
                _ => {
                    let cached = arena.held().cached;
                    arena.shed(if next(2) == 0 { 0 } else { cached / 2 });
                    check(&arena, &live, page);
                }
            }
        }
        arena.shed(0);
        check(&arena, &live, page);
        for block in live.drain(..) {
            arena.uncarve(block.start, block.request);
        }
        // SAFETY: no block is live any more, and the arena is dropped next.
        drop(unsafe { arena.take_reservations() });
    }

    #[test]
    fn no_live_byte_is_decommitted_whatever_the_page_size() {
        let system = reservation::page_size();
        for page in [system, 16 << 10, 64 << 10] {
            if !page.is_multiple_of(system) {
                continue;
            }
            for seed in 1..=4 {
                run(page, seed);
            }
        }
    }
}

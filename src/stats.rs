//! [`Stats`]: a snapshot of a cache's counters, and how they are updated.

use core::fmt;

/// A snapshot of a cache's counters, taken under its lock (so the fields agree
/// with each other).
///
/// `bytes_in_use` counts the sizes of the `Layout`s users asked for; the
/// other byte counts are block sizes, what the backing allocator really holds.
/// With the default exact-size policy the two agree; with size classes the
/// difference is `bytes_lost_to_rounding`.
/// The fields follow the questions a person tuning memory asks first, in the
/// spirit of PyTorch's `torch.cuda.memory_stats`: how often the cache helped
/// (`hits`, `misses`), how much memory is in use and held (`bytes_in_use`,
/// `bytes_cached`, `bytes_reserved` and their peaks), and how much traffic
/// reached the backing allocator (`backing_allocs`, `backing_frees`,
/// `retries`, `failures`).
///
/// # Examples
///
/// ```
/// use allocator_api2::vec::Vec;
/// use caching_allocator::CachingAllocator;
///
/// let cache = CachingAllocator::new();
/// drop(Vec::<u8, _>::with_capacity_in(4096, cache.clone()));
/// let buffer = Vec::<u8, _>::with_capacity_in(4096, cache.clone());
///
/// let stats = cache.stats();
/// assert_eq!((stats.hits, stats.misses), (1, 1));
/// assert_eq!(stats.bytes_in_use, 4096);
/// assert_eq!(stats.hit_ratio(), 0.5);
/// drop(buffer);
/// assert_eq!(cache.stats().bytes_cached, 4096);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Stats {
    /// Allocations served from a free list (best fit: that needed no new
    /// memory).
    pub hits: u64,
    /// Allocations served by the backing allocator (a new block; best fit:
    /// a new or grown segment, or free pages that had been decommitted).
    pub misses: u64,
    /// Deallocations.
    pub frees: u64,
    /// Requested bytes of all allocations served from a free list, in total.
    pub bytes_hit: u64,
    /// Requested bytes of all allocations served by the backing allocator, in
    /// total.
    pub bytes_missed: u64,
    /// Bytes handed out and not yet freed.
    pub bytes_in_use: usize,
    /// Bytes held on free lists, ready to be handed out again (block sizes;
    /// best fit: the free bytes of its segments that hold memory).
    pub bytes_cached: usize,
    /// Bytes taken from the backing allocator and not given back: in use plus
    /// cached (plus lost to rounding). This is the cache's memory footprint.
    /// Best fit: the bytes of its segments, less `bytes_decommitted`.
    pub bytes_reserved: usize,
    /// Bytes of the blocks in use beyond what their requests asked for (size
    /// classes round up; always 0 with `SizePolicy::Exact`).
    pub bytes_lost_to_rounding: usize,
    /// Blocks handed out and not yet freed.
    pub blocks_in_use: usize,
    /// Blocks held on free lists (best fit: free ranges).
    pub blocks_cached: usize,
    /// Highest `bytes_in_use` seen.
    pub peak_bytes_in_use: usize,
    /// Highest `bytes_cached` seen.
    pub peak_bytes_cached: usize,
    /// Highest `bytes_reserved` seen.
    pub peak_bytes_reserved: usize,
    /// Blocks taken from the backing allocator (best fit: segments taken or
    /// grown).
    pub backing_allocs: u64,
    /// Blocks given back to the backing allocator (best fit: segments given
    /// back whole, or cut at their top).
    pub backing_frees: u64,
    /// Times the free lists were emptied: `release_cached` calls, and flushes
    /// after a failed backing allocation.
    pub releases: u64,
    /// Bytes given back by those releases, in total.
    pub bytes_released: u64,
    /// Cached blocks given back one by one to respect `max_cached_bytes`, a
    /// shared `Budget` or a `trim`, and freed blocks not cached because they
    /// did not fit (or caching stopped after a failure). Best fit: pieces of
    /// free memory given back (segments, segment tops, decommitted ranges).
    pub evictions: u64,
    /// Bytes of those blocks, in total.
    pub bytes_evicted: u64,
    /// Backing allocations that failed and were retried after releasing the
    /// cache (c10's out-of-memory path).
    pub retries: u64,
    /// Requests answered with `AllocError`: absurd sizes, or a backing
    /// allocation that failed again after the retry.
    pub failures: u64,
    /// Best fit: free bytes inside segments whose pages went back to the
    /// system (`MADV_DONTNEED`) while the segment stays: counted in neither
    /// `bytes_cached` nor `bytes_reserved`. Always 0 for the other policies.
    pub bytes_decommitted: usize,
    /// Best fit: free bytes, part of `bytes_cached`, that no release, trim,
    /// cap or budget can give back while their neighbours live: in fixed
    /// segments (a cache built with `build_in`) every free byte of a segment
    /// that still holds a live block (the backing allocator takes a segment
    /// back only whole, and the cache does not own its pages); in a reserved
    /// range the free bytes that share a page with a live block (pages are
    /// given back whole). Always 0 for the other policies.
    pub bytes_pinned: usize,
    /// Decay windows that closed ([`Builder::release_after`](crate::Builder::release_after)).
    pub decays: u64,
    /// Bytes decay gave back: free memory nobody reused for a whole window
    /// (best fit: uncommitted or decommitted; the other policies: blocks
    /// given back to the backing allocator). Not counted in `evictions`.
    pub bytes_decayed: u64,
    /// Requests refused because they would have taken the cache past its
    /// hard limit ([`Builder::max_bytes`](crate::Builder::max_bytes)) even
    /// after it gave its free memory back. Not counted in `failures`.
    pub limit_failures: u64,
}

impl Stats {
    /// Fraction of allocations served from the cache, `0.0` before any.
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }

    /// Fraction of requested bytes served from the cache, `0.0` before any.
    pub fn byte_hit_ratio(&self) -> f64 {
        let total = self.bytes_hit + self.bytes_missed;
        if total == 0 {
            0.0
        } else {
            self.bytes_hit as f64 / total as f64
        }
    }

    /// What happened since `earlier` (a snapshot of the same cache): the
    /// counters (`hits`, `misses`, `frees`, `bytes_hit`, `bytes_missed`,
    /// `backing_allocs`, `backing_frees`, `releases`, `bytes_released`,
    /// `evictions`, `bytes_evicted`, `retries`, `failures`) as differences,
    /// and everything else (bytes and blocks in use, cached, reserved, their
    /// peaks) as of `self`. The steady state of a server without hand
    /// subtraction: take a snapshot after the first (cold) pass, and
    /// `since` it later.
    ///
    /// A counter that went down (a snapshot of another cache) reads 0.
    ///
    /// ```
    /// use allocator_api2::vec::Vec;
    /// use caching_allocator::CachingAllocator;
    ///
    /// let cache = CachingAllocator::new();
    /// let pass = || drop(Vec::<u8, _>::with_capacity_in(1 << 20, cache.clone()));
    /// pass(); // the cold pass misses
    /// let warm = cache.stats();
    /// for _ in 0..9 {
    ///     pass();
    /// }
    /// let steady = cache.stats().since(&warm);
    /// assert_eq!((steady.hits, steady.misses), (9, 0));
    /// assert_eq!(steady.hit_ratio(), 1.0); // the whole life: 0.9
    /// assert_eq!(steady.bytes_cached, 1 << 20); // a gauge: as of now
    /// ```
    #[must_use]
    pub fn since(&self, earlier: &Stats) -> Stats {
        Stats {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            frees: self.frees.saturating_sub(earlier.frees),
            bytes_hit: self.bytes_hit.saturating_sub(earlier.bytes_hit),
            bytes_missed: self.bytes_missed.saturating_sub(earlier.bytes_missed),
            backing_allocs: self.backing_allocs.saturating_sub(earlier.backing_allocs),
            backing_frees: self.backing_frees.saturating_sub(earlier.backing_frees),
            releases: self.releases.saturating_sub(earlier.releases),
            bytes_released: self.bytes_released.saturating_sub(earlier.bytes_released),
            evictions: self.evictions.saturating_sub(earlier.evictions),
            bytes_evicted: self.bytes_evicted.saturating_sub(earlier.bytes_evicted),
            retries: self.retries.saturating_sub(earlier.retries),
            failures: self.failures.saturating_sub(earlier.failures),
            decays: self.decays.saturating_sub(earlier.decays),
            bytes_decayed: self.bytes_decayed.saturating_sub(earlier.bytes_decayed),
            limit_failures: self.limit_failures.saturating_sub(earlier.limit_failures),
            ..*self
        }
    }

    /// A cached block of `block` bytes served a request of `requested`.
    #[inline]
    pub(crate) fn on_hit(&mut self, requested: usize, block: usize) {
        self.hits += 1;
        self.bytes_hit += requested as u64;
        self.bytes_cached -= block;
        self.blocks_cached -= 1;
        self.add_in_use(requested, block);
    }

    /// A new block of `block` bytes served a request of `requested`.
    #[inline]
    pub(crate) fn on_miss(&mut self, requested: usize, block: usize) {
        self.misses += 1;
        self.bytes_missed += requested as u64;
        self.backing_allocs += 1;
        self.bytes_reserved += block;
        self.peak_bytes_reserved = self.peak_bytes_reserved.max(self.bytes_reserved);
        self.add_in_use(requested, block);
    }

    /// A block in use was freed onto a free list.
    #[inline]
    pub(crate) fn on_free(&mut self, requested: usize, block: usize) {
        self.remove_in_use(requested, block);
        self.bytes_cached += block;
        self.blocks_cached += 1;
        self.peak_bytes_cached = self.peak_bytes_cached.max(self.bytes_cached);
    }

    /// A block in use that could not be cached went straight back to the
    /// backing allocator.
    pub(crate) fn on_free_uncached(&mut self, requested: usize, block: usize) {
        self.on_free_to_backing(requested, block);
        self.evictions += 1;
        self.bytes_evicted += block as u64;
    }

    /// A block in use went back to the backing allocator.
    pub(crate) fn on_free_to_backing(&mut self, requested: usize, block: usize) {
        self.remove_in_use(requested, block);
        self.bytes_reserved -= block;
        self.backing_frees += 1;
    }

    /// An arena of `bytes` was taken from the backing allocator.
    pub(crate) fn on_arena_reserved(&mut self, bytes: usize) {
        self.backing_allocs += 1;
        self.bytes_reserved += bytes;
        self.peak_bytes_reserved = self.peak_bytes_reserved.max(self.bytes_reserved);
    }

    /// A request of `requested` bytes was served from an arena slot.
    pub(crate) fn on_arena_hit(&mut self, requested: usize) {
        self.hits += 1;
        self.bytes_hit += requested as u64;
        self.add_in_use(requested, requested);
    }

    /// An arena block was freed (its range is free again).
    pub(crate) fn on_arena_free(&mut self, requested: usize) {
        self.remove_in_use(requested, requested);
    }

    /// A block changed size in place (`grow`/`shrink` within one free list).
    pub(crate) fn on_resize_in_place(&mut self, old_bytes: usize, new_bytes: usize) {
        self.resize_in_use(old_bytes, new_bytes, 0);
    }

    /// A block in use now serves `new` requested bytes instead of `old`,
    /// and its length grew by `block_growth` (wrapping: may shrink).
    pub(crate) fn resize_in_use(&mut self, old: usize, new: usize, block_growth: usize) {
        self.bytes_in_use = self.bytes_in_use.wrapping_sub(old).wrapping_add(new);
        self.bytes_lost_to_rounding = self
            .bytes_lost_to_rounding
            .wrapping_add(old)
            .wrapping_add(block_growth)
            .wrapping_sub(new);
        raise(&mut self.peak_bytes_in_use, self.bytes_in_use);
    }

    /// `blocks` cached blocks holding `bytes` went back to the backing
    /// allocator at once (`release_cached`).
    pub(crate) fn on_release(&mut self, blocks: usize, bytes: usize) {
        self.releases += 1;
        self.bytes_released += bytes as u64;
        self.backing_frees += blocks as u64;
        self.bytes_cached -= bytes;
        self.blocks_cached -= blocks;
        self.bytes_reserved -= bytes;
    }

    /// One cached block of `block` bytes went back to the backing allocator
    /// (a cap, a budget or a trim).
    /// Counts the last `on_evict` of `block` bytes as decay instead.
    pub(crate) fn evicted_by_decay(&mut self, block: usize) {
        self.evictions -= 1;
        self.bytes_evicted -= block as u64;
        self.bytes_decayed += block as u64;
    }

    pub(crate) fn on_evict(&mut self, block: usize) {
        self.evictions += 1;
        self.bytes_evicted += block as u64;
        self.backing_frees += 1;
        self.bytes_cached -= block;
        self.blocks_cached -= 1;
        self.bytes_reserved -= block;
    }

    /// Best fit handed out a block of `block` bytes for `requested`; `hit`:
    /// no new memory was needed.
    #[inline]
    pub(crate) fn on_carved(&mut self, requested: usize, block: usize, hit: bool) {
        if hit {
            self.hits += 1;
            self.bytes_hit += requested as u64;
        } else {
            self.misses += 1;
            self.bytes_missed += requested as u64;
        }
        self.add_in_use(requested, block);
    }

    /// Best fit took back a block of `block` bytes (its range is free again).
    #[inline]
    pub(crate) fn on_uncarved(&mut self, requested: usize, block: usize) {
        self.remove_in_use(requested, block);
    }

    /// Best fit's memory now, as the arena counts it.
    #[inline]
    pub(crate) fn set_held(&mut self, held: crate::best_fit::Held) {
        self.bytes_reserved = held.reserved;
        self.bytes_cached = held.cached;
        self.blocks_cached = held.free_ranges;
        self.bytes_decommitted = held.decommitted;
        self.peak_bytes_reserved = self.peak_bytes_reserved.max(held.reserved);
        self.peak_bytes_cached = self.peak_bytes_cached.max(held.cached);
    }

    /// A front's counters join the shared books, `front_bytes` held in
    /// fronts so far: the front's peaks over the books as they stand, then
    /// its counters (see `front::Deltas`).
    pub(crate) fn fold(&mut self, deltas: &crate::front::Deltas, front_bytes: usize) {
        raise(
            &mut self.peak_bytes_in_use,
            add(self.bytes_in_use, deltas.peak_in_use),
        );
        raise(
            &mut self.peak_bytes_cached,
            add(
                self.bytes_cached.wrapping_add(front_bytes),
                deltas.peak_front,
            ),
        );
        self.apply(deltas);
    }

    /// Peaks a report reached (with the fronts' counters added) stay
    /// reported.
    pub(crate) fn keep_peaks(&mut self, reported: &Stats) {
        raise(&mut self.peak_bytes_in_use, reported.peak_bytes_in_use);
        raise(&mut self.peak_bytes_cached, reported.peak_bytes_cached);
    }

    /// A request failed: an absurd layout, or the backing refused it twice.
    pub(crate) fn on_failure(&mut self) {
        self.failures += 1;
    }

    /// A request failed at the hard limit (`Builder::max_bytes`).
    pub(crate) fn on_limit_failure(&mut self) {
        self.limit_failures += 1;
    }

    /// The backing refused once: the cache is released and asks again.
    pub(crate) fn on_retry(&mut self) {
        self.retries += 1;
    }

    /// A decay window closed.
    pub(crate) fn on_decay(&mut self) {
        self.decays += 1;
    }

    /// Best fit took new memory: a fixed segment, or a reservation grew.
    pub(crate) fn on_growth(&mut self) {
        self.backing_allocs += 1;
    }

    /// Best fit shed `bytes` of free memory in `pieces` pieces, with
    /// `backing_frees` backing calls; `count` says which counters learn it.
    pub(crate) fn on_shed(&mut self, count: Count, pieces: u64, bytes: usize, backing_frees: u64) {
        self.backing_frees += backing_frees;
        match count {
            Count::Release => {
                self.releases += 1;
                self.bytes_released += bytes as u64;
            }
            Count::Evict => {
                self.evictions += pieces;
                self.bytes_evicted += bytes as u64;
            }
            Count::Decay => self.bytes_decayed += bytes as u64,
        }
    }

    /// A cached block of `block` bytes left the shared lists for a front
    /// (a refill): the front's books count it from now on.
    pub(crate) fn on_moved_to_front(&mut self, block: usize) {
        self.bytes_cached -= block;
        self.blocks_cached -= 1;
    }

    /// A block of `block` bytes came from a front onto the shared lists.
    pub(crate) fn on_moved_from_front(&mut self, block: usize) {
        self.bytes_cached += block;
        self.blocks_cached += 1;
    }

    /// A block of `block` bytes from a front went back to the backing
    /// allocator (evicted, or it could not be listed).
    pub(crate) fn on_front_block_given_back(&mut self, block: usize) {
        self.evictions += 1;
        self.bytes_evicted += block as u64;
        self.backing_frees += 1;
        self.bytes_reserved -= block;
    }

    #[inline]
    fn add_in_use(&mut self, requested: usize, block: usize) {
        self.bytes_in_use = self.bytes_in_use.wrapping_add(requested);
        self.bytes_lost_to_rounding = self.bytes_lost_to_rounding.wrapping_add(block - requested);
        self.blocks_in_use = self.blocks_in_use.wrapping_add(1);
        raise(&mut self.peak_bytes_in_use, self.bytes_in_use);
    }

    #[inline]
    fn remove_in_use(&mut self, requested: usize, block: usize) {
        self.frees += 1;
        self.bytes_in_use = self.bytes_in_use.wrapping_sub(requested);
        self.bytes_lost_to_rounding = self.bytes_lost_to_rounding.wrapping_sub(block - requested);
        self.blocks_in_use = self.blocks_in_use.wrapping_sub(1);
    }
}
/// Which counters free memory given back feeds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Count {
    /// `release_cached` (and the flush before a retry): `releases`.
    Release,
    /// A trim, the cap, the budget: `evictions`.
    Evict,
    /// Decay: `bytes_decayed`.
    Decay,
}

/// A short human summary: the numbers a person tuning memory reads first.
///
/// ```
/// let cache = caching_allocator::CachingAllocator::new();
/// let text = cache.stats().to_string();
/// assert!(text.starts_with("hits 0 / misses 0"));
/// ```
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "hits {} / misses {} ({:.1}% hit, {:.1}% of bytes), frees {}",
            self.hits,
            self.misses,
            100.0 * self.hit_ratio(),
            100.0 * self.byte_hit_ratio(),
            self.frees
        )?;
        writeln!(
            f,
            "in use {} in {} blocks (peak {}, {} lost to rounding), cached {} in {} blocks (peak {})",
            Bytes(self.bytes_in_use),
            self.blocks_in_use,
            Bytes(self.peak_bytes_in_use),
            Bytes(self.bytes_lost_to_rounding),
            Bytes(self.bytes_cached),
            self.blocks_cached,
            Bytes(self.peak_bytes_cached)
        )?;
        write!(
            f,
            "reserved {} (peak {}); backing allocs {}, frees {}; releases {} ({}), evictions {} ({}), retries {}, failures {}",
            Bytes(self.bytes_reserved),
            Bytes(self.peak_bytes_reserved),
            self.backing_allocs,
            self.backing_frees,
            self.releases,
            Bytes(self.bytes_released.try_into().unwrap_or(usize::MAX)),
            self.evictions,
            Bytes(self.bytes_evicted.try_into().unwrap_or(usize::MAX)),
            self.retries,
            self.failures
        )?;
        if self.decays > 0 || self.limit_failures > 0 {
            write!(
                f,
                "; decays {} ({}), limit failures {}",
                self.decays,
                Bytes(self.bytes_decayed.try_into().unwrap_or(usize::MAX)),
                self.limit_failures
            )?;
        }
        Ok(())
    }
}

/// A byte count printed with a binary unit (`9.58 MiB`).
struct Bytes(usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.2} {}", UNITS[unit])
        }
    }
}

/// `value` moved by `delta` (a front's counter differences wrap as the
/// counters they come from do).
#[inline]
pub(crate) fn add(value: usize, delta: i64) -> usize {
    value.wrapping_add(delta as usize)
}

impl Stats {
    /// Adds the counters a front slot kept without the lock (its hits and
    /// frees) to these books: the one place a slot's `Deltas` meets `Stats`.
    /// The bytes the fronts hold and the peaks are the caller's: they need
    /// the shared books around them.
    pub(crate) fn apply(&mut self, deltas: &crate::front::Deltas) {
        self.hits += deltas.hits;
        self.frees += deltas.frees;
        self.bytes_hit += deltas.bytes_hit;
        self.bytes_in_use = add(self.bytes_in_use, deltas.in_use());
        self.blocks_in_use = add(self.blocks_in_use, deltas.blocks_in_use());
        self.bytes_lost_to_rounding = add(self.bytes_lost_to_rounding, deltas.lost());
    }
}

/// Raises `peak` to `value`, unless `value` is "below zero". The shared
/// books' in-use fields wrap: with front caches they are the true figures
/// less what the fronts have not folded yet, and a block hit from one
/// thread's front and freed into another's can take them below zero for a
/// while (`stats()` adds the fronts back; see `cache/fronts.rs`).
#[inline]
pub(crate) fn raise(peak: &mut usize, value: usize) {
    if value <= isize::MAX as usize && value > *peak {
        *peak = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_a_block_through_its_life() {
        let mut stats = Stats::default();
        stats.on_miss(100, 100);
        stats.on_free(100, 100);
        stats.on_hit(100, 100);
        stats.on_free(100, 100);
        stats.on_release(1, 100);
        assert_eq!((stats.hits, stats.misses, stats.frees), (1, 1, 2));
        assert_eq!(
            (stats.bytes_in_use, stats.bytes_cached, stats.bytes_reserved),
            (0, 0, 0)
        );
        assert_eq!(
            (stats.peak_bytes_in_use, stats.peak_bytes_cached),
            (100, 100)
        );
        assert_eq!((stats.backing_allocs, stats.backing_frees), (1, 1));
        assert_eq!((stats.releases, stats.bytes_released), (1, 100));
    }

    #[test]
    fn rounding_is_counted_while_a_block_is_in_use() {
        let mut stats = Stats::default();
        stats.on_miss(1000, 1024);
        assert_eq!(
            (
                stats.bytes_in_use,
                stats.bytes_reserved,
                stats.bytes_lost_to_rounding
            ),
            (1000, 1024, 24)
        );
        stats.on_resize_in_place(1000, 1020);
        assert_eq!(stats.bytes_lost_to_rounding, 4);
        stats.on_free(1020, 1024);
        assert_eq!(
            (
                stats.bytes_in_use,
                stats.bytes_cached,
                stats.bytes_lost_to_rounding
            ),
            (0, 1024, 0)
        );
        stats.on_evict(1024);
        assert_eq!(
            (stats.bytes_reserved, stats.evictions, stats.bytes_evicted),
            (0, 1, 1024)
        );
    }

    #[test]
    fn since_subtracts_counters_and_keeps_gauges() {
        let mut earlier = Stats::default();
        earlier.on_miss(100, 128);
        earlier.on_free(100, 128);
        let mut later = earlier;
        later.on_hit(100, 128);
        later.on_miss(50, 64);
        later.failures += 2;
        later.retries += 1;
        let steady = later.since(&earlier);
        assert_eq!((steady.hits, steady.misses, steady.frees), (1, 1, 0));
        assert_eq!((steady.bytes_hit, steady.bytes_missed), (100, 50));
        assert_eq!(
            (steady.backing_allocs, steady.failures, steady.retries),
            (1, 2, 1)
        );
        // Gauges and peaks as of `later`.
        assert_eq!(steady.bytes_in_use, later.bytes_in_use);
        assert_eq!(steady.bytes_reserved, later.bytes_reserved);
        assert_eq!(steady.peak_bytes_in_use, later.peak_bytes_in_use);
        assert_eq!(steady.blocks_in_use, 2);
        // Every counter field is covered: since itself is all zeros.
        let none = later.since(&later);
        assert_eq!(
            (
                none.hits,
                none.misses,
                none.frees,
                none.bytes_hit,
                none.bytes_missed
            ),
            (0, 0, 0, 0, 0)
        );
        assert_eq!(
            (
                none.backing_allocs,
                none.backing_frees,
                none.releases,
                none.bytes_released
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(
            (
                none.evictions,
                none.bytes_evicted,
                none.retries,
                none.failures
            ),
            (0, 0, 0, 0)
        );
        // Another cache's snapshot: no underflow.
        assert_eq!(earlier.since(&later).hits, 0);
    }

    #[test]
    fn byte_counts_print_with_binary_units() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(3 << 20).to_string(), "3.00 MiB");
    }
}

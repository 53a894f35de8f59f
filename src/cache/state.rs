//! The books behind a cache's lock, in one home.
//!
//! Every field of [`State`] is private to this module and changed only by
//! its methods (the counters in `stats` only by `Stats`'s own `on_*`
//! methods, in `stats.rs`); the slow paths in `cache.rs`, `lists.rs`,
//! `carving.rs` and `fronts.rs` read the books and ask for each change by
//! name. The size policy's one decision is made here too: [`Backend`] holds
//! either the free lists or best fit's arena, never both.

use core::mem;
use core::ptr::NonNull;
use std::collections::BTreeMap;

use allocator_api2::vec::Vec;
use foldhash::fast::FixedState;
use hashbrown::HashMap;

use super::Config;
use crate::best_fit::Arena;
use crate::budget::Budget;
use crate::decay::Window;
use crate::eviction::{EvictionIndex, Victim};
use crate::front::Deltas;
use crate::policy::{Key, SizePolicy};
use crate::reentry::{self, Bookkeeping};
use crate::snapshot::{BlockState, Piece, SegmentKind};
use crate::stats::{Stats, add};

/// Which backend a cache has: the size policy's one decision, made when the
/// cache is built and never changed. `Cache` keeps a copy to dispatch on
/// without the lock; [`State::backend`] holds the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// `SizeClasses` and `Exact`: a free list a key, each block a backing
    /// allocation (`lists.rs`).
    Lists,
    /// `BestFit`: blocks carved from segments (`carving.rs`, `best_fit.rs`).
    Arena,
}

impl Kind {
    pub(super) fn of(policy: SizePolicy) -> Self {
        match policy {
            SizePolicy::BestFit => Kind::Arena,
            _ => Kind::Lists,
        }
    }
}

/// Where a cache keeps its free memory.
// One a cache, built in place and never moved: boxing the arena would only
// add a load to every carve.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Lists(Lists),
    Arena(Arena),
}

/// A cached block, its age (a clock reading taken when it was listed) and its
/// GreedyDual-Size priority (see `eviction.rs`).
#[derive(Clone, Copy)]
pub(super) struct Cached {
    pub(super) block: NonNull<u8>,
    age: u64,
    priority: u64,
}

/// Cached blocks of one key, oldest first. Hits take the last (most recently
/// freed: its cache lines and pages are the warmest); evictions the first.
type FreeList = Vec<Cached, Bookkeeping>;

/// A fixed-seed hasher: no lazy random seed, and cheap on two-word keys.
pub(super) type FreeLists = HashMap<Key, FreeList, FixedState, Bookkeeping>;

fn empty_free_lists() -> FreeLists {
    HashMap::with_hasher_in(FixedState::default(), Bookkeeping)
}

/// The free-list policies' memory: the lists, and every cached block by age
/// (and priority) when the cache evicts (a cap or a budget is set).
struct Lists {
    lists: FreeLists,
    index: Option<EvictionIndex>,
}

/// A cached block [`State::evict`] took off its list, counted evicted:
/// owned by the cache alone and taken from the backing allocator with its
/// key's layout. Only `evict` makes one, so `lists.rs` gives it back
/// without a further argument.
pub(super) struct Evicted {
    key: Key,
    block: NonNull<u8>,
}

impl Evicted {
    pub(super) fn key(&self) -> Key {
        self.key
    }

    pub(super) fn block(&self) -> NonNull<u8> {
        self.block
    }
}

/// The free lists `release_lists` took out, with their index.
pub(super) struct Released {
    pub(super) lists: FreeLists,
    pub(super) index: Option<EvictionIndex>,
    pub(super) bytes: usize,
}

/// What a snapshot shows of the shared side: the segments `(start,
/// length, kind)`, their pieces, and best fit's bytes beyond each live
/// block's request, by start.
pub(super) type ShownLayout = (
    std::vec::Vec<(usize, usize, SegmentKind)>,
    std::vec::Vec<Piece>,
    BTreeMap<usize, usize>,
);

/// A budget's books against a best-fit cache's free bytes (`State::reconcile`).
pub(super) enum Reconcile {
    /// The budget held this many bytes too many: taken off the books, to
    /// be given back to it.
    Surplus(usize),
    /// The budget holds this many bytes too few.
    Shortfall(usize),
}

pub(super) struct State {
    backend: Backend,
    stats: Stats,
    /// The clock of a cache without a budget (a budget has one for all).
    clock: u64,
    /// Set after an allocation failed even after release and retry, if the
    /// config says to stop caching then.
    caching_stopped: bool,
    /// Bytes and blocks in front caches, as of the counters folded so far
    /// (not part of `stats.bytes_cached`, which is the shared side's).
    front_bytes: usize,
    front_blocks: usize,
    /// Credit granted to front caches (with a cap or a budget): bytes they
    /// may hold, counted against the cap beside `stats.bytes_cached`, and
    /// reserved on the budget.
    credit_out: usize,
    /// The decay window's books, if the cache decays.
    window: Option<Window>,
    /// Bytes being taken from the backing allocator now (with the lock
    /// released), counted against `max_bytes` until they are in the books.
    pending: usize,
    /// What this cache reported to its budget's hard limit.
    committed_on_budget: usize,
    /// Best fit: bytes of its free bytes reserved on the budget (the
    /// free-list policies reserve block by block as they list them).
    reserved_on_budget: usize,
    /// Best fit: the clock reading at which its free bytes last rose from
    /// zero, the age a budget sees.
    free_since: Option<u64>,
}

// SAFETY: the `NonNull`s on the free lists are blocks this cache owns
// exclusively (no user holds them while they are listed); moving the state to
// another thread moves that ownership with it, like a `Vec<Box<[u8]>>` would.
unsafe impl Send for State {}

impl State {
    /// `exact_blocks`: the cache has fronts, so best fit keeps every block
    /// its layout's length (`Arena::keeps_tail`).
    pub(super) fn new(config: &Config, exact_blocks: bool) -> Self {
        let backend = match Kind::of(config.policy) {
            Kind::Arena => Backend::Arena(Arena::new(config.reserves, exact_blocks)),
            Kind::Lists => Backend::Lists(Lists {
                lists: empty_free_lists(),
                index: config
                    .evicts()
                    .then(|| EvictionIndex::new(config.max_cached_bytes.is_some())),
            }),
        };
        Self {
            backend,
            stats: Stats::default(),
            clock: 0,
            caching_stopped: false,
            front_bytes: 0,
            front_blocks: 0,
            credit_out: 0,
            window: config.decay_window().map(Window::new),
            pending: 0,
            committed_on_budget: 0,
            reserved_on_budget: 0,
            free_since: None,
        }
    }

    // --- The counters.

    /// The shared side's counters as they stand.
    #[inline]
    pub(super) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The counters, to be moved by one of `Stats`'s `on_*` methods.
    #[inline]
    pub(super) fn count(&mut self) -> &mut Stats {
        &mut self.stats
    }

    /// The counters as `stats()` reports them (best fit's pinned bytes
    /// included), fronts not yet added.
    pub(super) fn report(&self) -> Stats {
        let mut stats = self.stats;
        if let Backend::Arena(arena) = &self.backend {
            stats.bytes_pinned = arena.pinned();
        }
        stats
    }

    /// A report that added the fronts' counters reached these peaks: once
    /// reported, they stay.
    pub(super) fn keep_peaks(&mut self, reported: &Stats) {
        self.stats.keep_peaks(reported);
    }

    // --- Limits.

    /// What counts against a hard limit: the bytes held, best fit's
    /// decommitted pages (they come back without asking), and the bytes
    /// being taken.
    pub(super) fn committed(&self) -> usize {
        self.stats.bytes_reserved + self.stats.bytes_decommitted + self.pending
    }

    /// How many more bytes may be committed under `max`.
    pub(super) fn room(&self, max: Option<usize>) -> usize {
        max.map_or(usize::MAX, |max| max.saturating_sub(self.committed()))
    }

    /// `bytes` are being taken from the backing allocator, the lock
    /// released: they count against the limit meanwhile.
    pub(super) fn begin_pending(&mut self, bytes: usize) {
        self.pending += bytes;
    }

    /// The `bytes` of `begin_pending` are in the books now (or failed).
    pub(super) fn end_pending(&mut self, bytes: usize) {
        self.pending -= bytes;
    }

    pub(super) fn caching_stopped(&self) -> bool {
        self.caching_stopped
    }

    pub(super) fn stop_caching(&mut self) {
        self.caching_stopped = true;
    }

    // --- The budget's books.

    /// `bytes` were committed on the budget's hard limit for this cache.
    pub(super) fn committed_on_budget(&mut self, bytes: usize) {
        self.committed_on_budget += bytes;
    }

    /// Brings what the budget's hard limit counts for this cache to what it
    /// holds: `(surplus, shortfall)`, for the caller to settle with the
    /// budget once the lock is released.
    pub(super) fn settle_committed_on_budget(&mut self) -> (usize, usize) {
        let held = self.committed();
        let reported = mem::replace(&mut self.committed_on_budget, held);
        (reported.saturating_sub(held), held.saturating_sub(reported))
    }

    /// Everything this cache counted on the budget's hard limit (it drops).
    pub(super) fn take_committed_on_budget(&mut self) -> usize {
        mem::take(&mut self.committed_on_budget)
    }

    /// Best fit: compares the bytes reserved on the budget with the free
    /// bytes; a surplus leaves the books here.
    pub(super) fn reconcile(&mut self) -> Reconcile {
        let cached = self.stats.bytes_cached;
        if cached <= self.reserved_on_budget {
            let surplus = self.reserved_on_budget - cached;
            self.reserved_on_budget = cached;
            Reconcile::Surplus(surplus)
        } else {
            Reconcile::Shortfall(cached - self.reserved_on_budget)
        }
    }

    /// Best fit: what the budget holds beyond the free bytes leaves the
    /// books; the bytes, for the caller to give back.
    pub(super) fn take_budget_surplus(&mut self) -> usize {
        match self.reconcile() {
            Reconcile::Surplus(surplus) => surplus,
            Reconcile::Shortfall(_) => 0,
        }
    }

    /// Best fit: `bytes` more were reserved (or forced) on the budget.
    pub(super) fn reserved_on_budget(&mut self, bytes: usize) {
        self.reserved_on_budget += bytes;
    }

    /// Best fit: what is reserved on the budget now.
    pub(super) fn reserved(&self) -> usize {
        self.reserved_on_budget
    }

    /// Best fit: everything reserved on the budget, off the books (the
    /// cache drops).
    pub(super) fn take_reserved_on_budget(&mut self) -> usize {
        mem::take(&mut self.reserved_on_budget)
    }

    // --- Ages and the decay window.

    /// The next reading of the clock blocks are aged by: the budget's (one
    /// clock for all its members, so their ages compare) or the cache's own.
    pub(super) fn next_age(&mut self, budget: Option<&Budget>) -> u64 {
        match budget {
            Some(budget) => budget.tick(),
            None => {
                self.clock += 1;
                self.clock
            }
        }
    }

    /// The age a budget sees: the oldest free block of the lists; best
    /// fit's free bytes' age if any of them can be shed.
    pub(super) fn oldest(&self) -> Option<u64> {
        match &self.backend {
            Backend::Lists(lists) => lists.oldest_age(),
            Backend::Arena(arena) if self.stats.bytes_cached > arena.pinned() => self.free_since,
            Backend::Arena(_) => None,
        }
    }

    /// The free bytes fell (a reuse): the decay window's low-water mark.
    #[inline]
    pub(super) fn note_reuse(&mut self) {
        if let Some(window) = &mut self.window {
            window.note(self.stats.bytes_cached);
        }
    }

    /// The decay window's length, if the cache decays.
    pub(super) fn window_length(&self) -> Option<u64> {
        self.window.as_ref().map(|window| window.length)
    }

    /// Closes the decay window: the free bytes that stayed free all of it.
    pub(super) fn close_window(&mut self) -> usize {
        let cached = self.stats.bytes_cached;
        let Some(window) = &mut self.window else {
            return 0;
        };
        let unused = window.close(cached);
        self.stats.on_decay();
        unused
    }

    /// What is free now ages from now (after a decay drained the fronts
    /// and gave back): the next window's low-water mark starts here, and
    /// best fit's fixed segments count frees from here on as the next
    /// window's (the blocks the drain just freed into them were in use in
    /// the window that closed).
    pub(super) fn restart_window(&mut self) {
        let cached = self.stats.bytes_cached;
        if let Some(window) = &mut self.window {
            window.low_water = cached;
        }
        if let Backend::Arena(arena) = &mut self.backend {
            // It merges the quick lists: the free ranges' tables allocate.
            let _inside = reentry::inside();
            arena.next_window();
        }
    }

    // --- The fronts' books.

    /// Adds a slot's counters to the stats (see `front::Deltas`).
    pub(super) fn fold(&mut self, deltas: &Deltas) {
        self.stats.fold(deltas, self.front_bytes);
        self.front_bytes = add(self.front_bytes, deltas.front_bytes());
        self.front_blocks = add(self.front_blocks, deltas.front_blocks());
    }

    /// The fronts' bytes and blocks as of the counters folded.
    pub(super) fn front_books(&self) -> (usize, usize) {
        (self.front_bytes, self.front_blocks)
    }

    /// A block of `size` bytes left a per-CPU front for the shared side
    /// (it leaves the front's books before it joins the shared ones, so no
    /// moment counts it twice).
    pub(super) fn left_front(&mut self, size: usize) {
        self.front_bytes = self.front_bytes.wrapping_sub(size);
        self.front_blocks = self.front_blocks.wrapping_sub(1);
    }

    /// The credit granted to fronts.
    pub(super) fn credit_out(&self) -> usize {
        self.credit_out
    }

    /// `bytes` of credit granted to a front.
    pub(super) fn grant_credit(&mut self, bytes: usize) {
        self.credit_out += bytes;
    }

    /// `bytes` of credit came back from a front.
    pub(super) fn return_credit(&mut self, bytes: usize) {
        self.credit_out -= bytes;
    }

    /// Lists one block that came back from a front; false if it must go
    /// back to the backing allocator instead (evicted, caching stopped, or
    /// the lists could not grow: counted so here).
    pub(super) fn relist(
        &mut self,
        key: Key,
        block: NonNull<u8>,
        evict: bool,
        budget: Option<&Budget>,
    ) -> bool {
        match &mut self.backend {
            Backend::Arena(arena) => {
                // A carved block has no backing allocation of its own: it
                // always goes back into the arena.
                let _inside = reentry::inside();
                let len = arena.uncarve(block.as_ptr().addr(), key.size());
                // With front caches every block is its key's length
                // (`Arena::keeps_tail`): nothing to correct.
                debug_assert_eq!(len, key.size());
                true
            }
            Backend::Lists(_) => {
                // Ages are unique on the budget's one clock, or on the
                // cache's own (an eviction needs no budget tick).
                let age = self.next_age(budget.filter(|_| !evict));
                if evict || self.caching_stopped || self.push(key, block, age).is_err() {
                    self.stats.on_front_block_given_back(key.size());
                    return false;
                }
                self.stats.on_moved_from_front(key.size());
                true
            }
        }
    }

    // --- The free lists (nothing to find in best fit's arena).

    /// Takes the most recently cached block of `key`, if any.
    #[inline]
    pub(super) fn pop(&mut self, key: Key) -> Option<NonNull<u8>> {
        let Backend::Lists(lists) = &mut self.backend else {
            return None;
        };
        let cached = lists.lists.get_mut(&key)?.pop()?;
        if let Some(index) = &mut lists.index {
            index.remove(cached.age, cached.priority);
        }
        Some(cached.block)
    }

    /// Lists `block` under `key`, aged `age`. Fails if the bookkeeping
    /// cannot grow (or the cache has no lists); the caller then gives the
    /// block back to the backing allocator.
    #[inline]
    pub(super) fn push(&mut self, key: Key, block: NonNull<u8>, age: u64) -> Result<(), ()> {
        let Backend::Lists(lists) = &mut self.backend else {
            return Err(());
        };
        let cached = Cached {
            block,
            age,
            priority: lists.index.as_ref().map_or(0, |index| index.priority(key)),
        };
        lists.lists.try_reserve(1).map_err(|_| ())?;
        let list = lists
            .lists
            .entry(key)
            .or_insert_with(|| Vec::new_in(Bookkeeping));
        list.try_reserve(1).map_err(|_| ())?;
        list.push(cached);
        if let Some(index) = &mut lists.index {
            index.insert(key, cached.age, cached.priority);
        }
        Ok(())
    }

    /// Takes the cached block `victim` picks off its list, counts it
    /// evicted, and returns it. Without an index (no cap, no budget: a
    /// `trim`), the oldest, found by scanning the lists' fronts.
    pub(super) fn evict(&mut self, victim: Victim) -> Option<Evicted> {
        let Backend::Lists(lists) = &mut self.backend else {
            return None;
        };
        let (key, age) = match &mut lists.index {
            Some(index) => index.pick(victim)?,
            None => lists
                .lists
                .iter()
                .filter_map(|(&key, list)| list.first().map(|cached| (key, cached.age)))
                .min_by_key(|&(_, age)| age)?,
        };
        let list = lists.lists.get_mut(&key)?;
        // Ages grow along a list (they are taken under the lock), so the
        // victim is usually at the front.
        let position = list.iter().position(|cached| cached.age == age)?;
        let cached = list.remove(position);
        if let Some(index) = &mut lists.index {
            index.remove(cached.age, cached.priority);
        }
        self.stats.on_evict(key.size());
        Some(Evicted {
            key,
            block: cached.block,
        })
    }

    /// Takes every list out at once, counted as a release (`release_cached`).
    pub(super) fn release_lists(&mut self) -> Released {
        let Backend::Lists(lists) = &mut self.backend else {
            return Released {
                lists: empty_free_lists(),
                index: None,
                bytes: 0,
            };
        };
        let taken = mem::replace(&mut lists.lists, empty_free_lists());
        let index = lists.index.as_mut().map(EvictionIndex::take);
        let (blocks, bytes) = (self.stats.blocks_cached, self.stats.bytes_cached);
        self.stats.on_release(blocks, bytes);
        Released {
            lists: taken,
            index,
            bytes,
        }
    }

    // --- Best fit's arena.

    /// Best fit's arena. A carving path asks for it only after the cache's
    /// one dispatch sent it there (`Kind::Arena`), and the backend never
    /// changes after `new`.
    pub(super) fn arena(&mut self) -> &mut Arena {
        match &mut self.backend {
            Backend::Arena(arena) => arena,
            Backend::Lists(_) => unreachable!("only a best-fit cache carves (Kind::Arena)"),
        }
    }

    /// Copies the arena's memory into the stats, and ages its free bytes:
    /// they are as old as the moment they last rose from zero, however they
    /// came (a free, a shrink in place, a gap left by an aligned carve), so
    /// a budget can always find them. The free lists keep their counters
    /// block by block: nothing to copy.
    pub(super) fn sync_held(&mut self, budget: Option<&Budget>) {
        let Backend::Arena(arena) = &self.backend else {
            return;
        };
        let held = arena.held();
        self.stats.set_held(held);
        if held.cached == 0 {
            self.free_since = None;
        } else if self.free_since.is_none() {
            self.free_since = Some(self.next_age(budget));
        }
    }

    /// The segments and pieces a snapshot shows of the shared side, and
    /// best fit's bytes beyond each live block's request (see
    /// `snapshot.rs`). The free-list policies: each cached block is a
    /// segment of its own.
    pub(super) fn layout(&self) -> ShownLayout {
        match &self.backend {
            Backend::Arena(arena) => {
                let (segments, pieces) = arena.books();
                (segments, pieces, arena.extras())
            }
            Backend::Lists(lists) => {
                let mut segments = std::vec::Vec::new();
                let mut pieces = std::vec::Vec::new();
                for (key, list) in &lists.lists {
                    for cached in list {
                        let address = cached.block.as_ptr().addr();
                        segments.push((address, key.size(), SegmentKind::Block));
                        pieces.push(Piece {
                            address,
                            size: key.size(),
                            state: BlockState::Free,
                        });
                    }
                }
                (segments, pieces, BTreeMap::new())
            }
        }
    }
}

impl Lists {
    /// The age of the oldest cached block.
    fn oldest_age(&self) -> Option<u64> {
        match &self.index {
            Some(index) => index.oldest_age(),
            None => self
                .lists
                .values()
                .filter_map(|list| list.first())
                .map(|cached| cached.age)
                .min(),
        }
    }
}

//! The state behind the lock: free lists, counters, eviction, and every call
//! to the backing allocator.
//!
//! Locking discipline: the lock is held only while free lists and counters
//! change. The backing allocator is always called with the lock released, so a
//! backing allocator that allocates (or frees into this very cache) cannot
//! deadlock, and a slow `malloc`/`munmap` does not stall other threads' hits.
//! A shared [`Budget`] is only ever called with no cache lock held.
//!
//! Panics: a backing `deallocate` that panics is caught, the operation
//! finishes with consistent books, and the panic is resumed (see `unwind.rs`).
//!
//! `SizePolicy::BestFit` keeps no free lists: its operations are in
//! `cache/carving.rs`, over the arena of `best_fit.rs`.

mod carving;
mod fronts;

use core::alloc::Layout;
use core::mem;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};
use allocator_api2::vec::Vec;
use foldhash::fast::FixedState;
use hashbrown::HashMap;

use crate::alloc::{RawAllocator, dangling};
use crate::best_fit::Arena;
use crate::budget::{Budget, Member};
use crate::decay::{Clock, DEFAULT_RELEASE_AFTER, Window};
use crate::eviction::{EvictionIndex, Victim};
use crate::front::Fronts;
use crate::history::{Action, History};
use crate::per_cpu::{self, PerCpu};
use crate::poison;
use crate::policy::{Key, SizePolicy};
use crate::reentry::{self, Bookkeeping};
use crate::stats::Stats;
use crate::sync::{AtomicU32, AtomicU64, Mutex};
use crate::unwind::Deferred;
use core::sync::atomic::Ordering;
use core::time::Duration;

/// A best-fit cache's per-thread fronts where it has no per-CPU ones: small,
/// since a block in a front does not merge with its neighbours (measured in
/// the replay's `cache-bestfit-front` row).
pub(crate) const BEST_FIT_FRONT_BYTES: usize = 1 << 20;

/// How a cache decides what to keep: set once by the `Builder`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Config {
    pub(crate) policy: SizePolicy,
    pub(crate) max_cached_bytes: Option<usize>,
    pub(crate) budget: Option<Budget>,
    pub(crate) stop_caching_after_failure: bool,
    /// Best fit: take segments from a reserved address range the cache owns
    /// (set by `Builder::build`, whose backing is the global allocator), not
    /// from the backing allocator.
    pub(crate) reserves: bool,
    /// The limit of each thread's front cache in bytes, 0 for none; `None`,
    /// the default: per-CPU fronts for best fit (per-thread ones of
    /// [`BEST_FIT_FRONT_BYTES`] where the system has no restartable
    /// sequences), none for the other policies (c10's semantics).
    pub(crate) front_cache_bytes: Option<usize>,
    /// Per-thread fronts even where per-CPU ones are available.
    pub(crate) per_thread_fronts: bool,
    /// The most the cache may hold, live and cached (`bytes_reserved`, and
    /// best fit's decommitted pages, which come back without asking).
    pub(crate) max_bytes: Option<usize>,
    /// Free memory unused for this long goes back; `None`: the policy's
    /// default (best fit: `DEFAULT_RELEASE_AFTER`; the others: never);
    /// `Duration::MAX`: never.
    pub(crate) release_after: Option<Duration>,
    /// The clock decay reads.
    pub(crate) clock: Clock,
    /// Record a history of this many events (`None`: no history).
    pub(crate) history: Option<usize>,
    /// Return addresses kept with each event (`Builder::record_frames`).
    pub(crate) frames: usize,
}

impl Config {
    /// Whether blocks are ever evicted one by one: then an eviction index is
    /// kept so the victim is found in `O(log n)`.
    fn evicts(&self) -> bool {
        self.max_cached_bytes.is_some() || self.budget.is_some()
    }

    /// The decay window, if this cache decays.
    pub(crate) fn decay_window(&self) -> Option<Duration> {
        match self.release_after {
            Some(Duration::MAX) => None,
            Some(window) => Some(window),
            None if self.policy == SizePolicy::BestFit => Some(DEFAULT_RELEASE_AFTER),
            None => None,
        }
    }

    /// The fronts this config asks for: `None` without any; per CPU for
    /// best fit where the system has them; else per thread, with each
    /// thread's front limited to the setting. Not per thread for best fit
    /// with a cap or a budget: its shed and the budget's reconciling count
    /// the arena's free bytes, which a front's credit would have to join
    /// (per-CPU fronts hold no credit: their blocks count as in use, see
    /// `per_cpu.rs`).
    fn fronts(&self) -> Option<Fronts> {
        let limit = match self.front_cache_bytes {
            Some(limit) => limit,
            None if self.policy == SizePolicy::BestFit => BEST_FIT_FRONT_BYTES,
            None => 0,
        };
        if limit == 0 {
            return None;
        }
        let best_fit = self.policy == SizePolicy::BestFit;
        if best_fit
            && !self.per_thread_fronts
            && let Some(per_cpu) = PerCpu::new()
        {
            return Some(Fronts::new(limit, false, Some(per_cpu)));
        }
        (!(best_fit && self.evicts())).then(|| Fronts::new(limit, self.evicts(), None))
    }
}

/// A cached block, its age (a clock reading taken when it was listed) and its
/// GreedyDual-Size priority (see `eviction.rs`).
#[derive(Clone, Copy)]
struct Cached {
    block: NonNull<u8>,
    age: u64,
    priority: u64,
}

/// Cached blocks of one key, oldest first. Hits take the last (most recently
/// freed: its cache lines and pages are the warmest); evictions the first.
type FreeList = Vec<Cached, Bookkeeping>;

/// A fixed-seed hasher: no lazy random seed, and cheap on two-word keys.
type FreeLists = HashMap<Key, FreeList, FixedState, Bookkeeping>;

/// A cache over a backing allocator `A`; shared by all handles through an `Arc`.
pub(crate) struct Cache<A: Allocator> {
    state: Mutex<State>,
    /// Each thread's front cache of this cache, if it has them.
    fronts: Option<Fronts>,
    /// When the decay window closes (the clock's nanoseconds; `u64::MAX`:
    /// no decay): read on slow paths without the lock.
    decay_deadline: AtomicU64,
    /// Slow-path calls since the clock was last read (counted without a
    /// read-modify-write: a lost count only delays a look).
    decay_calls: AtomicU32,
    /// The history of events, if recorded.
    history: Option<History>,
    config: Config,
    backing: A,
}

struct State {
    free_lists: FreeLists,
    /// Every cached block by age (and priority), when the cache evicts (a
    /// cap or a budget is set).
    index: Option<EvictionIndex>,
    /// The clock of a cache without a budget (a budget has one for all).
    clock: u64,
    /// Set after an allocation failed even after release and retry, if the
    /// config says to stop caching then.
    caching_stopped: bool,
    stats: Stats,
    /// Best fit's segments and free ranges (`SizePolicy::BestFit` only; the
    /// free lists stay empty then).
    arena: Option<Arena>,
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
}

// SAFETY: the `NonNull`s on the free lists are blocks this cache owns
// exclusively (no user holds them while they are listed); moving the state to
// another thread moves that ownership with it, like a `Vec<Box<[u8]>>` would.
unsafe impl Send for State {}

impl State {
    /// `exact_blocks`: the cache has fronts, so best fit keeps every block
    /// its layout's length (`Arena::keeps_tail`).
    fn new(config: &Config, exact_blocks: bool) -> Self {
        Self {
            free_lists: empty_free_lists(),
            index: config
                .evicts()
                .then(|| EvictionIndex::new(config.max_cached_bytes.is_some())),
            clock: 0,
            caching_stopped: false,
            stats: Stats::default(),
            arena: (config.policy == SizePolicy::BestFit)
                .then(|| Arena::new(config.reserves, exact_blocks)),
            front_bytes: 0,
            front_blocks: 0,
            credit_out: 0,
            window: config.decay_window().map(Window::new),
            pending: 0,
            committed_on_budget: 0,
        }
    }

    /// What counts against a hard limit: the bytes held, best fit's
    /// decommitted pages (they come back without asking), and the bytes
    /// being taken.
    fn committed(&self) -> usize {
        self.stats.bytes_reserved + self.stats.bytes_decommitted + self.pending
    }

    /// How many more bytes may be committed under `max`.
    fn room(&self, max: Option<usize>) -> usize {
        max.map_or(usize::MAX, |max| max.saturating_sub(self.committed()))
    }

    /// The free bytes fell (a reuse): the decay window's low-water mark.
    #[inline]
    fn note_reuse(&mut self) {
        if let Some(window) = &mut self.window {
            window.note(self.stats.bytes_cached);
        }
    }

    /// The next reading of the clock blocks are aged by: the budget's (one
    /// clock for all its members, so their ages compare) or the cache's own.
    fn next_age(&mut self, budget: Option<&Budget>) -> u64 {
        match budget {
            Some(budget) => budget.tick(),
            None => {
                self.clock += 1;
                self.clock
            }
        }
    }

    /// Takes the most recently cached block of `key`, if any.
    #[inline]
    fn pop(&mut self, key: Key) -> Option<NonNull<u8>> {
        let cached = self.free_lists.get_mut(&key)?.pop()?;
        if let Some(index) = &mut self.index {
            index.remove(cached.age, cached.priority);
        }
        Some(cached.block)
    }

    /// A block of `key` freed now: its age and priority.
    #[inline]
    fn stamp(&self, key: Key, block: NonNull<u8>, age: u64) -> Cached {
        Cached {
            block,
            age,
            priority: self.index.as_ref().map_or(0, |index| index.priority(key)),
        }
    }

    /// Lists `block` under `key`. Fails only if the bookkeeping cannot grow;
    /// the caller then gives the block back to the backing allocator.
    #[inline]
    fn push(&mut self, key: Key, cached: Cached) -> Result<(), ()> {
        self.free_lists.try_reserve(1).map_err(|_| ())?;
        let list = self
            .free_lists
            .entry(key)
            .or_insert_with(|| Vec::new_in(Bookkeeping));
        list.try_reserve(1).map_err(|_| ())?;
        list.push(cached);
        if let Some(index) = &mut self.index {
            index.insert(key, cached.age, cached.priority);
        }
        Ok(())
    }

    /// Takes the cached block `victim` picks off its list, counts it
    /// evicted, and returns it. Without an index (no cap, no budget: a
    /// `trim`), the oldest, found by scanning the lists' fronts.
    fn evict(&mut self, victim: Victim) -> Option<(Key, NonNull<u8>)> {
        let (key, age) = match &mut self.index {
            Some(index) => index.pick(victim)?,
            None => self
                .free_lists
                .iter()
                .filter_map(|(&key, list)| list.first().map(|cached| (key, cached.age)))
                .min_by_key(|&(_, age)| age)?,
        };
        let list = self.free_lists.get_mut(&key)?;
        // Ages grow along a list (they are taken under the lock), so the
        // victim is usually at the front.
        let position = list.iter().position(|cached| cached.age == age)?;
        let cached = list.remove(position);
        if let Some(index) = &mut self.index {
            index.remove(cached.age, cached.priority);
        }
        self.stats.on_evict(key.size());
        Some((key, cached.block))
    }

    /// The age of the oldest cached block.
    fn oldest_age(&self) -> Option<u64> {
        match &self.index {
            Some(index) => index.oldest_age(),
            None => self
                .free_lists
                .values()
                .filter_map(|list| list.first())
                .map(|cached| cached.age)
                .min(),
        }
    }
}

fn empty_free_lists() -> FreeLists {
    HashMap::with_hasher_in(FixedState::default(), Bookkeeping)
}

impl<A: Allocator> Cache<A> {
    pub(crate) fn new(backing: A, config: Config) -> Self {
        let fronts = config.fronts();
        let decay_deadline = config.decay_window().map_or(u64::MAX, |window| {
            config
                .clock
                .now()
                .saturating_add(Window::new(window).length)
        });
        Self {
            state: Mutex::new(State::new(&config, fronts.is_some())),
            fronts,
            decay_deadline: AtomicU64::new(decay_deadline),
            decay_calls: AtomicU32::new(0),
            history: config
                .history
                .map(|entries| History::new(entries, config.frames)),
            config,
            backing,
        }
    }

    /// The history of events, if this cache records one.
    #[inline]
    pub(crate) fn history(&self) -> Option<&History> {
        self.history.as_ref()
    }

    /// Records an event if the cache keeps a history.
    #[inline]
    pub(crate) fn record(&self, action: Action, size: usize, address: usize) {
        if let Some(history) = &self.history {
            history.record(action, size, address);
        }
    }

    /// Runs decay if the window closed: a clock read, on slow paths only.
    #[inline]
    fn decay_if_due(&self) {
        let deadline = self.decay_deadline.load(Ordering::Relaxed);
        if deadline == u64::MAX {
            return;
        }
        if self.config.clock.is_system() {
            // The clock read is most of a slow path's cost of decay: once
            // in `CHECK_EVERY` calls.
            let calls = self.decay_calls.load(Ordering::Relaxed) + 1;
            if calls < crate::decay::CHECK_EVERY {
                self.decay_calls.store(calls, Ordering::Relaxed);
                return;
            }
            self.decay_calls.store(0, Ordering::Relaxed);
        }
        self.decay_if_past(deadline);
    }

    /// Runs decay if the clock reads past `deadline`.
    #[cold]
    #[inline(never)]
    fn decay_if_past(&self, deadline: u64) {
        if self.config.clock.now() >= deadline {
            self.decay();
        }
    }

    /// Closes the decay window if it is over: what stayed free all of it
    /// goes back (oldest first, as a trim), and the fronts are drained so
    /// that their blocks age in the shared cache. Returns the bytes given
    /// back.
    pub(crate) fn decay(&self) -> usize {
        let deadline = self.decay_deadline.load(Ordering::Acquire);
        let now = self.config.clock.now();
        if deadline == u64::MAX || now < deadline {
            return 0;
        }
        let unused = {
            let mut state = self.state.lock();
            let cached = state.stats.bytes_cached;
            let Some(window) = &mut state.window else {
                return 0;
            };
            // One thread closes a window: whoever moves the deadline.
            let next = now.saturating_add(window.length);
            if self
                .decay_deadline
                .compare_exchange(deadline, next, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return 0;
            }
            let unused = window.close(cached);
            state.stats.decays += 1;
            unused
        };

        let mut panics = Deferred::new();
        let _ = self.drain_fronts(fronts::Drain::Live, &mut panics);
        let decayed = if unused == 0 {
            0
        } else {
            let cached = self.state.lock().stats.bytes_cached;
            let target = cached.saturating_sub(unused);
            if self.carves() {
                self.trim_or_release(target, carving::Count::Decay, &mut panics)
            } else {
                self.trim_lists(target, true, &mut panics)
            }
        };
        // What the fronts brought back ages from now.
        {
            let mut state = self.state.lock();
            let cached = state.stats.bytes_cached;
            if let Some(window) = &mut state.window {
                window.low_water = cached;
            }
        }
        self.sync_budget();
        if decayed > 0 {
            self.record(Action::Decay, decayed, 0);
        }
        panics.resume();
        decayed
    }

    pub(crate) fn backing(&self) -> &A {
        &self.backing
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn stats(&self) -> Stats {
        if let Some(fronts) = &self.fronts {
            return self.stats_with_fronts(fronts);
        }
        let state = self.state.lock();
        let mut stats = state.stats;
        if let Some(arena) = &state.arena {
            stats.bytes_pinned = arena.pinned();
        }
        stats
    }

    pub(crate) fn front_kind(&self) -> crate::FrontKind {
        match &self.fronts {
            None => crate::FrontKind::None,
            Some(fronts) if fronts.per_cpu().is_some() => crate::FrontKind::PerCpu,
            Some(_) => crate::FrontKind::PerThread,
        }
    }

    /// Every segment and block, the stats and the history, at one instant
    /// (see `snapshot.rs`).
    pub(crate) fn snapshot(&self) -> crate::Snapshot {
        use crate::snapshot::{BlockState, Piece, SegmentKind};
        let _inside = reentry::inside();
        let stats = self.stats();
        let mut extras = std::collections::BTreeMap::new();
        let (mut segments, mut pieces) = {
            let state = self.state.lock();
            match &state.arena {
                Some(arena) => {
                    extras = arena.extras();
                    arena.books()
                }
                None => {
                    // The free-list policies: each cached block is a segment
                    // of its own.
                    let mut segments = std::vec::Vec::new();
                    let mut pieces = std::vec::Vec::new();
                    for (key, list) in &state.free_lists {
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
                    (segments, pieces)
                }
            }
        };
        if let Some(per_cpu) = self.per_cpu() {
            per_cpu.for_each_block(|cpu, key, address| {
                let piece = Piece {
                    address,
                    size: key.size(),
                    state: BlockState::Front(Some(cpu)),
                };
                if self.carves() {
                    pieces.push(piece);
                } else {
                    segments.push((address, key.size(), SegmentKind::Block));
                    pieces.push(piece);
                }
            });
        }
        let ((history, stacks), recorded) = self.history.as_ref().map_or(
            ((std::vec::Vec::new(), std::vec::Vec::new()), 0),
            |history| (history.events(), history.recorded()),
        );
        let frames = crate::frames::resolve(&stacks, self.config.frames);
        if !self.carves() {
            // Blocks in use of the free-list policies: the history's.
            let live = crate::snapshot::live_blocks(&history);
            for (&address, &size) in &live {
                if let Some(key) =
                    self.key(Layout::from_size_align(size, 1).unwrap_or(Layout::new::<u8>()))
                {
                    segments.push((address, key.size(), SegmentKind::Block));
                }
            }
        }
        segments.sort_unstable_by_key(|&(address, ..)| address);
        crate::Snapshot::assemble(stats, segments, pieces, &extras, history, frames, recorded)
    }

    pub(crate) fn is_caching_stopped(&self) -> bool {
        self.state.lock().caching_stopped
    }

    /// Whether the cache carves blocks out of segments (`BestFit`).
    #[inline]
    fn carves(&self) -> bool {
        self.config.policy == SizePolicy::BestFit
    }

    #[inline]
    fn key(&self, layout: Layout) -> Option<Key> {
        Key::for_layout(layout, self.config.policy)
    }

    /// The budget, if it holds its members to a hard limit.
    fn limiting_budget(&self) -> Option<&Budget> {
        self.config
            .budget
            .as_ref()
            .filter(|budget| budget.max_bytes().is_some())
    }

    /// Counts `bytes` the cache is about to commit against its budget's
    /// hard limit (which may evict other members' free memory first);
    /// `false` if they do not fit. With the lock released.
    fn precommit(&self, bytes: usize) -> bool {
        let Some(budget) = self.limiting_budget() else {
            return true;
        };
        if !budget.try_commit(bytes) {
            return false;
        }
        self.state.lock().committed_on_budget += bytes;
        true
    }

    /// Brings what the budget's hard limit counts for this cache to what it
    /// holds: after a shrink (or a precommit larger than the growth).
    fn sync_budget(&self) {
        let Some(budget) = self.limiting_budget() else {
            return;
        };
        let (surplus, shortfall) = {
            let mut state = self.state.lock();
            let held = state.committed();
            let reported = state.committed_on_budget;
            state.committed_on_budget = held;
            (reported.saturating_sub(held), held.saturating_sub(reported))
        };
        budget.uncommit(surplus);
        budget.force_commit(shortfall);
    }

    /// Counts `bytes` about to be taken from the backing allocator against
    /// the hard limits (the cache's and its budget's); if they do not fit,
    /// this cache's free memory goes back first (its fronts' too) and they
    /// are tried once more. `false`: they do not fit even then (counted in
    /// `limit_failures`).
    fn take_room(&self, bytes: usize) -> bool {
        let max = self.config.max_bytes;
        if max.is_none() && self.limiting_budget().is_none() {
            return true;
        }
        let fits = || {
            if !self.precommit(bytes) {
                return false;
            }
            let mut state = self.state.lock();
            let fits = state.room(max) >= bytes;
            if fits {
                state.pending += bytes;
            }
            drop(state);
            if !fits {
                self.sync_budget();
            }
            fits
        };
        if fits() {
            return true;
        }
        self.release_cached();
        if fits() {
            return true;
        }
        self.state.lock().stats.limit_failures += 1;
        self.record(Action::LimitFailure, bytes, 0);
        false
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
        let taken = self.allocate_from_backing(key, zeroed);
        let limited = self.config.max_bytes.is_some() || self.limiting_budget().is_some();
        let mut state = self.state.lock();
        if limited {
            state.pending -= size;
        }
        if taken.is_ok() {
            // In the books in the same breath as it leaves `pending`.
            state.stats.on_miss(requested, size);
        }
        if let Ok(block) = &taken {
            self.record(Action::SegmentAlloc, size, block.as_ptr().addr());
        }
        drop(state);
        if taken.is_err() {
            self.sync_budget();
        }
        taken
    }

    fn allocate_from_backing(&self, key: Key, zeroed: bool) -> Result<NonNull<u8>, AllocError> {
        self.backing_allocate_or_retry(key.block_layout(), zeroed)
            .map(NonNull::cast)
    }

    /// `layout` from the backing allocator; if that fails, the cache is
    /// released and it is tried once more (c10's out-of-memory path). A
    /// second failure is counted, and stops caching if the config says so.
    pub(crate) fn backing_allocate_or_retry(
        &self,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        let attempt = || reentry::allocate_from(&self.backing, layout, zeroed);
        if let Ok(block) = attempt() {
            return Ok(block);
        }
        self.state.lock().stats.retries += 1;
        self.release_cached();
        attempt().inspect_err(|_| {
            let mut state = self.state.lock();
            state.stats.failures += 1;
            if self.config.stop_caching_after_failure {
                state.caching_stopped = true;
                if let Some(fronts) = &self.fronts {
                    fronts.stop();
                }
            }
        })
    }

    /// Frees a block in use straight to the backing allocator.
    ///
    /// # Safety
    ///
    /// `block` is a live block of this cache for a request of `requested`
    /// bytes under `key`, unused from now on.
    unsafe fn give_back(&self, block: NonNull<u8>, key: Key, requested: usize) {
        self.state
            .lock()
            .stats
            .on_free_uncached(requested, key.size());
        // SAFETY: the caller's contract: the block is ours and was taken with
        // `key`'s layout.
        unsafe { self.backing_deallocate(block, key) };
    }

    /// # Safety
    ///
    /// `block` was taken from the backing allocator with `key`'s layout, is
    /// owned by this cache alone, and is not listed.
    unsafe fn backing_deallocate(&self, block: NonNull<u8>, key: Key) {
        self.record(Action::SegmentFree, key.size(), block.as_ptr().addr());
        poison::unpoison(block, key.size());
        let _inside = reentry::inside();
        // SAFETY: the caller's contract.
        unsafe { self.backing.deallocate(block, key.block_layout()) };
    }

    fn unreserve(&self, bytes: usize) {
        if let Some(budget) = &self.config.budget {
            budget.unreserve(bytes);
        }
    }

    /// Gives every cached block back to the backing allocator; returns the
    /// bytes given back. A panicking backing `deallocate` does not stop it:
    /// every block is handed back, then the first panic is resumed.
    pub(crate) fn release_cached(&self) -> usize {
        let mut panics = Deferred::new();
        let _ = self.drain_fronts(fronts::Drain::Live, &mut panics);
        let bytes = if self.carves() {
            self.release_carved(&mut panics)
        } else {
            self.release_into(&mut panics)
        };
        self.sync_budget();
        panics.resume();
        bytes
    }

    /// `release_cached`, keeping a panic of the backing allocator in `panics`.
    fn release_into(&self, panics: &mut Deferred) -> usize {
        if self.carves() {
            return self.shed_carved(0, carving::Count::Release, panics);
        }
        let (lists, indexes, bytes) = {
            let mut state = self.state.lock();
            let lists = mem::replace(&mut state.free_lists, empty_free_lists());
            let index = state.index.as_mut().map(EvictionIndex::take);
            let (blocks, bytes) = (state.stats.blocks_cached, state.stats.bytes_cached);
            state.stats.on_release(blocks, bytes);
            (lists, index, bytes)
        };
        self.unreserve(bytes);
        // The blocks left the free lists under the lock, so no other thread
        // can hand them out; give them back without holding it.
        let _inside = reentry::inside();
        for (key, list) in lists {
            for cached in list {
                panics.catch(|| {
                    // SAFETY: every listed block was taken from the backing
                    // allocator with `key`'s layout, is owned by the cache
                    // alone, and is no longer listed, so it is given back once.
                    unsafe { self.backing_deallocate(cached.block, key) }
                });
            }
        }
        drop(indexes);
        bytes
    }

    /// Gives cached blocks back, oldest first, until at most `target_bytes`
    /// stay cached; returns the bytes given back.
    ///
    /// A panicking backing `deallocate` does not stop it: the trim goes on,
    /// then the first panic is resumed.
    pub(crate) fn trim(&self, target_bytes: usize) -> usize {
        let mut panics = Deferred::new();
        let _ = self.drain_fronts(fronts::Drain::Live, &mut panics);
        let trimmed = if self.carves() {
            self.trim_carved(target_bytes, &mut panics)
        } else {
            self.trim_lists(target_bytes, false, &mut panics)
        };
        self.sync_budget();
        panics.resume();
        trimmed
    }

    /// `trim` over the free lists; `decay`: counted as decay, not
    /// evictions.
    fn trim_lists(&self, target_bytes: usize, decay: bool, panics: &mut Deferred) -> usize {
        let mut trimmed = 0;
        loop {
            let evicted = {
                let mut state = self.state.lock();
                if state.stats.bytes_cached <= target_bytes {
                    break;
                }
                let evicted = state.evict(Victim::Oldest);
                if decay && let Some((key, _)) = evicted {
                    state.stats.evicted_by_decay(key.size());
                }
                evicted
            };
            let Some((key, block)) = evicted else {
                break;
            };
            self.unreserve(key.size());
            panics.catch(|| {
                // SAFETY: the block left the free lists under the lock: ours
                // alone, taken with its key's layout.
                unsafe { self.backing_deallocate(block, key) }
            });
            trimmed += key.size();
        }
        trimmed
    }
}

// SAFETY: the free lists never hold a live block (a block is listed only
// when freed and unlisted before it is handed out, both under the lock); a
// block is taken with its key's layout, which holds at least the request's
// size at at least its alignment (`Key::for_layout`); a reused block is
// zeroed on request; `resize` copies and frees the old block only once the
// new one is taken.
unsafe impl<A: Allocator> RawAllocator for Cache<A> {
    /// A block for `layout`: a cached one of its key if any, else a new one.
    /// With `zeroed`, its first `layout.size()` bytes are zero.
    #[inline]
    fn allocate(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        // The per-CPU fronts' hit path alone here, so it needs no frame;
        // everything else is out of line.
        if let Some(per_cpu) = self.per_cpu()
            && layout.size() != 0
            && let Some(slot) = per_cpu::Slot::for_best_fit(layout)
            && let Some(block) = per_cpu.pop(slot)
        {
            return Ok(self.hit_from_cpu(block, slot, layout, zeroed));
        }
        self.allocate_slow(layout, zeroed)
    }

    /// Puts a block on its free list, or gives it back if it may not be
    /// cached (larger than the cap or the budget, or caching stopped).
    ///
    /// # Safety
    ///
    /// - `block` was returned by `allocate`/`grow`/`shrink` of this cache for
    ///   `layout` (same size, an alignment of the same class) and not freed
    ///   since;
    /// - nobody uses the block after this call.
    #[inline]
    unsafe fn deallocate(&self, block: NonNull<u8>, layout: Layout) {
        if let Some(per_cpu) = self.per_cpu()
            && layout.size() != 0
            && let Some(slot) = per_cpu::Slot::for_best_fit(layout)
            && let Some(owner) = self.front()
            && !self.fronts.as_ref().is_some_and(Fronts::is_stopped)
        {
            // Poisoned before it is kept: a drain may take it at any moment.
            poison::poison(block, slot.len());
            if per_cpu.push(slot, block) {
                owner.count_free(layout.size(), slot.len());
                return;
            }
        }
        // SAFETY: this function's contract.
        unsafe { self.deallocate_slow(block, layout) }
    }

    /// `resize` and its in-place test, and the slow paths of `deallocate`.
    unsafe fn resize(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: this function's contract.
        unsafe { self.resize_shared(block, old, new, zeroed) }
    }
}

impl<A: Allocator> Cache<A> {
    /// `allocate` past the per-CPU fronts' hit path: a request of zero
    /// bytes, a per-CPU miss, a per-thread front, the shared side.
    #[inline(never)]
    fn allocate_slow(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        if self.per_cpu().is_some() {
            if per_cpu::Slot::for_best_fit(layout).is_some() {
                return self.allocate_behind_cpu_front(layout, zeroed);
            }
            // Too large for a front: the arena, the thread's counters folded
            // under the same lock.
            let deltas = self.front().map(|owner| owner.take_counters());
            return self.allocate_carved_folding(layout, zeroed, deltas);
        }
        if let Some(slot) = self.front()
            && let Some(key) = self.key(layout)
        {
            let Some(block) = slot.pop(key, layout.size()) else {
                return self.allocate_behind_front(&slot, key, layout, zeroed);
            };
            poison::unpoison(block, key.size());
            if zeroed {
                // SAFETY: the block was just taken from this thread's front
                // cache, so nobody else references it, and it holds
                // `key.size() >= layout.size()` writable bytes.
                unsafe { ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
            }
            return Ok(NonNull::slice_from_raw_parts(block, layout.size()));
        }
        if self.carves() {
            return self.allocate_carved(layout, zeroed);
        }
        self.decay_if_due();
        let Some(key) = self.key(layout) else {
            self.state.lock().stats.failures += 1;
            return Err(AllocError);
        };
        let popped = {
            let mut state = self.state.lock();
            let popped = state.pop(key);
            if popped.is_some() {
                state.stats.on_hit(layout.size(), key.size());
                state.note_reuse();
            }
            popped
        };
        let block = match popped {
            Some(block) => {
                poison::unpoison(block, key.size());
                if let Some(budget) = &self.config.budget {
                    budget.unreserve(key.size());
                }
                if zeroed {
                    // SAFETY: the block was just taken off a free list, so
                    // nobody else references it, and it holds `key.size() >=
                    // layout.size()` writable bytes.
                    unsafe { ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
                }
                block
            }
            None => self.allocate_block(key, layout.size(), zeroed)?,
        };
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    /// `deallocate` past the per-CPU fronts' fast path.
    ///
    /// # Safety
    ///
    /// As for `deallocate`.
    #[inline(never)]
    unsafe fn deallocate_slow(&self, block: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        if let Some(per_cpu) = self.per_cpu() {
            if let Some(slot) = per_cpu::Slot::for_best_fit(layout) {
                // SAFETY: this function's contract.
                return unsafe { self.free_behind_cpu(per_cpu, slot, block, layout) };
            }
            let deltas = self.front().map(|owner| owner.take_counters());
            // SAFETY: this function's contract; too large for a front.
            return unsafe { self.deallocate_carved_folding(block, layout, deltas) };
        }
        if let Some(slot) = self.front()
            && let Some(key) = self.key(layout)
            && !self.fronts.as_ref().is_some_and(Fronts::is_stopped)
        {
            // Poisoned before it is kept: a drain may take it at any moment.
            poison::poison(block, key.size());
            if slot.push(key, block, layout.size()) {
                return;
            }
            // SAFETY: this function's contract.
            return unsafe { self.deallocate_behind_front(&slot, key, block, layout) };
        }
        // SAFETY: this function's contract.
        unsafe { self.deallocate_shared(block, layout) }
    }

    /// `deallocate` on the shared side: a free list, the arena, or the
    /// backing allocator.
    ///
    /// # Safety
    ///
    /// `RawAllocator::deallocate`'s contract.
    unsafe fn deallocate_shared(&self, block: NonNull<u8>, layout: Layout) {
        self.decay_if_due();
        if self.carves() {
            // SAFETY: this function's contract.
            return unsafe { self.deallocate_carved(block, layout) };
        }
        // SAFETY: this function's contract.
        unsafe { self.deallocate_listed(block, layout) };
        // A block given back, or evicted to make room: the budget's hard
        // limit learns it.
        self.sync_budget();
    }

    /// `deallocate_shared` for the free-list policies.
    ///
    /// # Safety
    ///
    /// `RawAllocator::deallocate`'s contract.
    unsafe fn deallocate_listed(&self, block: NonNull<u8>, layout: Layout) {
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
            return unsafe { self.give_back(block, key, requested) };
        }
        // The budget's share is reserved before the block is listed, so the
        // caches on it never hold more than it, not even for a moment; and
        // only for a block this cache will list, since reserving may evict
        // other caches' blocks.
        // A panic reached through the budget or a backing call: resumed once
        // the block is listed or given back.
        let mut panics = Deferred::new();
        if let Some(budget) = &self.config.budget
            && (self.state.lock().caching_stopped
                || panics.catch(|| budget.reserve(key.size())) != Some(true))
        {
            // SAFETY: this function's contract.
            unsafe { self.give_back(block, key, requested) };
            return panics.resume();
        }
        // Poisoned before it is listed: once listed, another thread may take
        // (and unpoison) it at any moment.
        poison::poison(block, key.size());
        let mut drains = 0;
        loop {
            let mut state = self.state.lock();
            if state.caching_stopped {
                drop(state);
                self.unreserve(key.size());
                // SAFETY: this function's contract.
                unsafe { self.give_back(block, key, requested) };
                return panics.resume();
            }
            if let Some(cap) = self.config.max_cached_bytes
                && state.stats.bytes_cached + state.credit_out + key.size() > cap
            {
                // Make room: the cheapest cached block goes back. One at a
                // time, with the lock released around the backing call.
                let evicted = state.evict(Victim::Cheapest);
                let credit_out = state.credit_out;
                drop(state);
                if evicted.is_none() {
                    // The fronts' credit is in the way: take it back (a
                    // drain returns it), at most twice.
                    if credit_out > 0 && drains < 2 {
                        drains += 1;
                        let _ = self.drain_fronts(fronts::Drain::Live, &mut panics);
                        continue;
                    }
                    self.unreserve(key.size());
                    // SAFETY: this function's contract.
                    unsafe { self.give_back(block, key, requested) };
                    return panics.resume();
                }
                if let Some((evicted_key, evicted_block)) = evicted {
                    self.unreserve(evicted_key.size());
                    // Caught: `block` is still to be listed.
                    panics.catch(|| {
                        // SAFETY: the block left the free lists under the
                        // lock, so it is ours alone; it was taken with its
                        // key's layout.
                        unsafe { self.backing_deallocate(evicted_block, evicted_key) }
                    });
                }
                continue;
            }
            let age = state.next_age(self.config.budget.as_ref());
            let cached = state.stamp(key, block, age);
            if state.push(key, cached).is_err() {
                drop(state);
                self.unreserve(key.size());
                // SAFETY: this function's contract.
                unsafe { self.give_back(block, key, requested) };
                return panics.resume();
            }
            state.stats.on_free(requested, key.size());
            drop(state);
            return panics.resume();
        }
    }

    /// `grow` and `shrink`: in place when both layouts map to the same free
    /// list, else through a block of the new key (cached if one is), copying.
    ///
    /// # Safety
    ///
    /// `block` is live and was handed out by this cache for `old`.
    unsafe fn resize_shared(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if self.carves() {
            self.fold_mine();
            // SAFETY: this function's contract.
            return unsafe { self.resize_carved(block, old, new, zeroed) };
        }
        if old.size() != 0 && new.size() != 0 && self.key(old) == self.key(new) {
            // Same key: the block already has the new layout's size class and
            // alignment class.
            let deltas = self.front().map(|owner| owner.take_counters());
            let mut state = self.state.lock();
            if let Some(deltas) = &deltas {
                state.fold(deltas);
            }
            state.stats.on_resize_in_place(old.size(), new.size());
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
}

impl<A: Allocator + Send + Sync> Member for Cache<A> {
    fn oldest(&self) -> Option<u64> {
        if self.carves() {
            return self.oldest_carved();
        }
        let (oldest, credit_out) = {
            let state = self.state.lock();
            (state.oldest_age(), state.credit_out)
        };
        // A front's credit counts as old as its owner's last slow path.
        match credit_out {
            0 => oldest,
            _ => self.oldest_front(oldest).or(oldest),
        }
    }

    fn evict_oldest(&self) -> bool {
        let evicted = self.evict_one();
        self.sync_budget();
        evicted
    }

    fn id(&self) -> *const () {
        (self as *const Self).cast()
    }
}

impl<A: Allocator + Send + Sync> Cache<A> {
    /// `Member::evict_oldest`, before the budget's hard limit learns it.
    fn evict_one(&self) -> bool {
        if self.carves() {
            return self.evict_carved();
        }
        let (oldest, credit_out) = {
            let state = self.state.lock();
            (state.oldest_age(), state.credit_out)
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
        if evicted.is_none() && credit_out > 0 {
            // Drained fronts give their credit back to the budget.
            let drained = self.drain_fronts(fronts::Drain::Live, &mut panics) > 0;
            panics.resume();
            return drained;
        }
        panics.resume();
        match evicted {
            Some((key, block)) => {
                self.unreserve(key.size());
                // The books are complete before the backing call: a panic in
                // it needs no catching here.
                // SAFETY: the block left the free lists under the lock: ours
                // alone, taken with its key's layout.
                unsafe { self.backing_deallocate(block, key) };
                true
            }
            None => false,
        }
    }
}

impl<A: Allocator> Drop for Cache<A> {
    fn drop(&mut self) {
        // Every user is gone (handles, scopes and live scope blocks hold
        // `Users`, and a budget let go of the cache when its users did), so no
        // block is in use: everything cached goes back. A panicking backing
        // stops none of it (every front is drained, every segment given
        // back), and is resumed only if the thread is not unwinding already.
        let mut panics = Deferred::new();
        let _ = self.drain_fronts(fronts::Drain::Orphaned, &mut panics);
        self.release_into(&mut panics);
        if self.carves() {
            self.drop_segments(&mut panics);
        }
        // Nothing is held any more: the budget's hard limit gets back all
        // this cache counted there.
        if let Some(budget) = self.limiting_budget() {
            budget.uncommit(mem::take(&mut self.state.lock().committed_on_budget));
        }
        panics.resume_unless_unwinding();
    }
}

#[cfg(not(loom))]
impl<A: Allocator + Send + Sync> crate::decay::Member for Cache<A> {
    fn decay(&self) {
        Cache::decay(self);
    }

    fn window(&self) -> u64 {
        self.config
            .decay_window()
            .map_or(u64::MAX, |window| Window::new(window).length)
    }
}

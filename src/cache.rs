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
//! The size policy is decided once per operation: each operation matches
//! the cache's [`Kind`] and goes on, straight through, in `cache/lists.rs`
//! (free lists) or `cache/carving.rs` (best fit's arena). The books behind
//! the lock are in `cache/state.rs`; the front caches' slow paths in
//! `cache/fronts.rs`.

mod carving;
mod fronts;
mod lists;
mod state;

use core::alloc::Layout;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};

use self::state::{Kind, State};
use crate::alloc::{RawAllocator, dangling};
use crate::budget::{Budget, Member};
use crate::decay::{Clock, DEFAULT_RELEASE_AFTER, Window};
use crate::front::Fronts;
use crate::history::{Action, History};
use crate::per_cpu::{self, PerCpu};
use crate::poison;
use crate::policy::{Key, SizePolicy};
use crate::reentry;
use crate::stats::{Count, Stats};
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
            None => match Kind::of(self.policy) {
                // Best fit gives free memory back after a quiet while by
                // default; the free lists keep c10's semantics (never).
                Kind::Arena => Some(DEFAULT_RELEASE_AFTER),
                Kind::Lists => None,
            },
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
        match Kind::of(self.policy) {
            Kind::Lists => {
                // None by default: c10's semantics.
                let limit = self.front_cache_bytes.unwrap_or(0);
                (limit > 0).then(|| Fronts::new(limit, self.evicts(), None))
            }
            Kind::Arena => {
                let limit = self.front_cache_bytes.unwrap_or(BEST_FIT_FRONT_BYTES);
                if limit == 0 {
                    return None;
                }
                if !self.per_thread_fronts
                    && let Some(per_cpu) = PerCpu::new()
                {
                    return Some(Fronts::new(limit, false, Some(per_cpu)));
                }
                (!self.evicts()).then(|| Fronts::new(limit, false, None))
            }
        }
    }
}

/// A cache over a backing allocator `A`; shared by all handles through an `Arc`.
pub(crate) struct Cache<A: Allocator> {
    /// The backend, fixed when the cache is built: what each operation
    /// dispatches on (the data is in `state`).
    kind: Kind,
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
            kind: Kind::of(config.policy),
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
    /// goes back, and the fronts are drained so that their blocks age in
    /// the shared cache. Returns the bytes given back.
    ///
    /// What goes: the free lists' oldest blocks, as many bytes as the
    /// window's low-water mark (a trim to it); best fit's reservations' free
    /// pages down to the same mark, decommitted or uncommitted in place; and
    /// best fit's fixed segments that were wholly free the whole window,
    /// whole (`Arena::decay`): one reused in the window stays, however much
    /// of it stayed free, since the mark cannot tell its never-used tail
    /// from an idle segment.
    pub(crate) fn decay(&self) -> usize {
        let deadline = self.decay_deadline.load(Ordering::Acquire);
        let now = self.config.clock.now();
        if deadline == u64::MAX || now < deadline {
            return 0;
        }
        let unused = {
            let mut state = self.state.lock();
            let Some(length) = state.window_length() else {
                return 0;
            };
            // One thread closes a window: whoever moves the deadline.
            let next = now.saturating_add(length);
            if self
                .decay_deadline
                .compare_exchange(deadline, next, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return 0;
            }
            state.close_window()
        };

        let mut panics = Deferred::new();
        // The drained blocks were in use (in a front) in the window that
        // closed: they join the next one (`restart_window`, below).
        let _ = self.drain_fronts(fronts::Drain::Live, &mut panics);
        let decayed = if unused == 0 {
            0
        } else {
            let cached = self.state.lock().stats().bytes_cached;
            self.give_back_free(cached.saturating_sub(unused), Count::Decay, &mut panics)
        };
        // What the fronts brought back ages from now.
        self.state.lock().restart_window();
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
        match &self.fronts {
            Some(fronts) => self.stats_with_fronts(fronts),
            None => self.state.lock().report(),
        }
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
        let (mut segments, mut pieces, extras) = self.state.lock().layout();
        let ((history, stacks), recorded) = self.history.as_ref().map_or(
            ((std::vec::Vec::new(), std::vec::Vec::new()), 0),
            |history| (history.events(), history.recorded()),
        );
        let frames = crate::frames::resolve(&stacks, self.config.frames);
        match self.kind {
            Kind::Arena => {
                // Blocks sitting in per-CPU fronts (best fit's alone): free
                // pieces of the arena's segments.
                if let Some(per_cpu) = self.per_cpu() {
                    per_cpu.for_each_block(|cpu, key, address| {
                        pieces.push(Piece {
                            address,
                            size: key.size(),
                            state: BlockState::Front(Some(cpu)),
                        });
                    });
                }
            }
            Kind::Lists => {
                // Blocks in use of the free-list policies: the history's,
                // each a segment of its own.
                let live = crate::snapshot::live_blocks(&history);
                for (&address, &size) in &live {
                    if let Some(key) =
                        self.key(Layout::from_size_align(size, 1).unwrap_or(Layout::new::<u8>()))
                    {
                        segments.push((address, key.size(), SegmentKind::Block));
                    }
                }
            }
        }
        segments.sort_unstable_by_key(|&(address, ..)| address);
        crate::Snapshot::assemble(stats, segments, pieces, &extras, history, frames, recorded)
    }

    pub(crate) fn is_caching_stopped(&self) -> bool {
        self.state.lock().caching_stopped()
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
        self.state.lock().committed_on_budget(bytes);
        true
    }

    /// Brings what the budget's hard limit counts for this cache to what it
    /// holds: after a shrink (or a precommit larger than the growth).
    fn sync_budget(&self) {
        let Some(budget) = self.limiting_budget() else {
            return;
        };
        let (surplus, shortfall) = self.state.lock().settle_committed_on_budget();
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
                state.begin_pending(bytes);
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
        self.state.lock().count().on_limit_failure();
        self.record(Action::LimitFailure, bytes, 0);
        false
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
        self.state.lock().count().on_retry();
        self.release_cached();
        attempt().inspect_err(|_| {
            let mut state = self.state.lock();
            state.count().on_failure();
            if self.config.stop_caching_after_failure {
                state.stop_caching();
                if let Some(fronts) = &self.fronts {
                    fronts.stop();
                }
            }
        })
    }

    /// Gives a block of the free-list policies back to the backing
    /// allocator: the one way a block leaves the cache.
    ///
    /// # Safety
    ///
    /// `block` was taken from the backing allocator with `key`'s layout, is
    /// owned by this cache alone, and is not listed.
    unsafe fn give_back(&self, block: NonNull<u8>, key: Key) {
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
        let bytes = self.give_back_free(0, Count::Release, &mut panics);
        self.sync_budget();
        panics.resume();
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
        let trimmed = self.give_back_free(target_bytes, Count::Evict, &mut panics);
        self.sync_budget();
        panics.resume();
        trimmed
    }

    /// The shared side's free memory back, down to `target_bytes` (a
    /// release: all of it), counted as `count` says: a release, a trim, a
    /// decay. The bytes given back; a panicking backing `deallocate` is
    /// kept in `panics` and stops none of it.
    fn give_back_free(&self, target_bytes: usize, count: Count, panics: &mut Deferred) -> usize {
        match self.kind {
            Kind::Lists => self.shed_lists(target_bytes, count, panics),
            Kind::Arena => self.shed_arena(target_bytes, count, panics),
        }
    }
}

/// The block handed out for `layout`: a slice of its length, the first
/// `layout.size()` bytes zeroed if asked (a reused block holds old data).
///
/// # Safety
///
/// `block` is the cache's alone (just taken off a free list, a front or
/// the arena) and holds at least `layout.size()` writable bytes.
#[inline(always)]
unsafe fn hand_out(block: NonNull<u8>, layout: Layout, zeroed: bool) -> NonNull<[u8]> {
    if zeroed {
        // SAFETY: the caller's contract: nobody else references the block,
        // and it holds at least `layout.size()` writable bytes.
        unsafe { ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
    }
    NonNull::slice_from_raw_parts(block, layout.size())
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
            && let Some(slot) = per_cpu::Class::for_best_fit(layout)
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
            && let Some(slot) = per_cpu::Class::for_best_fit(layout)
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

    /// `grow` and `shrink`, in place where the block allows, else through
    /// a new block, copying.
    unsafe fn resize(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        match self.kind {
            // SAFETY: this function's contract.
            Kind::Lists => unsafe { self.resize_listed(block, old, new, zeroed) },
            Kind::Arena => {
                self.fold_mine();
                // SAFETY: this function's contract.
                unsafe { self.resize_carved(block, old, new, zeroed) }
            }
        }
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
            if per_cpu::Class::for_best_fit(layout).is_some() {
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
            // SAFETY: the block was just taken from this thread's front
            // cache, so nobody else references it, and it holds
            // `key.size() >= layout.size()` writable bytes.
            return Ok(unsafe { hand_out(block, layout, zeroed) });
        }
        match self.kind {
            Kind::Lists => self.allocate_listed(layout, zeroed),
            Kind::Arena => self.allocate_carved(layout, zeroed),
        }
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
            if let Some(slot) = per_cpu::Class::for_best_fit(layout) {
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
        match self.kind {
            // SAFETY: this function's contract.
            Kind::Lists => unsafe { self.deallocate_listed(block, layout) },
            // SAFETY: this function's contract.
            Kind::Arena => unsafe { self.deallocate_carved(block, layout) },
        }
    }
}

impl<A: Allocator + Send + Sync> Member for Cache<A> {
    fn oldest(&self) -> Option<u64> {
        let (oldest, credit_out) = {
            let state = self.state.lock();
            (state.oldest(), state.credit_out())
        };
        // A front's credit counts as old as its owner's last slow path
        // (only the free lists' per-thread fronts hold credit).
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
        match self.kind {
            Kind::Lists => self.evict_listed(),
            Kind::Arena => self.evict_carved(),
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
        match self.kind {
            Kind::Lists => {
                self.give_back_free(0, Count::Release, &mut panics);
            }
            Kind::Arena => self.drop_segments(&mut panics),
        }
        // Nothing is held any more: the budget's hard limit gets back all
        // this cache counted there.
        if let Some(budget) = self.limiting_budget() {
            budget.uncommit(self.state.lock().take_committed_on_budget());
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

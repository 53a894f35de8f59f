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

use core::alloc::Layout;
use core::mem;
use core::ptr::{self, NonNull};
use std::collections::BTreeMap;

use allocator_api2::alloc::{AllocError, Allocator};
use allocator_api2::vec::Vec;
use foldhash::fast::FixedState;
use hashbrown::HashMap;

use crate::budget::{Budget, Member};
use crate::poison;
use crate::policy::{Key, SizePolicy};
use crate::reentry::{self, Bookkeeping};
use crate::stats::Stats;
use crate::sync::Mutex;
use crate::unwind::Deferred;

/// How a cache decides what to keep: set once by the `Builder`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Config {
    pub(crate) policy: SizePolicy,
    pub(crate) max_cached_bytes: Option<usize>,
    pub(crate) budget: Option<Budget>,
    pub(crate) stop_caching_after_failure: bool,
}

impl Config {
    /// Whether blocks are ever evicted one by one: then an age index is kept
    /// so the oldest is found in `O(log n)`.
    fn evicts(&self) -> bool {
        self.max_cached_bytes.is_some() || self.budget.is_some()
    }
}

/// A cached block, its age (a clock reading taken when it was listed) and its
/// GreedyDual-Size priority (see [`State::evict`]).
#[derive(Clone, Copy)]
struct Cached {
    block: NonNull<u8>,
    age: u64,
    priority: u64,
}

/// Which cached block an eviction takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    /// The one cached longest ago: a shared budget (its contract) and `trim`.
    Oldest,
    /// The lowest GreedyDual-Size priority: the cap.
    Cheapest,
}

/// The priority scale: a block of `size` bytes adds `SCALE / size` to the
/// inflation, so smaller blocks (more hits per byte kept) rank higher. Blocks
/// of 4 GiB and more all add 0; the inflation grows by at most `SCALE / 64`
/// per eviction, so a `u64` lasts for 2^38 evictions and then saturates.
const PRIORITY_SCALE: u64 = 1 << 32;

/// Cached blocks of one key, oldest first. Hits take the last (most recently
/// freed: its cache lines and pages are the warmest); evictions the first.
type FreeList = Vec<Cached, Bookkeeping>;

/// A fixed-seed hasher: no lazy random seed, and cheap on two-word keys.
type FreeLists = HashMap<Key, FreeList, FixedState, Bookkeeping>;

/// A cache over a backing allocator `A`; shared by all handles through an `Arc`.
pub(crate) struct Cache<A: Allocator> {
    state: Mutex<State>,
    config: Config,
    backing: A,
}

struct State {
    free_lists: FreeLists,
    /// Age -> key of every cached block, when the cache evicts (a cap or a
    /// budget is set). B-tree nodes come from the global allocator: mutations
    /// run marked as inside the allocator.
    ages: Option<BTreeMap<u64, Key>>,
    /// (priority, age) -> key of every cached block, when a cap is set.
    priorities: Option<BTreeMap<(u64, u64), Key>>,
    /// GreedyDual-Size's inflation `L`: the priority of the last block the
    /// cap evicted. Never decreases.
    inflation: u64,
    /// The clock of a cache without a budget (a budget has one for all).
    clock: u64,
    /// Set after an allocation failed even after release and retry, if the
    /// config says to stop caching then.
    caching_stopped: bool,
    stats: Stats,
}

// SAFETY: the `NonNull`s on the free lists are blocks this cache owns
// exclusively (no user holds them while they are listed); moving the state to
// another thread moves that ownership with it, like a `Vec<Box<[u8]>>` would.
unsafe impl Send for State {}

impl State {
    fn new(config: &Config) -> Self {
        Self {
            free_lists: empty_free_lists(),
            ages: config.evicts().then(BTreeMap::new),
            priorities: config.max_cached_bytes.is_some().then(BTreeMap::new),
            inflation: 0,
            clock: 0,
            caching_stopped: false,
            stats: Stats::default(),
        }
    }

    /// Takes the most recently cached block of `key`, if any.
    #[inline]
    fn pop(&mut self, key: Key) -> Option<NonNull<u8>> {
        let cached = self.free_lists.get_mut(&key)?.pop()?;
        self.unindex(&cached);
        Some(cached.block)
    }

    /// Removes a block leaving its list from the indexes.
    #[inline]
    fn unindex(&mut self, cached: &Cached) {
        if self.ages.is_none() {
            return;
        }
        let _inside = reentry::inside();
        if let Some(ages) = &mut self.ages {
            ages.remove(&cached.age);
        }
        if let Some(priorities) = &mut self.priorities {
            priorities.remove(&(cached.priority, cached.age));
        }
    }

    /// A block of `key` freed now: its age and priority.
    #[inline]
    fn stamp(&mut self, key: Key, block: NonNull<u8>, age: u64) -> Cached {
        // Only a cap orders blocks by priority; the division is not free, so
        // caches without one skip it.
        let priority = if self.priorities.is_some() {
            self.inflation
                .saturating_add(PRIORITY_SCALE / key.size.max(1) as u64)
        } else {
            0
        };
        Cached {
            block,
            age,
            priority,
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
        if self.ages.is_some() {
            let _inside = reentry::inside();
            if let Some(ages) = &mut self.ages {
                ages.insert(cached.age, key);
            }
            if let Some(priorities) = &mut self.priorities {
                priorities.insert((cached.priority, cached.age), key);
            }
        }
        Ok(())
    }

    /// Takes a cached block off its list, counts it evicted, and returns it.
    ///
    /// The cap evicts by GreedyDual-Size (Cao and Irani, 1997) with unit
    /// cost: a block's priority is `L + 1/size` when it is cached, the lowest
    /// priority goes first and `L` becomes its priority. Small blocks (more
    /// hits per byte kept) stay longer, and aging through `L` lets blocks that
    /// stopped recurring go. On the bundled traces with a cap of the peak live
    /// bytes it keeps more hits than oldest-first on all three (README has
    /// the figures): oldest-first is LRU, which thrashes on the cyclic pattern
    /// of a static model's passes.
    fn evict(&mut self, victim: Victim) -> Option<(Key, NonNull<u8>)> {
        let (key, age) = match victim {
            Victim::Cheapest => match &self.priorities {
                Some(priorities) => {
                    let (&(priority, age), &key) = priorities.iter().next()?;
                    self.inflation = self.inflation.max(priority);
                    (key, age)
                }
                None => return self.evict(Victim::Oldest),
            },
            Victim::Oldest => match &self.ages {
                Some(ages) => {
                    let (&age, &key) = ages.iter().next()?;
                    (key, age)
                }
                None => self
                    .free_lists
                    .iter()
                    .filter_map(|(&key, list)| list.first().map(|cached| (key, cached.age)))
                    .min_by_key(|&(_, age)| age)?,
            },
        };
        let list = self.free_lists.get_mut(&key)?;
        // Ages grow along a list (they are taken under the lock), so the
        // victim is usually at the front.
        let position = list.iter().position(|cached| cached.age == age)?;
        let cached = list.remove(position);
        self.unindex(&cached);
        self.stats.on_evict(key.size);
        Some((key, cached.block))
    }

    /// The age of the oldest cached block.
    fn oldest_age(&self) -> Option<u64> {
        match &self.ages {
            Some(ages) => ages.keys().next().copied(),
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

/// A non-null pointer aligned to `layout.align()`, for zero-sized requests.
#[inline]
pub(crate) fn dangling(layout: Layout) -> NonNull<[u8]> {
    // An alignment is never zero; the fallback only satisfies the type.
    let addr = core::num::NonZeroUsize::new(layout.align()).unwrap_or(core::num::NonZeroUsize::MIN);
    NonNull::slice_from_raw_parts(NonNull::without_provenance(addr), 0)
}

impl<A: Allocator> Cache<A> {
    pub(crate) fn new(backing: A, config: Config) -> Self {
        Self {
            state: Mutex::new(State::new(&config)),
            config,
            backing,
        }
    }

    pub(crate) fn backing(&self) -> &A {
        &self.backing
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn stats(&self) -> Stats {
        self.state.lock().stats
    }

    pub(crate) fn is_caching_stopped(&self) -> bool {
        self.state.lock().caching_stopped
    }

    #[inline]
    fn key(&self, layout: Layout) -> Option<Key> {
        Key::for_layout(layout, self.config.policy)
    }

    /// A block for `layout`: a cached one of its key if any, else a new one.
    /// With `zeroed`, its first `layout.size()` bytes are zero.
    pub(crate) fn allocate(
        &self,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let Some(key) = self.key(layout) else {
            self.state.lock().stats.failures += 1;
            return Err(AllocError);
        };
        let popped = {
            let mut state = self.state.lock();
            let popped = state.pop(key);
            if popped.is_some() {
                state.stats.on_hit(layout.size(), key.size);
            }
            popped
        };
        let block = match popped {
            Some(block) => {
                poison::unpoison(block, key.size);
                if let Some(budget) = &self.config.budget {
                    budget.unreserve(key.size);
                }
                if zeroed {
                    // SAFETY: the block was just taken off a free list, so
                    // nobody else references it, and it holds `key.size >=
                    // layout.size()` writable bytes.
                    unsafe { ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
                }
                block
            }
            None => {
                let block = self.allocate_block(key, zeroed)?;
                self.state.lock().stats.on_miss(layout.size(), key.size);
                block
            }
        };
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    /// A new block of `key` from the backing allocator. If it fails, the
    /// cache is released and the allocation tried once more (the seed's
    /// out-of-memory path).
    fn allocate_block(&self, key: Key, zeroed: bool) -> Result<NonNull<u8>, AllocError> {
        let layout = key.block_layout();
        let attempt = || reentry::allocate_from(&self.backing, layout, zeroed);
        if let Ok(block) = attempt() {
            return Ok(block.cast());
        }
        self.state.lock().stats.retries += 1;
        self.release_cached();
        match attempt() {
            Ok(block) => Ok(block.cast()),
            Err(error) => {
                let mut state = self.state.lock();
                state.stats.failures += 1;
                if self.config.stop_caching_after_failure {
                    state.caching_stopped = true;
                }
                Err(error)
            }
        }
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
    pub(crate) unsafe fn deallocate(&self, block: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // A block handed out for `layout` proves the key exists.
        let Some(key) = self.key(layout) else {
            return;
        };
        let requested = layout.size();
        if self
            .config
            .max_cached_bytes
            .is_some_and(|cap| key.size > cap)
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
                || panics.catch(|| budget.reserve(key.size)) != Some(true))
        {
            // SAFETY: this function's contract.
            unsafe { self.give_back(block, key, requested) };
            return panics.resume();
        }
        // Poisoned before it is listed: once listed, another thread may take
        // (and unpoison) it at any moment.
        poison::poison(block, key.size);
        loop {
            let mut state = self.state.lock();
            if state.caching_stopped {
                drop(state);
                self.unreserve(key.size);
                // SAFETY: this function's contract.
                unsafe { self.give_back(block, key, requested) };
                return panics.resume();
            }
            if let Some(cap) = self.config.max_cached_bytes
                && state.stats.bytes_cached + key.size > cap
            {
                // Make room: the cheapest cached block goes back. One at a
                // time, with the lock released around the backing call.
                let evicted = state.evict(Victim::Cheapest);
                drop(state);
                if let Some((evicted_key, evicted_block)) = evicted {
                    self.unreserve(evicted_key.size);
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
            let age = match &self.config.budget {
                Some(budget) => budget.tick(),
                None => {
                    state.clock += 1;
                    state.clock
                }
            };
            let cached = state.stamp(key, block, age);
            if state.push(key, cached).is_err() {
                drop(state);
                self.unreserve(key.size);
                // SAFETY: this function's contract.
                unsafe { self.give_back(block, key, requested) };
                return panics.resume();
            }
            state.stats.on_free(requested, key.size);
            drop(state);
            return panics.resume();
        }
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
            .on_free_uncached(requested, key.size);
        // SAFETY: the caller's contract: the block is ours and was taken with
        // `key`'s layout.
        unsafe { self.backing_deallocate(block, key) };
    }

    /// # Safety
    ///
    /// `block` was taken from the backing allocator with `key`'s layout, is
    /// owned by this cache alone, and is not listed.
    unsafe fn backing_deallocate(&self, block: NonNull<u8>, key: Key) {
        poison::unpoison(block, key.size);
        let _inside = reentry::inside();
        // SAFETY: the caller's contract.
        unsafe { self.backing.deallocate(block, key.block_layout()) };
    }

    fn unreserve(&self, bytes: usize) {
        if let Some(budget) = &self.config.budget {
            budget.unreserve(bytes);
        }
    }

    /// `grow` and `shrink`: in place when both layouts map to the same free
    /// list, else through a block of the new key (cached if one is), copying.
    ///
    /// # Safety
    ///
    /// `block` is live and was handed out by this cache for `old`.
    pub(crate) unsafe fn resize(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() != 0 && new.size() != 0 && self.key(old) == self.key(new) {
            // Same key: the block already has the new layout's size class and
            // alignment class.
            self.state
                .lock()
                .stats
                .on_resize_in_place(old.size(), new.size());
            if zeroed && new.size() > old.size() {
                // SAFETY: the block is live, ours to write, and holds at least
                // `new.size()` bytes (its key's size).
                unsafe {
                    ptr::write_bytes(block.as_ptr().add(old.size()), 0, new.size() - old.size())
                };
            }
            return Ok(NonNull::slice_from_raw_parts(block, new.size()));
        }
        let moved = self.allocate(new, zeroed)?;
        let kept = old.size().min(new.size());
        // SAFETY: `block` is live with `old.size()` readable bytes and `moved`
        // is a different live block (a free list never holds a live block) with
        // `new.size()` writable bytes; both hold at least `kept`.
        unsafe { ptr::copy_nonoverlapping(block.as_ptr(), moved.cast::<u8>().as_ptr(), kept) };
        // SAFETY: `block` was handed out for `old` (contract), and the caller
        // stops using it once we return the new one.
        unsafe { self.deallocate(block, old) };
        Ok(moved)
    }

    /// Gives every cached block back to the backing allocator; returns the
    /// bytes given back. A panicking backing `deallocate` does not stop it:
    /// every block is handed back, then the first panic is resumed.
    pub(crate) fn release_cached(&self) -> usize {
        let mut panics = Deferred::new();
        let bytes = self.release_into(&mut panics);
        panics.resume();
        bytes
    }

    /// `release_cached`, keeping a panic of the backing allocator in `panics`.
    fn release_into(&self, panics: &mut Deferred) -> usize {
        let (lists, indexes, bytes) = {
            let mut state = self.state.lock();
            let lists = mem::replace(&mut state.free_lists, empty_free_lists());
            let ages = state.ages.as_mut().map(mem::take);
            let priorities = state.priorities.as_mut().map(mem::take);
            let (blocks, bytes) = (state.stats.blocks_cached, state.stats.bytes_cached);
            state.stats.on_release(blocks, bytes);
            (lists, (ages, priorities), bytes)
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
        let mut trimmed = 0;
        loop {
            let evicted = {
                let mut state = self.state.lock();
                if state.stats.bytes_cached <= target_bytes {
                    break;
                }
                state.evict(Victim::Oldest)
            };
            let Some((key, block)) = evicted else {
                break;
            };
            self.unreserve(key.size);
            panics.catch(|| {
                // SAFETY: the block left the free lists under the lock: ours
                // alone, taken with its key's layout.
                unsafe { self.backing_deallocate(block, key) }
            });
            trimmed += key.size;
        }
        panics.resume();
        trimmed
    }
}

impl<A: Allocator + Send + Sync> Member for Cache<A> {
    fn oldest(&self) -> Option<u64> {
        self.state.lock().oldest_age()
    }

    fn evict_oldest(&self) -> bool {
        let evicted = self.state.lock().evict(Victim::Oldest);
        match evicted {
            Some((key, block)) => {
                self.unreserve(key.size);
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

    fn id(&self) -> *const () {
        (self as *const Self).cast()
    }
}

impl<A: Allocator> Drop for Cache<A> {
    fn drop(&mut self) {
        // Every user is gone (handles, scopes and live scope blocks hold
        // `Users`, and a budget let go of the cache when its users did), so no
        // block is in use: everything cached goes back.
        let mut panics = Deferred::new();
        self.release_into(&mut panics);
        panics.resume_unless_unwinding();
    }
}

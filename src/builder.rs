//! [`Builder`]: a cache with a size policy, a cap, a shared budget.

use allocator_api2::alloc::{Allocator, Global};

use crate::budget::{self, Budget};
use crate::cache::{Cache, Config};
use crate::handle::{CachingAllocator, Users};
use crate::policy::SizePolicy;
use crate::sync::Arc;

/// Configures a [`CachingAllocator`]: created by
/// [`CachingAllocator::builder`]. Every setting's default is c10's
/// behaviour: exact sizes, no cap, no budget, keep caching after a failure.
///
/// | setting | when to use it |
/// |---|---|
/// | [`size_policy`](Self::size_policy)`(PowerOfTwoDivisions(4))` | dynamic shapes: sizes that vary a little from pass to pass |
/// | [`size_policy`](Self::size_policy)`(BestFit)` | memory held close to peak live, static or dynamic shapes (see the README's "Best fit") |
/// | [`max_cached_bytes`](Self::max_cached_bytes) | bound what one cache holds beyond its live blocks |
/// | [`budget`](Self::budget) | several caches (models) in one memory budget |
/// | [`stop_caching_after_failure`](Self::stop_caching_after_failure) | memory is so tight that an out-of-memory is likely to recur |
///
/// # Examples
///
/// ```
/// use allocator_api2::vec::Vec;
/// use caching_allocator::{CachingAllocator, SizePolicy};
///
/// let cache = CachingAllocator::builder()
///     .size_policy(SizePolicy::PowerOfTwoDivisions(4))
///     .max_cached_bytes(64 << 20)
///     .build();
/// // Sequence lengths 100 and 105 share the 320 KiB class: the second pass hits.
/// drop(Vec::<f32, _>::with_capacity_in(100 * 768, cache.clone()));
/// drop(Vec::<f32, _>::with_capacity_in(105 * 768, cache.clone()));
/// assert_eq!(cache.stats().hits, 1);
/// ```
#[derive(Clone, Debug, Default)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    config: Config,
}

impl CachingAllocator {
    /// Configures a cache: size classes, a cap, a shared budget.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl Builder {
    /// Which block size serves a request: see [`SizePolicy`]. Default
    /// `Exact`.
    pub fn size_policy(mut self, policy: SizePolicy) -> Self {
        self.config.policy = policy;
        self
    }

    /// Cached bytes never exceed `bytes`: when a free would push past it,
    /// cached blocks go back to the backing allocator, only as many as
    /// needed, lowest GreedyDual-Size priority first (small blocks stay
    /// longer; among blocks of one size, oldest first); a block larger than
    /// `bytes` is not cached. Keeping it costs two B-tree inserts and removes
    /// per cached block.
    ///
    /// With a [`budget`](Self::budget) too, room is made on the budget first
    /// (its oldest blocks, in any cache), then under the cap.
    pub fn max_cached_bytes(mut self, bytes: usize) -> Self {
        self.config.max_cached_bytes = Some(bytes);
        self
    }

    /// Shares `budget` with the other caches built with it: the sum of their
    /// cached bytes never exceeds it, and the blocks cached longest ago go
    /// back first, whichever cache holds them.
    pub fn budget(mut self, budget: &Budget) -> Self {
        self.config.budget = Some(budget.clone());
        self
    }

    /// Gives each thread that uses the cache a *front cache* of up to
    /// `bytes` of freed blocks (0, the default: none). A hit or a free on
    /// that thread then takes no lock and no atomic read-modify-write, and
    /// threads sharing the cache scale; blocks move to and from the shared
    /// cache in batches. [`FRONT_CACHE_BYTES`](crate::FRONT_CACHE_BYTES) is
    /// a good start.
    ///
    /// What changes: each thread may hold up to `bytes` of cached blocks
    /// that other threads cannot reuse until they move (a full bin, a full
    /// front, the thread's exit, or a release or trim, which reach every
    /// thread's front, idle or not); a trim takes the fronts' blocks after
    /// the shared cache's older ones; with [`SizePolicy::BestFit`] a block in
    /// a front is not merged with its free neighbours.
    ///
    /// With a cap or a budget, a front holds only the *credit* the shared
    /// cache granted it (a sixteenth of the cap or the budget at a time,
    /// counted against the cap and reserved on the budget), so both hold at
    /// every moment; cap pressure and a budget's evictions take idle fronts'
    /// credit back (a budget takes the front whose thread was active least
    /// recently first). A best-fit cache with a cap or a budget ignores this
    /// setting (its shed counts the arena's free bytes alone).
    ///
    /// # Examples
    ///
    /// ```
    /// use allocator_api2::vec::Vec;
    /// use caching_allocator::{CachingAllocator, FRONT_CACHE_BYTES};
    ///
    /// let cache = CachingAllocator::builder()
    ///     .front_cache_bytes(FRONT_CACHE_BYTES)
    ///     .build();
    /// std::thread::scope(|threads| {
    ///     for _ in 0..2 {
    ///         threads.spawn(|| {
    ///             for _ in 0..100 {
    ///                 drop(Vec::<u8, _>::with_capacity_in(1 << 20, cache.clone()));
    ///             }
    ///         });
    ///     }
    /// });
    /// let stats = cache.stats();
    /// assert_eq!(stats.hits + stats.misses, 200);
    /// assert!(stats.misses <= 2);
    /// // The threads exited; their fronts' blocks count, and a release
    /// // reaches them.
    /// assert_eq!(cache.release_cached(), stats.bytes_cached);
    /// assert_eq!(cache.stats().bytes_reserved, 0);
    /// ```
    pub fn front_cache_bytes(mut self, bytes: usize) -> Self {
        self.config.front_cache_bytes = Some(bytes);
        self
    }

    /// Per-CPU front caches (the default for [`SizePolicy::BestFit`] where
    /// the system has restartable sequences: x86-64 Linux with glibc 2.35+)
    /// or, with `false`, per-thread ones. Per CPU, what the fronts hold is
    /// bounded by the CPUs however many threads run; per thread, each
    /// thread's front holds up to [`front_cache_bytes`](Self::front_cache_bytes)
    /// until it is drained (a release, a trim, the thread's exit).
    pub fn per_cpu_fronts(mut self, per_cpu: bool) -> Self {
        self.config.per_thread_fronts = !per_cpu;
        self
    }

    /// A hard limit on the memory this cache holds: `bytes_reserved` (live
    /// plus cached, front caches included) never exceeds `bytes`. A request
    /// that would cross it first makes the cache give back its free memory
    /// (its fronts' too), then is tried once more, then fails with
    /// `AllocError`, counted in [`Stats::limit_failures`](crate::Stats::limit_failures).
    /// A refused `grow` keeps the old block. Best fit counts its decommitted
    /// pages against the limit too (they come back without asking).
    ///
    /// Under [`ScopedGlobal`](crate::ScopedGlobal) a refused allocation is an
    /// ordinary allocation failure: `Vec::try_reserve` returns the error, and
    /// an infallible `Vec::push` calls `handle_alloc_error` (which names the
    /// size and aborts).
    ///
    /// ```
    /// use allocator_api2::vec::Vec;
    /// use caching_allocator::{CachingAllocator, SizePolicy};
    ///
    /// let model = CachingAllocator::builder()
    ///     .size_policy(SizePolicy::BestFit)
    ///     .max_bytes(4 << 20)
    ///     .build();
    /// let mut kv: Vec<u8, _> = Vec::new_in(model.clone());
    /// assert!(kv.try_reserve_exact(3 << 20).is_ok());
    /// let mut more: Vec<u8, _> = Vec::new_in(model.clone());
    /// assert!(more.try_reserve_exact(2 << 20).is_err()); // 5 MiB > 4 MiB
    /// assert_eq!(model.stats().limit_failures, 1);
    /// drop(kv);
    /// assert!(more.try_reserve_exact(2 << 20).is_ok()); // it fits again
    /// assert!(model.stats().bytes_reserved <= 4 << 20);
    /// ```
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.config.max_bytes = Some(bytes);
        self
    }

    /// Free memory nobody reused for `window` goes back to the system without
    /// a call from the user: best fit decommits it in place (its pages go,
    /// the addresses stay), or, over fixed segments (`build_in`, Miri,
    /// systems other than Linux), gives back the segments that were wholly
    /// free the whole window; the other policies give whole blocks back to
    /// the backing allocator. Checked on the cache's slow paths (never on a front
    /// hit) and, for a program that makes no calls at all while idle, by the
    /// thread [`decay::spawn`](crate::decay::spawn) starts. Counted in
    /// [`Stats::bytes_decayed`](crate::Stats::bytes_decayed).
    ///
    /// Best fit decays after [`DEFAULT_RELEASE_AFTER`](crate::DEFAULT_RELEASE_AFTER)
    /// unless told otherwise; the other policies keep c10's semantics and
    /// never decay unless asked. `Duration::MAX` turns decay off. See the
    /// [`decay`](crate::decay) module for what "not reused" means.
    pub fn release_after(mut self, window: core::time::Duration) -> Self {
        self.config.release_after = Some(window);
        self
    }

    /// Records a history of the last `max_entries` events (allocations,
    /// frees, segment growths and shrinks, decommits, limit failures, front
    /// drains, decays), with their time, size, address and thread, for
    /// [`CachingAllocator::snapshot`](crate::CachingAllocator::snapshot) and
    /// PyTorch's memory viewer. Off by default (then it costs a branch on
    /// `None`); on, about 24 ns an event (docs/history.md: mostly reading the
    /// time-stamp counter), and any thread records without a
    /// lock.
    pub fn record_history(mut self, max_entries: usize) -> Self {
        self.config.history = Some(max_entries);
        self
    }

    /// Keeps the stack of each recorded event, up to `depth` frames
    /// ([`frames::MAX_FRAMES`](crate::frames::MAX_FRAMES) at most), for
    /// [`Snapshot::frames`](crate::Snapshot::frames) and the `frames` of
    /// PyTorch's pickle: where each block was allocated, as
    /// `_record_memory_history(stacks="all")` shows. Needs
    /// [`record_history`](Self::record_history). Walking a stack costs
    /// microseconds an event, not nanoseconds: for finding a problem, not
    /// for a server's every request. Names, files and lines are looked up
    /// when a snapshot is taken (the binary needs its debug info for files
    /// and lines).
    ///
    /// ```
    /// use allocator_api2::vec::Vec;
    /// use caching_allocator::CachingAllocator;
    ///
    /// #[inline(never)]
    /// fn load_weights(cache: &CachingAllocator) -> Vec<u8, CachingAllocator> {
    ///     Vec::with_capacity_in(1 << 20, cache.clone())
    /// }
    ///
    /// let cache = CachingAllocator::builder()
    ///     .record_history(1000)
    ///     .record_frames(32)
    ///     .build();
    /// let weights = load_weights(&cache);
    /// let snapshot = cache.snapshot();
    /// let stack = &snapshot.frames[0];
    /// assert!(stack.iter().any(|frame| frame.name.ends_with("load_weights")));
    /// # drop(weights);
    /// ```
    #[cfg(feature = "backtrace")]
    pub fn record_frames(mut self, depth: usize) -> Self {
        self.config.frames = depth;
        self
    }

    /// The clock decay reads (the system's monotonic clock unless set):
    /// [`decay::Clock::manual`](crate::decay::Clock::manual) lets a test move
    /// time by hand.
    pub fn decay_clock(mut self, clock: &crate::decay::Clock) -> Self {
        self.config.clock = clock.clone();
        self
    }

    /// After an allocation failed even after releasing the cache and retrying
    /// (c10's open question), stop caching: later frees go straight back to
    /// the backing allocator. Default `false`.
    pub fn stop_caching_after_failure(mut self, stop: bool) -> Self {
        self.config.stop_caching_after_failure = stop;
        self
    }

    /// A cache backed by the global allocator. With `SizePolicy::BestFit` on
    /// Linux the cache maps its own memory instead: one reserved address
    /// range, grown in place (see [`SizePolicy::BestFit`]).
    pub fn build(mut self) -> CachingAllocator {
        // The backing is the global allocator: best fit may map its own
        // memory instead (see `SizePolicy::BestFit`).
        self.config.reserves = true;
        self.build_in(Global)
    }

    /// A cache backed by `backing`. With `SizePolicy::BestFit` the cache takes
    /// fixed segments from `backing` and gives each back only whole (see
    /// `Stats::bytes_pinned`). The bounds let caches on a shared budget
    /// give back each other's blocks from any thread; without a budget,
    /// [`CachingAllocator::new_in`] takes any allocator.
    pub fn build_in<A: Allocator + Send + Sync + 'static>(self, backing: A) -> CachingAllocator<A> {
        let budget = self.config.budget.clone();
        let decays = self.config.decay_window().is_some();
        let users = Users::new(Cache::new(backing, self.config));
        if let Some(budget) = budget {
            // Unregistered when the last user goes (`Users::drop`).
            budget.register(budget::member_of(users.shared_cache()));
        }
        #[cfg(not(loom))]
        if decays {
            // By weak count: the background thread never keeps it alive.
            let cache: std::sync::Weak<Cache<A>> = Arc::downgrade(users.shared_cache());
            crate::decay::register(cache);
        }
        #[cfg(loom)]
        let _ = decays;
        CachingAllocator {
            cache: Arc::new(users),
        }
    }
}

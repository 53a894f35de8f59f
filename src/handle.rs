//! [`CachingAllocator`]: the cheaply clonable handle users hold.

use core::alloc::Layout;
use core::fmt;
use core::ops::Deref;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global};

use crate::alloc::{RawAllocator, allocator_impls};
use crate::cache::{Cache, Config};
use crate::history::{Action, History};
use crate::policy::SizePolicy;
use crate::stats::Stats;
use crate::sync::Arc;

/// A caching allocator: freed blocks stay on free lists, keyed by size and
/// alignment class, and are handed out again to the next request of that size
/// instead of going back to the backing allocator.
///
/// The trade-off first: memory is held, not returned. A cache holds as many
/// blocks of each size as were ever live at once, until
/// [`release_cached`](Self::release_cached) or the last handle drops. In
/// exchange, a workload that allocates the same sizes again and again (an
/// inference loop's tensor buffers) stops paying for `malloc`, page faults and
/// `munmap` after its first pass: a hit is one uncontended lock and a pop.
///
/// `CachingAllocator` is a handle: `Clone` is an `Arc` clone, and every clone
/// shares one cache. Collections take a clone (`Vec::new_in(cache.clone())`),
/// so the cache lives as long as any block it handed out, and a block may be
/// freed through any clone. When the last handle drops, every cached block
/// goes back to the backing allocator `A`.
///
/// It implements [`allocator_api2::alloc::Allocator`] (allocator-api2 0.2,
/// the version hashbrown uses), and with the `nightly` feature also
/// `core::alloc::Allocator`.
///
/// # Examples
///
/// ```
/// use allocator_api2::vec::Vec;
/// use caching_allocator::CachingAllocator;
///
/// let cache = CachingAllocator::new();
/// for _pass in 0..3 {
///     let mut activations: Vec<f32, _> = Vec::with_capacity_in(1 << 16, cache.clone());
///     activations.extend((0..1 << 16).map(|i| i as f32));
/// }
/// // The first pass took a block from the system; the next two reused it.
/// let stats = cache.stats();
/// assert_eq!((stats.misses, stats.hits), (1, 2));
/// assert_eq!(stats.bytes_cached, 4 << 16);
/// assert_eq!(cache.release_cached(), 4 << 16);
/// ```
pub struct CachingAllocator<A: Allocator = Global> {
    pub(crate) cache: Arc<Users<A>>,
}

/// What all users of one cache share: handles, scopes, and the registry
/// entries of live scope blocks each hold a count of it.
///
/// The cache itself is counted apart, so that a [`Budget`](crate::Budget) can
/// hold it too without keeping it alive for users: when the last user goes,
/// the cache leaves its budget, and it is freed (giving its blocks back) with
/// its last count, which an eviction in progress on another thread may hold
/// for a moment longer.
pub(crate) struct Users<A: Allocator> {
    cache: Arc<Cache<A>>,
}

impl<A: Allocator> Users<A> {
    pub(crate) fn new(cache: Cache<A>) -> Self {
        Self {
            cache: Arc::new(cache),
        }
    }

    /// The cache, by strong count (what a budget holds).
    pub(crate) fn shared_cache(&self) -> &Arc<Cache<A>> {
        &self.cache
    }
}

impl<A: Allocator> Deref for Users<A> {
    type Target = Cache<A>;

    #[inline]
    fn deref(&self) -> &Cache<A> {
        &self.cache
    }
}

impl<A: Allocator> Drop for Users<A> {
    fn drop(&mut self) {
        if let Some(budget) = &self.cache.config().budget {
            // No user is left to free into the cache; other members stop
            // evicting from it.
            budget.unregister(Arc::as_ptr(&self.cache).cast());
        }
    }
}

// SAFETY: forwards to the cache, whose contract this is; users keep it alive.
unsafe impl<A: Allocator> RawAllocator for Users<A> {
    #[inline]
    fn allocate(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        let block = RawAllocator::allocate(&*self.cache, layout, zeroed);
        if let Some(history) = self.cache.history() {
            record_alloc(history, &block, layout);
        }
        block
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if let Some(history) = self.cache.history()
            && layout.size() != 0
        {
            history.record(Action::Free, layout.size(), ptr.as_ptr().addr());
        }
        // SAFETY: forwarded contract.
        unsafe { RawAllocator::deallocate(&*self.cache, ptr, layout) }
    }

    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        let block = unsafe { RawAllocator::resize(&*self.cache, ptr, old, new, zeroed) };
        if let Some(history) = self.cache.history()
            && block.is_ok()
        {
            // A resize is a free of the old block and an allocation of the
            // new one (at the same address when in place).
            if old.size() != 0 {
                history.record(Action::Free, old.size(), ptr.as_ptr().addr());
            }
            record_alloc(history, &block, new);
        }
        block
    }
}

/// Records a successful allocation of `layout`.
#[cold]
fn record_alloc(history: &History, block: &Result<NonNull<[u8]>, AllocError>, layout: Layout) {
    if let Ok(block) = block
        && layout.size() != 0
    {
        history.record(
            Action::Alloc,
            layout.size(),
            block.cast::<u8>().as_ptr().addr(),
        );
    }
}

impl CachingAllocator {
    /// A new, empty cache backed by the global allocator, with c10's
    /// policy: exact sizes, no cap. The same as `builder().build()`.
    pub fn new() -> Self {
        Self::new_in(Global)
    }
}

impl Default for CachingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Allocator> CachingAllocator<A> {
    /// A new, empty cache that takes its blocks from `backing` and gives them
    /// back to it.
    ///
    /// # Examples
    ///
    /// ```
    /// use allocator_api2::alloc::Global;
    /// use caching_allocator::CachingAllocator;
    ///
    /// let cache = CachingAllocator::new_in(Global);
    /// assert_eq!(cache.stats().bytes_reserved, 0);
    /// ```
    pub fn new_in(backing: A) -> Self {
        Self {
            cache: Arc::new(Users::new(Cache::new(backing, Config::default()))),
        }
    }

    /// Gives every cached block back to the backing allocator and returns the
    /// bytes given back. Blocks in use are not affected.
    ///
    /// Call it when a workload ends (a model is unloaded) or memory is tight.
    /// The cache also does it by itself when the backing allocator fails,
    /// before retrying once.
    ///
    /// # Examples
    ///
    /// ```
    /// use allocator_api2::boxed::Box;
    /// use caching_allocator::CachingAllocator;
    ///
    /// let cache = CachingAllocator::new();
    /// drop(Box::new_in([0u8; 1000], cache.clone()));
    /// assert_eq!(cache.release_cached(), 1000);
    /// assert_eq!(cache.stats().bytes_reserved, 0);
    /// ```
    pub fn release_cached(&self) -> usize {
        self.cache.release_cached()
    }

    /// Gives cached blocks back to the backing allocator, oldest first, until
    /// at most `target_bytes` stay cached; returns the bytes given back.
    ///
    /// # Examples
    ///
    /// ```
    /// use allocator_api2::vec::Vec;
    /// use caching_allocator::CachingAllocator;
    ///
    /// let cache = CachingAllocator::new();
    /// let a = Vec::<u8, _>::with_capacity_in(1000, cache.clone());
    /// let b = Vec::<u8, _>::with_capacity_in(2000, cache.clone());
    /// drop(a); // cached first: the oldest
    /// drop(b);
    /// assert_eq!(cache.trim(2500), 1000);
    /// assert_eq!(cache.stats().bytes_cached, 2000);
    /// ```
    pub fn trim(&self, target_bytes: usize) -> usize {
        self.cache.trim(target_bytes)
    }

    /// The size policy this cache was built with.
    pub fn size_policy(&self) -> SizePolicy {
        self.cache.config().policy
    }

    /// The cap on cached bytes this cache was built with, if any.
    pub fn max_cached_bytes(&self) -> Option<usize> {
        self.cache.config().max_cached_bytes
    }

    /// The budget this cache shares, if any.
    pub fn budget(&self) -> Option<&crate::Budget> {
        self.cache.config().budget.as_ref()
    }

    /// Every segment and block this cache holds, its stats and (with
    /// [`Builder::record_history`](crate::Builder::record_history)) its
    /// history, at one instant: see [`Snapshot`](crate::Snapshot), which
    /// writes PyTorch's memory viewer's pickle and a page of its own.
    ///
    /// ```
    /// use allocator_api2::vec::Vec;
    /// use caching_allocator::{CachingAllocator, SizePolicy, snapshot::BlockState};
    ///
    /// let cache = CachingAllocator::builder()
    ///     .size_policy(SizePolicy::BestFit)
    ///     .record_history(1000)
    ///     .build();
    /// let kept = Vec::<u8, _>::with_capacity_in(100_000, cache.clone());
    /// drop(Vec::<u8, _>::with_capacity_in(50_000, cache.clone()));
    /// let snapshot = cache.snapshot();
    /// assert_eq!(snapshot.bytes_in(BlockState::InUse), 100_032); // rounded to 64
    /// let mut pickle = std::vec::Vec::new();
    /// snapshot.write_pytorch(&mut pickle).unwrap();
    /// assert_eq!(&pickle[..2], b"\x80\x02");
    /// drop(kept);
    /// ```
    pub fn snapshot(&self) -> crate::Snapshot {
        self.cache.snapshot()
    }

    /// Closes the decay window if it is over (see
    /// [`Builder::release_after`](crate::Builder::release_after)): what
    /// nobody reused all of it goes back. The cache's slow paths and the
    /// [`decay::spawn`](crate::decay::spawn) thread call this themselves.
    /// Returns the bytes given back.
    pub fn decay(&self) -> usize {
        self.cache.decay()
    }

    /// Which front caches this cache has: per CPU (best fit's default where
    /// the system has restartable sequences), per thread, or none.
    ///
    /// ```
    /// use caching_allocator::{CachingAllocator, FrontKind, SizePolicy};
    ///
    /// assert_eq!(CachingAllocator::new().front_kind(), FrontKind::None);
    /// let best_fit = CachingAllocator::builder()
    ///     .size_policy(SizePolicy::BestFit)
    ///     .build();
    /// assert_ne!(best_fit.front_kind(), FrontKind::None);
    /// ```
    pub fn front_kind(&self) -> FrontKind {
        self.cache.front_kind()
    }

    /// Whether caching stopped after an allocation failure (only with
    /// [`Builder::stop_caching_after_failure`](crate::Builder::stop_caching_after_failure)).
    pub fn is_caching_stopped(&self) -> bool {
        self.cache.is_caching_stopped()
    }

    /// A snapshot of the counters, consistent with each other (taken under
    /// the cache's lock).
    ///
    /// With front caches ([`Builder::front_cache_bytes`](crate::Builder::front_cache_bytes))
    /// the snapshot adds every thread's front counters, read without
    /// stopping the threads: counters and gauges are exact whenever no
    /// thread is inside the allocator, and a snapshot taken while threads
    /// work their fronts can be off by what is in flight (a gauge never
    /// reads below zero). Peaks are then exact while one thread works at a
    /// time, an estimate with several, and never fall below a value once
    /// reported.
    pub fn stats(&self) -> Stats {
        self.cache.stats()
    }

    /// The allocator blocks are taken from.
    pub fn backing(&self) -> &A {
        self.cache.backing()
    }

    /// Whether `self` and `other` are handles of the same cache.
    ///
    /// ```
    /// let cache = caching_allocator::CachingAllocator::new();
    /// assert!(cache.same_cache(&cache.clone()));
    /// assert!(!cache.same_cache(&caching_allocator::CachingAllocator::new()));
    /// ```
    pub fn same_cache(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.cache, &other.cache)
    }
}

#[cfg(not(loom))]
impl<A: Allocator + Send + Sync + 'static> CachingAllocator<A> {
    /// Makes this cache the current thread's until the returned guard drops:
    /// with [`ScopedGlobal`](crate::ScopedGlobal) installed as the
    /// `#[global_allocator]`, this thread's allocations of at least its minimum
    /// size (plain `Vec`s, `Box`es, anyone's buffers) come from this cache.
    ///
    /// Scopes nest: the innermost wins, and dropping it makes the one before
    /// current again (c10's `WithCPUCachingAllocatorGuard`). A guard is
    /// `!Send`. Dropping guards out of order is safe and ends every scope on
    /// the thread. Blocks allocated in a scope may be freed anywhere, at any
    /// time: they go back to this cache, which lives until its last block is
    /// freed.
    ///
    /// Without `ScopedGlobal` installed, a scope has no effect: the first
    /// scope entered then says so once on stderr, and
    /// [`ScopedGlobal::is_installed`](crate::ScopedGlobal::is_installed)
    /// answers the question in code.
    ///
    /// # Examples
    ///
    /// ```
    /// use caching_allocator::{CachingAllocator, ScopedGlobal};
    ///
    /// #[global_allocator]
    /// static GLOBAL: ScopedGlobal = ScopedGlobal::new();
    ///
    /// let model_a = CachingAllocator::new();
    /// let model_b = CachingAllocator::new();
    /// let _a = model_a.enter();
    /// let tensor = vec![1u8; 8192];
    /// {
    ///     let _b = model_b.enter(); // inner scope wins
    ///     drop(vec![2u8; 8192]);
    ///     drop(tensor); // still goes back to model_a
    /// }
    /// assert_eq!(model_a.stats().bytes_cached, 8192);
    /// assert_eq!(model_b.stats().bytes_cached, 8192);
    /// ```
    pub fn enter(&self) -> crate::Scope {
        crate::scope::enter(self.cache.clone())
    }
}

allocator_impls!(CachingAllocator, cache);

impl<A: Allocator> Clone for CachingAllocator<A> {
    /// Another handle of the same cache.
    fn clone(&self) -> Self {
        Self {
            cache: Arc::clone(&self.cache),
        }
    }
}

impl<A: Allocator> fmt::Debug for CachingAllocator<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingAllocator")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Which front caches a cache has ([`CachingAllocator::front_kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrontKind {
    /// No fronts: every request and free goes through the shared cache.
    None,
    /// A front per thread (see
    /// [`Builder::front_cache_bytes`](crate::Builder::front_cache_bytes)).
    PerThread,
    /// A front per CPU, reached through restartable sequences (see
    /// [`Builder::per_cpu_fronts`](crate::Builder::per_cpu_fronts)).
    PerCpu,
}

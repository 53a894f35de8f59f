//! [`Budget`]: one byte budget for the cached memory of several caches.
//!
//! Accounting: a cache reserves a block's bytes on the budget *before* it
//! lists the block, and gives them back when the block leaves its free lists,
//! so the sum of cached bytes over the members never exceeds the limit, at
//! any instant. When a reservation does not fit, the member holding the block
//! cached longest ago (one clock for all members) gives that block back, and
//! the reservation is tried again.
//!
//! Membership: the list holds a strong count of each member cache, so a
//! member is alive for as long as anyone can reach it through the budget (the
//! type system sees it; no raw pointer outlives its cache). A cache leaves the
//! list when its last user goes (`Users` in `handle.rs`); an eviction that
//! picked it just before still holds its own count, and the cache is freed
//! when that count goes.
//!
//! Locking: the member list has its own lock, taken with no cache lock held;
//! a member's lock is taken under it only briefly, one member at a time, to
//! read its oldest age. No user code runs under the list's lock: the victim
//! gives its block back (to a backing allocator that may be another cache on
//! this very budget, or on a budget layered crosswise) after the lock is
//! released. No path holds two cache locks, so two caches trimming each other
//! cannot deadlock.

use core::fmt;
use core::sync::atomic::Ordering;

use allocator_api2::vec::Vec;

use crate::reentry::Bookkeeping;
use crate::sync::{Arc, AtomicU64, AtomicUsize, Mutex};

/// A byte budget shared by the cached memory of several caches: one per model
/// in an inference server, say, all within one limit.
///
/// When a free would push the caches past the budget, the blocks cached
/// longest ago go back to their backing allocators first, whichever cache
/// holds them: an idle model's cache yields to the busy one. A block larger
/// than the whole budget is not cached. Only cached bytes count: blocks in use
/// are the models' own business.
///
/// `Budget` is a cheap handle (`Clone` shares it) and `Send + Sync`. Clones of
/// a cache built with a budget share it too.
///
/// # Examples
///
/// ```
/// use allocator_api2::vec::Vec;
/// use caching_allocator::{Budget, CachingAllocator};
///
/// let budget = Budget::new(1 << 20);
/// let busy = CachingAllocator::builder().budget(&budget).build();
/// let idle = CachingAllocator::builder().budget(&budget).build();
///
/// drop(Vec::<u8, _>::with_capacity_in(600 << 10, idle.clone())); // cached first
/// drop(Vec::<u8, _>::with_capacity_in(600 << 10, busy.clone())); // does not fit beside it
///
/// assert_eq!(idle.stats().bytes_cached, 0, "the older block went back");
/// assert_eq!(busy.stats().bytes_cached, 600 << 10);
/// assert!(budget.bytes_cached() <= budget.limit());
/// ```
#[derive(Clone)]
pub struct Budget {
    shared: Arc<Shared>,
}

struct Shared {
    limit: usize,
    /// Bytes reserved by members for their cached blocks.
    cached: AtomicUsize,
    /// A hard limit on what the members hold together (live and cached),
    /// if set (`Budget::with_max_bytes`).
    max_bytes: Option<usize>,
    /// What the members hold together, as they reported it (their
    /// `bytes_reserved` and best fit's decommitted pages, and what they are
    /// taking), when there is a hard limit.
    committed: AtomicUsize,
    /// Ages of cached blocks, comparable across members.
    clock: AtomicU64,
    members: Mutex<Vec<Arc<dyn Member>, Bookkeeping>>,
}

/// What a budget needs of a member cache.
pub(crate) trait Member: Send + Sync {
    /// The age (clock reading) of this member's oldest cached block.
    fn oldest(&self) -> Option<u64>;

    /// Gives this member's oldest cached block back to its backing allocator
    /// (and its bytes back to the budget); whether there was one.
    fn evict_oldest(&self) -> bool;

    /// The member's address, which names it in [`Budget::unregister`].
    fn id(&self) -> *const ();
}

/// A strong count of `member`, as the budget's list holds it.
pub(crate) fn member_of<M: Member + 'static>(member: &Arc<M>) -> Arc<dyn Member> {
    #[cfg(not(loom))]
    {
        Arc::<M>::clone(member)
    }
    // loom's `Arc` cannot be coerced to a trait object; it adopts a std `Arc`
    // of one (see `sync.rs` for where else `std::sync` is named).
    #[cfg(loom)]
    {
        Arc::from_std(std::sync::Arc::new(Arc::<M>::clone(member)))
    }
}

/// A member held by strong count (under loom, how the list holds one).
impl<M: Member> Member for Arc<M> {
    fn oldest(&self) -> Option<u64> {
        M::oldest(self)
    }

    fn evict_oldest(&self) -> bool {
        M::evict_oldest(self)
    }

    fn id(&self) -> *const () {
        Arc::as_ptr(self).cast()
    }
}

impl Budget {
    /// A budget of `limit` bytes for the cached blocks of all caches built
    /// with it.
    pub fn new(limit: usize) -> Self {
        Self::with(limit, None)
    }

    fn with(limit: usize, max_bytes: Option<usize>) -> Self {
        Self {
            shared: Arc::new(Shared {
                limit,
                cached: AtomicUsize::new(0),
                max_bytes,
                committed: AtomicUsize::new(0),
                clock: AtomicU64::new(0),
                members: Mutex::new(Vec::new_in(Bookkeeping)),
            }),
        }
    }

    /// A budget of `limit` free bytes that also holds its members to
    /// `max_bytes` together, live and cached: a member whose request would
    /// cross it first makes the budget evict the members' free memory
    /// (oldest first, whichever member holds it), then gives its own back,
    /// then fails the request (counted in its `Stats::limit_failures`).
    ///
    /// ```
    /// use allocator_api2::vec::Vec;
    /// use caching_allocator::{Budget, CachingAllocator, SizePolicy};
    ///
    /// let budget = Budget::with_max_bytes(1 << 30, 4 << 20);
    /// let build = || {
    ///     CachingAllocator::builder()
    ///         .size_policy(SizePolicy::BestFit)
    ///         .budget(&budget)
    ///         .build()
    /// };
    /// let (idle, busy) = (build(), build());
    /// drop(Vec::<u8, _>::with_capacity_in(3 << 20, idle.clone())); // idle keeps it cached
    /// let mut kv: Vec<u8, _> = Vec::new_in(busy.clone());
    /// assert!(kv.try_reserve_exact(3 << 20).is_ok()); // the idle model's free memory went
    /// assert!(budget.bytes_reserved() <= 4 << 20);
    /// let mut more: Vec<u8, _> = Vec::new_in(busy.clone());
    /// assert!(more.try_reserve_exact(2 << 20).is_err()); // live bytes are not evicted
    /// ```
    pub fn with_max_bytes(limit: usize, max_bytes: usize) -> Self {
        Self::with(limit, Some(max_bytes))
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.shared.limit
    }

    /// The hard limit on what the members hold together, if any.
    pub fn max_bytes(&self) -> Option<usize> {
        self.shared.max_bytes
    }

    /// What the members hold together now (their `bytes_reserved`, and
    /// what they are taking), counted only with a hard limit
    /// ([`with_max_bytes`](Self::with_max_bytes)): never above it.
    pub fn bytes_reserved(&self) -> usize {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Counts `bytes` a member is about to take against the hard limit,
    /// evicting the members' oldest free memory while they do not fit;
    /// `false` if they cannot fit (nothing left to evict). Called with no
    /// cache lock held.
    pub(crate) fn try_commit(&self, bytes: usize) -> bool {
        let Some(max) = self.shared.max_bytes else {
            return true;
        };
        loop {
            let fitted =
                self.shared
                    .committed
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                        held.checked_add(bytes).filter(|&after| after <= max)
                    });
            if fitted.is_ok() {
                return true;
            }
            if !self.evict_oldest() {
                return false;
            }
        }
    }

    /// Counts `bytes` a member holds beyond what it reported, whatever the
    /// hard limit (growth that was not reported first; never expected).
    pub(crate) fn force_commit(&self, bytes: usize) {
        if self.shared.max_bytes.is_some() && bytes > 0 {
            self.shared.committed.fetch_add(bytes, Ordering::AcqRel);
        }
    }

    /// A member holds `bytes` less than it reported.
    pub(crate) fn uncommit(&self, bytes: usize) {
        if self.shared.max_bytes.is_some() && bytes > 0 {
            self.shared.committed.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Bytes cached by all caches on this budget now: never above
    /// [`limit`](Self::limit), but for the free bytes a best-fit cache over
    /// fixed segments (`build_in`) cannot give back while a block in use
    /// shares their segment ([`Stats::bytes_pinned`](crate::Stats::bytes_pinned)),
    /// which are counted whatever the limit. A best-fit cache's per-CPU
    /// fronts count as blocks in use here.
    pub fn bytes_cached(&self) -> usize {
        self.shared.cached.load(Ordering::Acquire)
    }

    /// Reserves `bytes` for a block about to be cached, evicting the oldest
    /// blocks of any member until they fit. `false` if they cannot fit: the
    /// block is larger than the limit, or nothing is left to evict (other
    /// reservations hold the rest).
    pub(crate) fn reserve(&self, bytes: usize) -> bool {
        if bytes > self.shared.limit {
            return false;
        }
        loop {
            let fitted =
                self.shared
                    .cached
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cached| {
                        (cached + bytes <= self.shared.limit).then_some(cached + bytes)
                    });
            if fitted.is_ok() {
                return true;
            }
            if !self.evict_oldest() {
                return false;
            }
        }
    }

    /// Counts `bytes` as cached whatever the limit: free bytes a best-fit
    /// cache can neither give back nor keep out of the count (pinned in a
    /// fixed segment, see `Stats::bytes_pinned`).
    pub(crate) fn force(&self, bytes: usize) {
        self.shared.cached.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Gives back bytes reserved for a block that left a free list.
    pub(crate) fn unreserve(&self, bytes: usize) {
        self.shared.cached.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// The next age: called under the member's lock, so each member's blocks
    /// are listed in age order.
    pub(crate) fn tick(&self) -> u64 {
        self.shared.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// The member holding the oldest cached block gives it back.
    fn evict_oldest(&self) -> bool {
        let victim = {
            let members = self.shared.members.lock();
            let mut oldest: Option<(u64, &Arc<dyn Member>)> = None;
            for member in members.iter() {
                if let Some(age) = member.oldest()
                    && oldest.is_none_or(|(best, _)| age < best)
                {
                    oldest = Some((age, member));
                }
            }
            // A count of our own: the list's may go once the lock is released.
            oldest.map(|(_, member)| Arc::clone(member))
        };
        // The lock is released: the victim's backing allocator may be a cache
        // on this budget. It may have lost that block to a hit meanwhile: it
        // then evicts its next oldest, or reports that it had none. Dropping
        // `victim` may free the cache (its users left meanwhile), also with no
        // lock held.
        victim.is_some_and(|victim| victim.evict_oldest())
    }

    /// Adds a member, by strong count, until [`unregister`](Self::unregister).
    pub(crate) fn register(&self, member: Arc<dyn Member>) {
        let mut members = self.shared.members.lock();
        // The list only grows when a cache is built; failing to grow it would
        // leave the cache outside the budget, so abort like `Vec::push`.
        members.push(member);
    }

    /// Removes the member named `id`; its count is dropped after the lock is
    /// released (it may be the cache's last).
    pub(crate) fn unregister(&self, id: *const ()) {
        let removed = {
            let mut members = self.shared.members.lock();
            let position = members.iter().position(|m| m.id() == id);
            position.map(|position| members.swap_remove(position))
        };
        drop(removed);
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("limit", &self.limit())
            .field("bytes_cached", &self.bytes_cached())
            .finish_non_exhaustive()
    }
}

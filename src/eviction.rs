//! The eviction index: which cached block goes back first when a cache gives
//! blocks back one at a time (a cap, a shared budget, a `trim`).
//!
//! A cache that evicts keeps an [`EvictionIndex`] of every cached block by
//! age, and with a cap also by GreedyDual-Size priority; so the victim is
//! found in `O(log n)`. A cache with neither a cap nor a budget keeps none
//! (its `trim` scans its free lists instead): the index is an `Option` in the
//! cache's state, and priorities exist only inside an index, beside ages.
//!
//! B-tree nodes come from the global allocator: every mutation runs marked as
//! inside the allocator, so a scoped global allocator serves them from its
//! inner allocator while the cache's lock is held.

use std::collections::BTreeMap;

use crate::policy::Key;
use crate::reentry;

/// Which cached block an eviction takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Victim {
    /// The one cached longest ago: a shared budget (its contract) and `trim`.
    Oldest,
    /// The lowest GreedyDual-Size priority: the cap. Without a cap, the
    /// oldest.
    Cheapest,
}

/// The priority scale: a block of `size` bytes adds `SCALE / size` to the
/// inflation, so smaller blocks (more hits per byte kept) rank higher. Blocks
/// of 4 GiB and more all add 0; the inflation grows by at most `SCALE / 64`
/// per eviction, so a `u64` lasts for 2^38 evictions and then saturates.
const PRIORITY_SCALE: u64 = 1 << 32;

/// Every cached block of a cache that evicts, by age (a clock reading taken
/// when it was listed; unique per block) and, with a cap, by priority.
pub(crate) struct EvictionIndex {
    ages: BTreeMap<u64, Key>,
    greedy_dual: Option<GreedyDual>,
}

/// GreedyDual-Size (Cao and Irani, 1997) with unit cost: a block's priority
/// is `L + 1/size` when it is cached, the lowest priority goes first and `L`
/// (the inflation) becomes its priority. Small blocks (more hits per byte
/// kept) stay longer, and aging through `L` lets blocks that stopped
/// recurring go. On the bundled traces with a cap of the peak live bytes it
/// keeps more hits than oldest-first on all three (README has the figures):
/// oldest-first is LRU, which thrashes on the cyclic pattern of a static
/// model's passes.
#[derive(Default)]
struct GreedyDual {
    /// (priority, age) -> key of every cached block.
    priorities: BTreeMap<(u64, u64), Key>,
    /// The priority of the last block the cap evicted. Never decreases.
    inflation: u64,
}

impl EvictionIndex {
    /// An empty index; `by_priority` for a cache with a cap.
    pub(crate) fn new(by_priority: bool) -> Self {
        Self {
            ages: BTreeMap::new(),
            greedy_dual: by_priority.then(GreedyDual::default),
        }
    }

    /// The priority of a block of `key` cached now (0 without a cap: the
    /// division is not free, so caches without one skip it).
    #[inline]
    pub(crate) fn priority(&self, key: Key) -> u64 {
        match &self.greedy_dual {
            Some(greedy_dual) => greedy_dual
                .inflation
                .saturating_add(PRIORITY_SCALE / key.size().max(1) as u64),
            None => 0,
        }
    }

    /// Indexes a block of `key` listed with `age` and `priority`.
    #[inline]
    pub(crate) fn insert(&mut self, key: Key, age: u64, priority: u64) {
        let _inside = reentry::inside();
        self.ages.insert(age, key);
        if let Some(greedy_dual) = &mut self.greedy_dual {
            greedy_dual.priorities.insert((priority, age), key);
        }
    }

    /// Forgets a block leaving its list (a hit or an eviction).
    #[inline]
    pub(crate) fn remove(&mut self, age: u64, priority: u64) {
        let _inside = reentry::inside();
        self.ages.remove(&age);
        if let Some(greedy_dual) = &mut self.greedy_dual {
            greedy_dual.priorities.remove(&(priority, age));
        }
    }

    /// The key and age of the block `victim` picks, still indexed (the caller
    /// takes it off its list, then calls [`remove`](Self::remove)). Picking
    /// the cheapest raises the inflation to its priority.
    pub(crate) fn pick(&mut self, victim: Victim) -> Option<(Key, u64)> {
        match (victim, &mut self.greedy_dual) {
            (Victim::Cheapest, Some(greedy_dual)) => {
                let (&(priority, age), &key) = greedy_dual.priorities.iter().next()?;
                greedy_dual.inflation = greedy_dual.inflation.max(priority);
                Some((key, age))
            }
            _ => self.ages.iter().next().map(|(&age, &key)| (key, age)),
        }
    }

    /// The age of the oldest indexed block.
    pub(crate) fn oldest_age(&self) -> Option<u64> {
        self.ages.keys().next().copied()
    }

    /// Empties the index, returning what it held (to be dropped outside the
    /// cache's lock). The inflation stays.
    pub(crate) fn take(&mut self) -> Self {
        Self {
            ages: core::mem::take(&mut self.ages),
            greedy_dual: self.greedy_dual.as_mut().map(|greedy_dual| GreedyDual {
                priorities: core::mem::take(&mut greedy_dual.priorities),
                inflation: greedy_dual.inflation,
            }),
        }
    }
}

//! The registry of scope blocks: which owner handed out the block at an
//! address, so that every free reaches it, wherever it happens (c10's
//! process-wide `allocation_map_` and `record_free`, made safe).
//!
//! An entry holds a strong count of its owner: a live block keeps its cache
//! alive, and the free of an orphaned cache's last block drops the cache
//! (which gives every cached block back). The live count lets frees skip the
//! map when no scope block exists.

use core::sync::atomic::Ordering;

use crate::sync::{AtomicUsize, ConcurrentMap};

#[cfg(not(loom))]
pub(crate) use scope_blocks::{ScopeBlock, prepare, scope_blocks};

/// The one registry `ScopedGlobal` and the scopes share (std only: loom
/// models install no global allocator).
#[cfg(not(loom))]
mod scope_blocks {
    use std::sync::{Arc, OnceLock};

    use super::Registry;
    use crate::alloc::Owner;
    use crate::reentry;

    /// A live block a scope's owner handed out: a strong count of the owner,
    /// the scope it was handed out in, and its size.
    pub(crate) struct ScopeBlock {
        pub(crate) owner: Arc<dyn Owner>,
        pub(crate) scope: u64,
        pub(crate) size: usize,
    }

    /// Every live block a scope's owner handed out.
    static SCOPE_BLOCKS: OnceLock<Registry<ScopeBlock>> = OnceLock::new();

    /// The registry, if a scope was ever entered (no scope block exists
    /// before that).
    #[inline]
    pub(crate) fn scope_blocks() -> Option<&'static Registry<ScopeBlock>> {
        SCOPE_BLOCKS.get()
    }

    /// The registry, created if need be, marked inside so its tables come
    /// from the inner allocator. Every `enter` calls it first, so it is never
    /// created inside an allocation.
    pub(crate) fn prepare() -> &'static Registry<ScopeBlock> {
        let _inside = reentry::inside();
        SCOPE_BLOCKS.get_or_init(Registry::new)
    }
}

/// Live blocks by address, each with (a strong handle of) its owner `V`.
pub struct Registry<V> {
    blocks: ConcurrentMap<V>,
    live: AtomicUsize,
}

impl<V> core::fmt::Debug for Registry<V> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Registry")
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<V> Registry<V> {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            blocks: ConcurrentMap::new(),
            live: AtomicUsize::new(0),
        }
    }

    /// Records that `owner` handed out the block at `addr`. Called before the
    /// block is returned to anyone. Returns the entry it replaced (none while
    /// every registered block is freed through `take`), for the caller to drop
    /// outside the registry.
    pub fn insert(&self, addr: usize, owner: V) -> Option<V> {
        let replaced = self.blocks.insert(addr, owner);
        if replaced.is_none() {
            self.live.fetch_add(1, Ordering::Relaxed);
        }
        replaced
    }

    /// The owner of the block at `addr`, removed: the one caller that gets it
    /// frees the block.
    pub fn take(&self, addr: usize) -> Option<V> {
        if self.is_empty() {
            return None;
        }
        let owner = self.blocks.remove(addr)?;
        self.live.fetch_sub(1, Ordering::Relaxed);
        Some(owner)
    }

    /// Whether a registered block lives at `addr`.
    pub fn contains(&self, addr: usize) -> bool {
        !self.is_empty() && self.blocks.contains(addr)
    }

    /// Calls `f` on every live entry (for reports, not the hot path).
    pub(crate) fn for_each(&self, f: impl FnMut(&V)) {
        self.blocks.for_each(f);
    }

    /// No registered block is live. A relaxed load suffices: whoever frees a
    /// block got it through some synchronisation after it was registered
    /// (the count was raised first), and so sees a count above zero.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.live.load(Ordering::Relaxed) == 0
    }
}

//! The thread-local "inside the allocator" flag, and the one rule it serves.
//!
//! **The re-entrancy rule.** While a thread is marked *inside*,
//! [`ScopedGlobal`](crate::ScopedGlobal) serves its *allocations* from the
//! inner allocator, never from a scope's cache. The cache marks the thread
//! around every call that may allocate through the global allocator (its
//! backing allocator, the growth of its free lists), so neither a scope's
//! cache nor a cache used directly inside its own scope is ever asked for its
//! own bookkeeping or backing blocks: no recursion, and no deadlock on the
//! cache's lock. *Frees* are not affected: a free of a block a scope handed
//! out always reaches that block's owner through the registry, wherever it
//! happens (user code such as a backing allocator or an owner's `Drop` may run
//! while the flag is set, and may free such blocks). The one exception is the
//! registry's own critical sections (marked [`in_registry`]): the registry
//! holds a shard lock there, and the only blocks freed are its own tables,
//! which were allocated inside and so came from the inner allocator.
//!
//! No crate lock is held while user code runs, so a free that reaches an
//! owner from inside user code never finds that owner's lock taken.
//!
//! The flag is a `const`-initialised `Cell` without a destructor, so it can be
//! read from a global allocator at any point of a thread's life, teardown
//! included. Loom models install no global allocator; under `cfg(loom)` the
//! flag is inert.

#[cfg(not(loom))]
mod imp {
    use std::cell::Cell;

    /// Not inside: allocations may go to a scope's cache.
    const OUTSIDE: u8 = 0;
    /// Inside: allocations go to the inner allocator.
    const INSIDE: u8 = 1;
    /// Inside the registry: allocations and frees go to the inner allocator.
    const IN_REGISTRY: u8 = 2;

    std::thread_local! {
        static LEVEL: Cell<u8> = const { Cell::new(OUTSIDE) };
    }

    /// Whether this thread is inside the allocator (its allocations go to the
    /// inner allocator). A thread whose thread-locals are gone counts as
    /// inside: plain inner allocation is always safe.
    #[inline]
    pub(crate) fn is_inside() -> bool {
        LEVEL.try_with(Cell::get).unwrap_or(INSIDE) >= INSIDE
    }

    /// Whether this thread holds a registry lock: then a free must not look
    /// the block up (it is one of the registry's own, from the inner
    /// allocator).
    #[inline]
    pub(crate) fn is_in_registry() -> bool {
        LEVEL.try_with(Cell::get).unwrap_or(OUTSIDE) >= IN_REGISTRY
    }

    /// Raises this thread's level to at least `level` until dropped, then
    /// restores what was there (so nested marks compose).
    pub(crate) struct Inside {
        was: u8,
    }

    #[inline]
    fn raise(level: u8) -> Inside {
        Inside {
            was: LEVEL
                .try_with(|current| current.replace(current.get().max(level)))
                .unwrap_or(level),
        }
    }

    /// Marks this thread as inside the allocator until dropped.
    #[inline]
    pub(crate) fn inside() -> Inside {
        raise(INSIDE)
    }

    /// Marks this thread as inside the registry until dropped.
    #[inline]
    pub(crate) fn in_registry() -> Inside {
        raise(IN_REGISTRY)
    }

    impl Drop for Inside {
        #[inline]
        fn drop(&mut self) {
            let _ = LEVEL.try_with(|current| current.set(self.was));
        }
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) struct Inside;

    pub(crate) fn inside() -> Inside {
        Inside
    }
}

pub(crate) use imp::inside;
#[cfg(not(loom))]
pub(crate) use imp::{in_registry, is_in_registry, is_inside};

use core::alloc::Layout;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global};

/// A block from `backing`, zeroed or not, with the thread marked as inside
/// the allocator (so a scoped global allocator under `backing` serves it from
/// its inner allocator).
#[inline]
pub(crate) fn allocate_from<A: Allocator>(
    backing: &A,
    layout: Layout,
    zeroed: bool,
) -> Result<NonNull<[u8]>, AllocError> {
    let _inside = inside();
    if zeroed {
        backing.allocate_zeroed(layout)
    } else {
        backing.allocate(layout)
    }
}

/// Where the crate's own bookkeeping (free lists, the budget's member list)
/// lives: the global allocator, with the thread marked as inside the
/// allocator, so that a scoped global allocator serves it from its inner
/// allocator and never from a cache (whose lock may be held). Never a cache's
/// backing allocator: that one sees exactly the blocks handed to users.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Bookkeeping;

// SAFETY: every method forwards to `Global` unchanged; marking the thread
// does not touch the memory.
unsafe impl Allocator for Bookkeeping {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let _inside = inside();
        Global.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        let _inside = inside();
        // SAFETY: the caller's contract: `ptr` came from `allocate` above,
        // that is from `Global`, with `layout`.
        unsafe { Global.deallocate(ptr, layout) }
    }
}

//! The thread-local "inside the allocator" flag.
//!
//! While it is set on a thread, [`ScopedGlobal`](crate::ScopedGlobal) sends
//! every request straight to its inner allocator. The cache sets it around
//! every call that may reach the global allocator (its backing allocator, the
//! growth of its free lists), so neither a scope's cache nor a cache used
//! directly inside its own scope is ever asked for its own bookkeeping or
//! backing blocks: no recursion, and no deadlock on the cache's lock.
//!
//! The flag is a `const`-initialised `Cell<bool>` without a destructor, so it
//! can be read from a global allocator at any point of a thread's life,
//! teardown included. Loom models install no global allocator; under
//! `cfg(loom)` the flag is inert.

#[cfg(not(loom))]
mod imp {
    use std::cell::Cell;

    std::thread_local! {
        static INSIDE: Cell<bool> = const { Cell::new(false) };
    }

    /// Whether this thread is inside the allocator. A thread whose
    /// thread-locals are gone counts as inside: plain inner allocation is
    /// always safe.
    #[inline]
    pub(crate) fn is_inside() -> bool {
        INSIDE.try_with(Cell::get).unwrap_or(true)
    }

    /// Marks this thread as inside the allocator until dropped, then restores
    /// what was there (so nested marks compose).
    pub(crate) struct Inside {
        was: bool,
    }

    #[inline]
    pub(crate) fn inside() -> Inside {
        Inside {
            was: INSIDE
                .try_with(|inside| inside.replace(true))
                .unwrap_or(true),
        }
    }

    impl Drop for Inside {
        #[inline]
        fn drop(&mut self) {
            let _ = INSIDE.try_with(|inside| inside.set(self.was));
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
pub(crate) use imp::is_inside;

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

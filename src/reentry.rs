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

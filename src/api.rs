//! The allocator traits, in one place: allocator-api2's on every toolchain,
//! and core's behind the `nightly` feature, for every handle of the crate
//! (`CachingAllocator`, `plan::Recorder`, `plan::Planned`). Each handle's
//! shared state implements [`RawAllocator`]; one macro turns that into both
//! traits.
//!
//! The `nightly` feature never enables `allocator-api2/nightly`: that would
//! turn allocator-api2's trait into core's for the whole build and break every
//! other crate that uses allocator-api2 (hashbrown among them).

use core::alloc::Layout;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};

use crate::cache::Cache;
use crate::handle::CachingAllocator;
use crate::plan::{Planned, Recorder};

/// What a handle's shared state provides; the trait impls are derived from it.
///
/// # Safety
///
/// Implementors guarantee, for every handle sharing the state:
/// - a block returned by `allocate` is valid for its layout, aligned to it,
///   and overlaps no other live block, until it is passed to `deallocate` or
///   the state is dropped (handles keep the state alive);
/// - `deallocate` accepts any block `allocate`/`resize` returned, through any
///   handle of the same state;
/// - with `zeroed`, the first `layout.size()` bytes are zero;
/// - `resize` keeps the first `min(old, new)` bytes, zeroes the rest with
///   `zeroed`, and on error leaves the old block live and untouched.
pub(crate) unsafe trait RawAllocator {
    fn allocate(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError>;

    /// # Safety
    ///
    /// `ptr` is a live block of this state, allocated for `layout`, unused
    /// afterwards.
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout);

    /// Moves a block to `new`: by default a new block, a copy and a free.
    ///
    /// # Safety
    ///
    /// `ptr` is a live block of this state allocated for `old`. On success
    /// the old block must no longer be used.
    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        let moved = self.allocate(new, zeroed)?;
        // SAFETY: `ptr` is live with `old.size()` bytes, `moved` is a new,
        // distinct block with `new.size()` bytes.
        unsafe {
            ptr::copy_nonoverlapping(
                ptr.as_ptr(),
                moved.cast::<u8>().as_ptr(),
                old.size().min(new.size()),
            )
        };
        // SAFETY: the caller's contract; it uses `moved` from now on.
        unsafe { self.deallocate(ptr, old) };
        Ok(moved)
    }
}

// SAFETY: the cache never lists a live block, hands out blocks of at least the
// request's size with its key's alignment, zeroes reused blocks on request,
// and its `grow`/`shrink` copy and free the old block only on success.
unsafe impl<A: Allocator> RawAllocator for Cache<A> {
    fn allocate(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        Cache::allocate(self, layout, zeroed)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { Cache::deallocate(self, ptr, layout) }
    }

    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        unsafe { Cache::resize(self, ptr, old, new, zeroed) }
    }
}

/// `allocator_api2::alloc::Allocator`, and `core::alloc::Allocator` under
/// `nightly`, for a handle whose field `$state` derefs to a [`RawAllocator`].
macro_rules! allocator_impls {
    ($handle:ident, $state:ident) => {
        // SAFETY: forwards to the handle's `RawAllocator`, whose contract is
        // this trait's; clones share the state, so a block may be freed
        // through any of them, and hold it alive.
        unsafe impl<A: Allocator> Allocator for $handle<A> {
            #[inline]
            fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
                RawAllocator::allocate(&*self.$state, layout, false)
            }

            #[inline]
            fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
                RawAllocator::allocate(&*self.$state, layout, true)
            }

            #[inline]
            unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
                // SAFETY: the trait's contract is `RawAllocator::deallocate`'s.
                unsafe { RawAllocator::deallocate(&*self.$state, ptr, layout) }
            }

            unsafe fn grow(
                &self,
                ptr: NonNull<u8>,
                old: Layout,
                new: Layout,
            ) -> Result<NonNull<[u8]>, AllocError> {
                // SAFETY: the trait's contract is `RawAllocator::resize`'s.
                unsafe { RawAllocator::resize(&*self.$state, ptr, old, new, false) }
            }

            unsafe fn grow_zeroed(
                &self,
                ptr: NonNull<u8>,
                old: Layout,
                new: Layout,
            ) -> Result<NonNull<[u8]>, AllocError> {
                // SAFETY: as for `grow`.
                unsafe { RawAllocator::resize(&*self.$state, ptr, old, new, true) }
            }

            unsafe fn shrink(
                &self,
                ptr: NonNull<u8>,
                old: Layout,
                new: Layout,
            ) -> Result<NonNull<[u8]>, AllocError> {
                // SAFETY: as for `grow`.
                unsafe { RawAllocator::resize(&*self.$state, ptr, old, new, false) }
            }
        }

        #[cfg(feature = "nightly")]
        // SAFETY: the same guarantees as the allocator-api2 impl above.
        unsafe impl<A: Allocator> core::alloc::Allocator for $handle<A> {
            #[inline]
            fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, core::alloc::AllocError> {
                RawAllocator::allocate(&*self.$state, layout, false)
                    .map_err(|_| core::alloc::AllocError)
            }

            #[inline]
            fn allocate_zeroed(
                &self,
                layout: Layout,
            ) -> Result<NonNull<[u8]>, core::alloc::AllocError> {
                RawAllocator::allocate(&*self.$state, layout, true)
                    .map_err(|_| core::alloc::AllocError)
            }

            #[inline]
            unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
                // SAFETY: the trait's contract is `RawAllocator::deallocate`'s.
                unsafe { RawAllocator::deallocate(&*self.$state, ptr, layout) }
            }

            unsafe fn grow(
                &self,
                ptr: NonNull<u8>,
                old: Layout,
                new: Layout,
            ) -> Result<NonNull<[u8]>, core::alloc::AllocError> {
                // SAFETY: the trait's contract is `RawAllocator::resize`'s.
                unsafe { RawAllocator::resize(&*self.$state, ptr, old, new, false) }
                    .map_err(|_| core::alloc::AllocError)
            }

            unsafe fn grow_zeroed(
                &self,
                ptr: NonNull<u8>,
                old: Layout,
                new: Layout,
            ) -> Result<NonNull<[u8]>, core::alloc::AllocError> {
                // SAFETY: as for `grow`.
                unsafe { RawAllocator::resize(&*self.$state, ptr, old, new, true) }
                    .map_err(|_| core::alloc::AllocError)
            }

            unsafe fn shrink(
                &self,
                ptr: NonNull<u8>,
                old: Layout,
                new: Layout,
            ) -> Result<NonNull<[u8]>, core::alloc::AllocError> {
                // SAFETY: as for `grow`.
                unsafe { RawAllocator::resize(&*self.$state, ptr, old, new, false) }
                    .map_err(|_| core::alloc::AllocError)
            }
        }
    };
}

allocator_impls!(CachingAllocator, cache);
allocator_impls!(Recorder, inner);
allocator_impls!(Planned, inner);

//! The allocator traits, in one place: allocator-api2's on every toolchain,
//! and core's behind the `nightly` feature. Both delegate to the same
//! [`Cache`](crate::cache::Cache) methods.
//!
//! The `nightly` feature never enables `allocator-api2/nightly`: that would
//! turn allocator-api2's trait into core's for the whole build and break every
//! other crate that uses allocator-api2 (hashbrown among them).

use core::alloc::Layout;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};

use crate::handle::CachingAllocator;

// SAFETY: blocks stay valid until deallocated or until the last clone drops
// (the `Arc` keeps the cache, and so every cached and live block, alive);
// clones share one cache, so a block may be freed through any of them; the
// cache never lists a live block, so no block is handed out twice; `grow` and
// `shrink` copy the contents and free the old block only on success.
unsafe impl<A: Allocator> Allocator for CachingAllocator<A> {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.cache.allocate(layout, false)
    }

    #[inline]
    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.cache.allocate(layout, true)
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: the trait's contract: `ptr` is a live block of this cache
        // (through any clone) allocated with `layout`.
        unsafe { self.cache.deallocate(ptr, layout) }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: the trait's contract: `ptr` is live for `old_layout` and
        // `new_layout.size() >= old_layout.size()`.
        unsafe { self.cache.grow(ptr, old_layout, new_layout, false) }
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: as for `grow`.
        unsafe { self.cache.grow(ptr, old_layout, new_layout, true) }
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: the trait's contract: `ptr` is live for `old_layout` and
        // `new_layout.size() <= old_layout.size()`.
        unsafe { self.cache.shrink(ptr, old_layout, new_layout) }
    }
}

#[cfg(feature = "nightly")]
mod nightly {
    use core::alloc::{AllocError, Layout};
    use core::ptr::NonNull;

    use allocator_api2::alloc::Allocator as Backing;

    use crate::handle::CachingAllocator;

    // SAFETY: the same guarantees as the allocator-api2 impl above, whose
    // code this delegates to.
    unsafe impl<A: Backing> core::alloc::Allocator for CachingAllocator<A> {
        #[inline]
        fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
            self.cache.allocate(layout, false).map_err(|_| AllocError)
        }

        #[inline]
        fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
            self.cache.allocate(layout, true).map_err(|_| AllocError)
        }

        #[inline]
        unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
            // SAFETY: core's contract is allocator-api2's: `ptr` is a live
            // block of this cache allocated with `layout`.
            unsafe { self.cache.deallocate(ptr, layout) }
        }

        unsafe fn grow(
            &self,
            ptr: NonNull<u8>,
            old_layout: Layout,
            new_layout: Layout,
        ) -> Result<NonNull<[u8]>, AllocError> {
            // SAFETY: the trait's contract, as in the allocator-api2 impl.
            unsafe { self.cache.grow(ptr, old_layout, new_layout, false) }.map_err(|_| AllocError)
        }

        unsafe fn grow_zeroed(
            &self,
            ptr: NonNull<u8>,
            old_layout: Layout,
            new_layout: Layout,
        ) -> Result<NonNull<[u8]>, AllocError> {
            // SAFETY: the trait's contract, as in the allocator-api2 impl.
            unsafe { self.cache.grow(ptr, old_layout, new_layout, true) }.map_err(|_| AllocError)
        }

        unsafe fn shrink(
            &self,
            ptr: NonNull<u8>,
            old_layout: Layout,
            new_layout: Layout,
        ) -> Result<NonNull<[u8]>, AllocError> {
            // SAFETY: the trait's contract, as in the allocator-api2 impl.
            unsafe { self.cache.shrink(ptr, old_layout, new_layout) }.map_err(|_| AllocError)
        }
    }
}

//! The allocator plumbing, in one leaf module (as hashbrown's `alloc.rs`):
//! the [`RawAllocator`] contract every handle's shared state meets, the one
//! macro that turns it into allocator-api2's `Allocator` on every toolchain
//! and core's behind the `nightly` feature, [`Owner`] (a type-erased
//! `RawAllocator` for scopes and the global allocator), and [`dangling`].
//! It imports none of its users: each handle invokes the macro in its own
//! file.
//!
//! The `nightly` feature never enables `allocator-api2/nightly`: that would
//! turn allocator-api2's trait into core's for the whole build and break every
//! other crate that uses allocator-api2 (hashbrown among them).

use core::alloc::Layout;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::AllocError;

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

/// What a scope and the global allocator need of a block's owner (a cache, a
/// recorder, a planned arena), type-erased so one thread-local and one
/// registry serve them all.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) trait Owner: RawAllocator + Send + Sync {}

impl<T: RawAllocator + Send + Sync> Owner for T {}

/// A non-null pointer aligned to `layout.align()`, for zero-sized requests.
#[inline]
pub(crate) fn dangling(layout: Layout) -> NonNull<[u8]> {
    // An alignment is never zero; the fallback only satisfies the type.
    let addr = core::num::NonZeroUsize::new(layout.align()).unwrap_or(core::num::NonZeroUsize::MIN);
    NonNull::slice_from_raw_parts(NonNull::without_provenance(addr), 0)
}

/// `allocator_api2::alloc::Allocator`, and `core::alloc::Allocator` under
/// `nightly`, for a handle `$handle<A>` whose field `$state` derefs to a
/// [`RawAllocator`]. Written once: the inner rule takes the trait family.
macro_rules! allocator_impls {
    ($handle:ident, $state:ident) => {
        $crate::alloc::allocator_impls!(@family $handle, $state, allocator_api2::alloc);
        #[cfg(feature = "nightly")]
        $crate::alloc::allocator_impls!(@family $handle, $state, core::alloc);
    };
    (@family $handle:ident, $state:ident, $($family:ident)::+) => {
        // SAFETY: forwards to the handle's `RawAllocator`, whose contract is
        // this trait's; clones share the state, so a block may be freed
        // through any of them, and hold it alive.
        unsafe impl<A: allocator_api2::alloc::Allocator> $($family)::+::Allocator for $handle<A> {
            #[inline]
            fn allocate(
                &self,
                layout: core::alloc::Layout,
            ) -> Result<core::ptr::NonNull<[u8]>, $($family)::+::AllocError> {
                $crate::alloc::RawAllocator::allocate(&*self.$state, layout, false)
                    .map_err(|_| $($family)::+::AllocError)
            }

            #[inline]
            fn allocate_zeroed(
                &self,
                layout: core::alloc::Layout,
            ) -> Result<core::ptr::NonNull<[u8]>, $($family)::+::AllocError> {
                $crate::alloc::RawAllocator::allocate(&*self.$state, layout, true)
                    .map_err(|_| $($family)::+::AllocError)
            }

            #[inline]
            unsafe fn deallocate(&self, ptr: core::ptr::NonNull<u8>, layout: core::alloc::Layout) {
                // SAFETY: the trait's contract is `RawAllocator::deallocate`'s.
                unsafe { $crate::alloc::RawAllocator::deallocate(&*self.$state, ptr, layout) }
            }

            $crate::alloc::allocator_impls!(@resize grow, false, $state, $($family)::+);
            $crate::alloc::allocator_impls!(@resize grow_zeroed, true, $state, $($family)::+);
            $crate::alloc::allocator_impls!(@resize shrink, false, $state, $($family)::+);
        }
    };
    // `grow`, `grow_zeroed` and `shrink`: one `RawAllocator::resize` each.
    (@resize $method:ident, $zeroed:literal, $state:ident, $($family:ident)::+) => {
        unsafe fn $method(
            &self,
            ptr: core::ptr::NonNull<u8>,
            old: core::alloc::Layout,
            new: core::alloc::Layout,
        ) -> Result<core::ptr::NonNull<[u8]>, $($family)::+::AllocError> {
            // SAFETY: the trait's contract for this method is
            // `RawAllocator::resize`'s.
            unsafe { $crate::alloc::RawAllocator::resize(&*self.$state, ptr, old, new, $zeroed) }
                .map_err(|_| $($family)::+::AllocError)
        }
    };
}

pub(crate) use allocator_impls;

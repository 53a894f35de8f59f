//! Tells AddressSanitizer which bytes nobody may touch: blocks on free lists
//! and free arena ranges.
//!
//! A cache hides use-after-free from ASan: a cached block is still allocated
//! as far as ASan knows, so a stale pointer would write into the next owner's
//! tensor unseen. In builds with `-Zsanitizer=address` (detected by the build
//! script as `cfg(asan)`) a block is poisoned when it enters a free list and
//! unpoisoned when it leaves it, so such a write is reported as
//! `use-after-poison`. In every other build these functions are empty.
//!
//! ASan tracks 8-byte granules: the tail of a block whose size is not a
//! multiple of 8 may stay addressable.

use core::ptr::NonNull;

#[cfg(asan)]
unsafe extern "C" {
    fn __asan_poison_memory_region(addr: *const u8, size: usize);
    fn __asan_unpoison_memory_region(addr: *const u8, size: usize);
}

/// Marks `size` bytes at `block` as unaddressable: the caller owns them and
/// will not touch them until [`unpoison`].
#[inline]
pub(crate) fn poison(block: NonNull<u8>, size: usize) {
    #[cfg(asan)]
    // SAFETY: the ASan runtime only updates its shadow memory for the range;
    // the caller owns it, so no other live object is hidden.
    unsafe {
        __asan_poison_memory_region(block.as_ptr(), size)
    };
    #[cfg(not(asan))]
    let _ = (block, size);
}

/// Marks `size` bytes at `block` as addressable again.
#[inline]
pub(crate) fn unpoison(block: NonNull<u8>, size: usize) {
    #[cfg(asan)]
    // SAFETY: as for `poison`.
    unsafe {
        __asan_unpoison_memory_region(block.as_ptr(), size)
    };
    #[cfg(not(asan))]
    let _ = (block, size);
}

/// [`poison`] for `size` bytes at the address `addr` (best fit works on
/// addresses; ASan only needs the address, nothing is dereferenced).
#[inline]
pub(crate) fn poison_at(addr: usize, size: usize) {
    if let Some(block) = NonNull::new(core::ptr::with_exposed_provenance_mut(addr)) {
        poison(block, size);
    }
}

/// [`unpoison`] for `size` bytes at the address `addr`.
#[inline]
pub(crate) fn unpoison_at(addr: usize, size: usize) {
    if let Some(block) = NonNull::new(core::ptr::with_exposed_provenance_mut(addr)) {
        unpoison(block, size);
    }
}

//! Size policy: how a `Layout` maps to a free list and to the layout of the
//! block taken from the backing allocator.
//!
//! Every block is taken with an alignment of at least [`MIN_ALIGN`] (c10
//! allocates every CPU block 64-byte aligned), so all requests with a small
//! alignment share one free list per size. The backing layout is a pure
//! function of the key, which is what guarantees that a block goes back to the
//! backing allocator with exactly the layout it was taken with: no per-block
//! record is needed.

use core::alloc::Layout;

/// The alignment every cached block has at least (a cache line; c10's choice).
pub const MIN_ALIGN: usize = 64;

/// A free list: blocks of one size and one alignment class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// Size of the block in the backing allocator.
    pub(crate) size: usize,
    /// `max(layout.align(), MIN_ALIGN)`.
    pub(crate) align: usize,
}

impl Key {
    /// The free list for `layout`, or `None` if no block can be made for it
    /// (the size, raised to the alignment class, would exceed `isize::MAX`).
    ///
    /// `layout` must not be zero-sized; zero-sized requests never reach the
    /// cache.
    #[inline]
    pub(crate) fn for_layout(layout: Layout) -> Option<Key> {
        let align = if layout.align() > MIN_ALIGN {
            layout.align()
        } else {
            MIN_ALIGN
        };
        // Same check as `Layout::from_size_align`: size rounded up to `align`
        // must not overflow `isize`.
        if layout.size() > isize::MAX as usize - (align - 1) {
            return None;
        }
        Some(Key {
            size: layout.size(),
            align,
        })
    }

    /// The layout the block is taken from and given back to the backing
    /// allocator with.
    #[inline]
    pub(crate) fn block_layout(self) -> Layout {
        // `for_layout` checked what `from_size_align` checks, and `align` is a
        // power of two (the larger of two powers of two).
        match Layout::from_size_align(self.size, self.align) {
            Ok(layout) => layout,
            // Unreachable by construction; a zero-sized layout would be
            // returned, which `for_layout` never produces for a key.
            Err(_) => Layout::new::<()>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_alignments_share_a_class() {
        let a = Key::for_layout(Layout::from_size_align(100, 1).unwrap()).unwrap();
        let b = Key::for_layout(Layout::from_size_align(100, 64).unwrap()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.block_layout(), Layout::from_size_align(100, 64).unwrap());
    }

    #[test]
    fn large_alignments_get_their_own_class() {
        let a = Key::for_layout(Layout::from_size_align(100, 64).unwrap()).unwrap();
        let b = Key::for_layout(Layout::from_size_align(100, 4096).unwrap()).unwrap();
        assert_ne!(a, b);
        assert_eq!(b.block_layout().align(), 4096);
    }

    #[test]
    fn absurd_sizes_have_no_key() {
        let layout = Layout::from_size_align(isize::MAX as usize - 7, 8).unwrap();
        assert_eq!(Key::for_layout(layout), None);
        let fits = Layout::from_size_align(isize::MAX as usize - 63, 8).unwrap();
        assert!(Key::for_layout(fits).is_some());
    }
}

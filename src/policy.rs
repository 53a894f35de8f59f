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

/// Small requests are rounded up to a multiple of this under
/// [`SizePolicy::PowerOfTwoDivisions`].
pub const SIZE_GRANULARITY: usize = 64;

/// Which block size serves a request: the request's own size, or a size class
/// shared by nearby sizes.
///
/// | policy | use it for | cost |
/// |---|---|---|
/// | `Exact` (default, c10's) | static shapes: the same sizes every pass | none: a block is exactly the size asked for |
/// | `PowerOfTwoDivisions(n)` | dynamic shapes (variable sequence length, a growing KV cache) | up to `1/n` of a block lost to rounding |
/// | `BestFit` | memory held close to peak live, static or dynamic shapes | a few hash and bin operations per allocation and free (50–80 ns a hit pair against 33) |
///
/// # Examples
///
/// ```
/// use caching_allocator::SizePolicy;
///
/// let classes = SizePolicy::PowerOfTwoDivisions(4);
/// assert_eq!(classes.block_size(1000), Some(1024)); // [512, 1024) in steps of 128
/// assert_eq!(classes.block_size(1025), Some(1280)); // [1024, 2048) in steps of 256
/// assert_eq!(classes.block_size(8), Some(64)); // small sizes: multiples of 64
/// assert_eq!(SizePolicy::Exact.block_size(1000), Some(1000));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SizePolicy {
    /// Blocks of exactly the requested size: a free block serves only a
    /// request of the same size (and alignment class). c10's policy.
    #[default]
    Exact,
    /// Each power-of-two interval `[2^k, 2^(k+1))` is split into `n` equal
    /// steps and a request is rounded up to the next step (PyTorch's
    /// `roundup_power2_divisions`); steps are never finer than
    /// [`SIZE_GRANULARITY`]. Any request of a class reuses any block of it.
    /// `n` is rounded up to a power of two; 0 is taken as 1 (one class per
    /// power of two).
    PowerOfTwoDivisions(u32),
    /// Blocks carved out of large segments: a request takes the smallest free
    /// range that fits (rounded up to [`MIN_ALIGN`]), split when the rest is
    /// worth keeping; a freed block merges with its free neighbours. On Linux
    /// a cache built with `Builder::build` reserves one address range and
    /// grows it in place, so it holds close to its peak live bytes; built with
    /// `build_in(backing)` it takes fixed segments from `backing`. See the
    /// crate's README for when to pick it.
    BestFit,
}

impl SizePolicy {
    /// The size of the block that serves a request of `size` bytes, or
    /// `None` if it would overflow.
    #[inline]
    pub fn block_size(self, size: usize) -> Option<usize> {
        match self {
            SizePolicy::Exact => Some(size),
            SizePolicy::BestFit => size.checked_next_multiple_of(MIN_ALIGN),
            SizePolicy::PowerOfTwoDivisions(divisions) => {
                if size <= SIZE_GRANULARITY {
                    return Some(SIZE_GRANULARITY);
                }
                let divisions = (divisions.max(1) as usize)
                    .checked_next_power_of_two()
                    .unwrap_or(1 << (usize::BITS - 1));
                // The power of two at or below `size`.
                let interval = 1usize << (usize::BITS - 1 - size.leading_zeros());
                let step = (interval / divisions).max(SIZE_GRANULARITY);
                size.checked_next_multiple_of(step)
            }
        }
    }
}

/// A free list: blocks of one size and one alignment class. It holds the
/// layout its blocks are taken from and given back to the backing allocator
/// with, so that layout exists by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// Size: the policy's block size; alignment: `max(request's, MIN_ALIGN)`.
    block: Layout,
}

impl Key {
    /// The free list for `layout` under `policy`, or `None` if no block can be
    /// made for it (the block size overflows, or raised to the alignment
    /// class exceeds `isize::MAX`).
    ///
    /// `layout` must not be zero-sized; zero-sized requests never reach the
    /// cache.
    #[inline]
    pub(crate) fn for_layout(layout: Layout, policy: SizePolicy) -> Option<Key> {
        let align = layout.align().max(MIN_ALIGN);
        let size = policy.block_size(layout.size())?;
        let block = Layout::from_size_align(size, align).ok()?;
        Some(Key { block })
    }

    /// The size of the key's blocks.
    /// The key of a block of exactly `block`'s layout (a front cache's
    /// packed key, unpacked): `None` below the minimum alignment.
    #[inline]
    pub(crate) fn for_block(block: Layout) -> Option<Key> {
        (block.align() >= MIN_ALIGN).then_some(Key { block })
    }

    #[inline]
    pub(crate) fn size(self) -> usize {
        self.block.size()
    }

    /// The layout the block is taken from and given back to the backing
    /// allocator with.
    #[inline]
    pub(crate) fn block_layout(self) -> Layout {
        self.block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXACT: SizePolicy = SizePolicy::Exact;

    #[test]
    fn small_alignments_share_a_class() {
        let a = Key::for_layout(Layout::from_size_align(100, 1).unwrap(), EXACT).unwrap();
        let b = Key::for_layout(Layout::from_size_align(100, 64).unwrap(), EXACT).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.block_layout(), Layout::from_size_align(100, 64).unwrap());
    }

    #[test]
    fn large_alignments_get_their_own_class() {
        let a = Key::for_layout(Layout::from_size_align(100, 64).unwrap(), EXACT).unwrap();
        let b = Key::for_layout(Layout::from_size_align(100, 4096).unwrap(), EXACT).unwrap();
        assert_ne!(a, b);
        assert_eq!(b.block_layout().align(), 4096);
    }

    #[test]
    fn absurd_sizes_have_no_key() {
        let layout = Layout::from_size_align(isize::MAX as usize - 7, 8).unwrap();
        assert_eq!(Key::for_layout(layout, EXACT), None);
        let fits = Layout::from_size_align(isize::MAX as usize - 63, 8).unwrap();
        assert!(Key::for_layout(fits, EXACT).is_some());
        let rounded = SizePolicy::PowerOfTwoDivisions(4);
        assert_eq!(Key::for_layout(fits, rounded), None);
        assert_eq!(rounded.block_size(usize::MAX), None);
    }

    #[test]
    fn classes_split_each_power_of_two_into_equal_steps() {
        let p = SizePolicy::PowerOfTwoDivisions(4);
        // [4096, 8192) in steps of 1024.
        let classes: Vec<usize> = [4096, 4097, 5120, 5121, 8191, 8192]
            .iter()
            .map(|&s| p.block_size(s).unwrap())
            .collect();
        assert_eq!(classes, [4096, 5120, 5120, 6144, 8192, 8192]);
        // Steps are at least the granularity.
        assert_eq!(p.block_size(65), Some(128));
        assert_eq!(p.block_size(200), Some(256));
        // One division: powers of two.
        assert_eq!(
            SizePolicy::PowerOfTwoDivisions(1).block_size(3000),
            Some(4096)
        );
        assert_eq!(
            SizePolicy::PowerOfTwoDivisions(0).block_size(3000),
            Some(4096)
        );
        // Non-powers of two round up: 3 acts as 4.
        assert_eq!(
            SizePolicy::PowerOfTwoDivisions(3).block_size(4097),
            Some(5120)
        );
    }

    #[test]
    fn every_class_holds_its_requests_and_wastes_at_most_one_step() {
        for divisions in [1, 2, 4, 8, 16] {
            let p = SizePolicy::PowerOfTwoDivisions(divisions);
            let mut size = 1usize;
            while size < 1 << 40 {
                for s in [size, size + 1, size * 3 / 2 + 7] {
                    let class = p.block_size(s).unwrap();
                    assert!(class >= s);
                    assert_eq!(p.block_size(class), Some(class), "a class is its own class");
                    let step =
                        (s.next_power_of_two() / 2 / divisions as usize).max(SIZE_GRANULARITY);
                    assert!(class - s < step.max(SIZE_GRANULARITY), "{s} -> {class}");
                }
                size *= 2;
            }
        }
    }
}

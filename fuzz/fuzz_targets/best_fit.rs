//! Operation sequences on one `SizePolicy::BestFit` cache: allocations of up
//! to 1 MiB at alignments up to 4096, frees, grows, shrinks, trims and
//! releases. The input's first byte picks how the cache gets its memory:
//! `build()` (on Linux, a reserved address range grown, uncommitted and
//! decommitted in place), `build_in(Global)` (fixed segments), or
//! `build_in` a checking backing (fixed segments, a ledger that catches a
//! segment given back twice or with another layout, and allocations that
//! fail on a schedule).
//!
//! Every block holds a pattern derived from its id, checked before it is
//! freed or resized, after a resize, and for every live block after a trim
//! or a release (a page decommitted under a live block reads as zeros). After
//! every step: `bytes_in_use + bytes_lost_to_rounding + bytes_cached ==
//! bytes_reserved`, the in-use counters match the live blocks, the rounding
//! is what best fit allows (the size rounded to 64, plus a tail under 512
//! bytes that was not worth splitting off), live blocks are aligned and
//! disjoint, and a cap is kept as far as shedding can. At the end everything
//! is freed and released: nothing may stay reserved.
#![no_main]

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::OnceLock;

use allocator_api2::alloc::{Allocator, Global};
use arbitrary::Arbitrary;
use caching_allocator::{CachingAllocator, FrontKind, SizePolicy, Stats};
use fuzz_support::{Backing, Ledgers, align_from, assert_disjoint};
use libfuzzer_sys::fuzz_target;

/// The largest request: 1 MiB.
const MAX_SIZE: usize = 1 << 20;
/// Best fit rounds every block to a multiple of this.
const UNIT: usize = 64;
/// A free tail shorter than this stays with its block (`free_ranges::SPLIT_MIN`),
/// so a block exceeds its rounded size by at most `SPLIT_MIN - UNIT`.
const SPLIT_MIN: usize = 512;

/// Sizes: from the input's palette (so that freed ranges get reused
/// exactly), small, medium, or anything up to 1 MiB.
#[derive(Clone, Copy, Debug, Arbitrary)]
enum Size {
    Palette(u8),
    /// 0..=4096 bytes.
    Small(u16),
    /// 0..65536 bytes.
    Medium(u16),
    /// 0..=1 MiB.
    Large(u32),
}

impl Size {
    fn bytes(self, palette: &[u32; 4]) -> usize {
        match self {
            Size::Palette(i) => palette[i as usize % 4] as usize % (MAX_SIZE + 1),
            Size::Small(s) => s as usize % 4097,
            Size::Medium(s) => s as usize,
            Size::Large(s) => s as usize % (MAX_SIZE + 1),
        }
    }
}

/// Offsets of block patterns in [`table`]: block `id`'s byte `i` is
/// `table()[offset(id) + i]`.
const OFFSETS: usize = 1 << 16;

/// Pseudo-random bytes, enough for a pattern of `MAX_SIZE` bytes at any
/// offset. Blocks reach 1 MiB: their patterns are written and checked with
/// `memcpy` and `memcmp` (a byte loop like `fuzz_support::fill`, with
/// libFuzzer's comparison tracing, made this target ten times slower).
fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        (0..MAX_SIZE + OFFSETS)
            .map(|_| {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    })
}

/// Where block `id`'s pattern starts in [`table`]: distinct for the first
/// 65536 ids (4099 is odd).
fn offset(id: u64) -> usize {
    (id as usize).wrapping_mul(4099) % OFFSETS
}

/// Writes block `id`'s pattern over `range` of the block at `ptr`.
///
/// # Safety
///
/// `ptr .. ptr + range.end` is writable and ours.
unsafe fn fill(ptr: *mut u8, id: u64, range: std::ops::Range<usize>) {
    let pattern = &table()[offset(id) + range.start..offset(id) + range.end];
    // SAFETY: the caller's contract; the table is not the block.
    unsafe {
        ptr.add(range.start)
            .copy_from_nonoverlapping(pattern.as_ptr(), pattern.len())
    };
}

/// Checks block `id`'s pattern over `range` of the block at `ptr`.
///
/// # Safety
///
/// `ptr .. ptr + range.end` is readable.
unsafe fn check(ptr: *const u8, id: u64, range: std::ops::Range<usize>, what: &str) {
    let expected = &table()[offset(id) + range.start..offset(id) + range.end];
    // SAFETY: the caller's contract.
    let found = unsafe { std::slice::from_raw_parts(ptr.add(range.start), range.len()) };
    if found != expected {
        let i = (0..range.len()).find(|&i| found[i] != expected[i]).unwrap();
        panic!(
            "{what}: block {id} at {ptr:p} byte {} is {:#04x}, expected {:#04x}",
            range.start + i,
            found[i],
            expected[i]
        );
    }
}

/// Checks that `range` of the block at `ptr` reads zero.
///
/// # Safety
///
/// `ptr .. ptr + range.end` is readable.
unsafe fn check_zero(ptr: *const u8, range: std::ops::Range<usize>, what: &str) {
    static ZEROS: [u8; 4096] = [0; 4096];
    // SAFETY: the caller's contract.
    let found = unsafe { std::slice::from_raw_parts(ptr.add(range.start), range.len()) };
    for (n, chunk) in found.chunks(ZEROS.len()).enumerate() {
        if chunk != &ZEROS[..chunk.len()] {
            let i = chunk.iter().position(|&b| b != 0).unwrap();
            panic!(
                "{what}: byte {} of a zeroed block at {ptr:p} is {:#04x}",
                range.start + n * ZEROS.len() + i,
                chunk[i]
            );
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    Allocate {
        size: Size,
        align_log2: u8,
        zeroed: bool,
    },
    Free {
        index: u8,
    },
    Grow {
        index: u8,
        by: Size,
        align_log2: Option<u8>,
        zeroed: bool,
    },
    Shrink {
        index: u8,
        to: Size,
        align_log2: Option<u8>,
    },
    Trim {
        /// Cached bytes to keep: `target % 2 MiB`.
        target: u32,
    },
    ReleaseCached,
    /// Checks every live block's pattern.
    CheckAll,
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// `% 3`: 0 `build()`, 1 `build_in(Global)`, 2 `build_in` the checking
    /// backing. The first byte of the input.
    source: u8,
    /// A cap below 4 MiB.
    cap: Option<u32>,
    /// Checking backing only: stop caching after a failed allocation.
    stop_caching_after_failure: bool,
    /// Checking backing only: bit n set, its n-th allocation fails.
    failures: [u8; 4],
    palette: [u32; 4],
    ops: Vec<Op>,
}

/// The three ways the cache gets its memory.
enum Cache {
    Built(CachingAllocator),
    Global(CachingAllocator<Global>),
    Checked(CachingAllocator<Backing>),
}

macro_rules! with {
    ($cache:expr, $c:ident => $body:expr) => {
        match $cache {
            Cache::Built($c) => $body,
            Cache::Global($c) => $body,
            Cache::Checked($c) => $body,
        }
    };
}

struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
    id: u64,
}

struct World {
    cache: Cache,
    /// The checking backing's ledger (owner 0), if the cache is on it.
    ledgers: Option<Ledgers>,
    cap: Option<usize>,
    blocks: Vec<Block>,
    next_id: u64,
}

impl World {
    fn stats(&self) -> Stats {
        with!(&self.cache, c => c.stats())
    }

    fn may_fail(&self) -> bool {
        self.ledgers.as_ref().is_some_and(Ledgers::may_fail)
    }

    fn trim(&self, target: usize) -> usize {
        with!(&self.cache, c => c.trim(target))
    }

    fn release_cached(&self) -> usize {
        with!(&self.cache, c => c.release_cached())
    }

    /// # Safety
    ///
    /// As `Allocator::deallocate`.
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: the caller's contract.
        with!(&self.cache, c => unsafe { c.deallocate(ptr, layout) })
    }

    fn check_all(&self, what: &str) {
        for block in &self.blocks {
            // SAFETY: a live block of ours with `layout.size()` bytes.
            unsafe { check(block.ptr.as_ptr(), block.id, 0..block.layout.size(), what) };
        }
    }

    /// The invariants, after every step.
    fn check(&self) {
        let s = self.stats();
        assert_eq!(
            s.bytes_in_use + s.bytes_lost_to_rounding + s.bytes_cached,
            s.bytes_reserved,
            "in use + rounding + cached != reserved: {s:?}"
        );
        let live = self.blocks.iter().filter(|b| b.layout.size() > 0);
        let (mut blocks, mut bytes, mut rounding) = (0, 0, 0);
        for block in live {
            blocks += 1;
            bytes += block.layout.size();
            rounding += block.layout.size().next_multiple_of(UNIT) - block.layout.size();
        }
        assert_eq!(s.blocks_in_use, blocks, "blocks in use: {s:?}");
        assert_eq!(s.bytes_in_use, bytes, "bytes in use: {s:?}");
        assert!(
            s.bytes_lost_to_rounding >= rounding
                && s.bytes_lost_to_rounding <= rounding + blocks * (SPLIT_MIN - UNIT),
            "rounding {} outside [{rounding}, +{} a block]: {s:?}",
            s.bytes_lost_to_rounding,
            SPLIT_MIN - UNIT
        );
        assert!(s.bytes_pinned <= s.bytes_cached, "pinned: {s:?}");
        assert!(s.peak_bytes_reserved >= s.bytes_reserved);
        assert!(s.peak_bytes_cached >= s.bytes_cached);
        assert!(s.peak_bytes_in_use >= s.bytes_in_use);
        if let Some(ledgers) = &self.ledgers {
            assert_eq!(
                ledgers.live_bytes(0),
                s.bytes_reserved,
                "the backing holds other than bytes_reserved: {s:?}"
            );
            for block in self.blocks.iter().filter(|b| b.layout.size() > 0) {
                let addr = block.ptr.as_ptr() as usize;
                assert!(
                    ledgers.containing(addr, block.layout.size()).is_some(),
                    "block {} is not inside a live segment",
                    block.id
                );
            }
        }
        for block in &self.blocks {
            assert_eq!(
                block.ptr.as_ptr() as usize % block.layout.align(),
                0,
                "misaligned block {}",
                block.id
            );
        }
        assert_disjoint(
            self.blocks
                .iter()
                .map(|b| (b.ptr.as_ptr() as usize, b.layout.size())),
            "best_fit",
        );
        // Over the cap (or caching stopped) only by what cannot be shed: a
        // trim down to it finds nothing more to give back. With per-CPU
        // fronts (best fit's default) a freed block may sit in a CPU's front,
        // which the cap counts as in use and which pins its segment's free
        // bytes (docs/fronts.md: the cap bounds the arena, the fronts hold at
        // most `PER_CPU_FRONT_BYTES` a CPU more); a trim drains them, so
        // there one trim must reach the cap and a second find nothing.
        let stopped = with!(&self.cache, c => c.is_caching_stopped());
        let limit = if stopped { Some(0) } else { self.cap };
        if let Some(limit) = limit
            && s.bytes_cached > limit
        {
            if with!(&self.cache, c => c.front_kind()) == FrontKind::PerCpu {
                self.trim(limit);
            }
            let shed = self.trim(limit);
            assert_eq!(shed, 0, "over the cap {limit} after settling: {s:?}");
        }
    }

    fn free(&mut self, index: usize) {
        let block = self.blocks.swap_remove(index);
        // SAFETY: a live block of ours with its layout.
        unsafe {
            check(
                block.ptr.as_ptr(),
                block.id,
                0..block.layout.size(),
                "before free",
            );
            self.deallocate(block.ptr, block.layout);
        }
    }

    fn run(&mut self, op: &Op, palette: &[u32; 4]) {
        match *op {
            Op::Allocate {
                size,
                align_log2,
                zeroed,
            } => {
                let layout =
                    Layout::from_size_align(size.bytes(palette), align_from(align_log2)).unwrap();
                let before = self.stats();
                let result = with!(&self.cache, c => if zeroed {
                    c.allocate_zeroed(layout)
                } else {
                    c.allocate(layout)
                });
                let after = self.stats();
                match result {
                    Ok(block) => {
                        assert!(block.len() >= layout.size());
                        let ptr = block.cast::<u8>();
                        if layout.size() > 0 {
                            assert_eq!(
                                after.hits + after.misses,
                                before.hits + before.misses + 1,
                                "an allocation is a hit or a miss"
                            );
                        }
                        let id = self.next_id;
                        self.next_id += 1;
                        // SAFETY: a fresh block of `layout.size()` bytes.
                        unsafe {
                            if zeroed {
                                check_zero(ptr.as_ptr(), 0..layout.size(), "allocate_zeroed");
                            }
                            fill(ptr.as_ptr(), id, 0..layout.size());
                        }
                        self.blocks.push(Block { ptr, layout, id });
                    }
                    Err(_) => {
                        assert!(
                            self.may_fail(),
                            "allocation failed with no failure scheduled"
                        );
                        assert!(layout.size() > 0);
                        assert_eq!(after.failures, before.failures + 1);
                    }
                }
            }
            Op::Free { index } => {
                if !self.blocks.is_empty() {
                    let index = index as usize % self.blocks.len();
                    self.free(index);
                }
            }
            Op::Grow {
                index,
                by,
                align_log2,
                zeroed,
            } => {
                if self.blocks.is_empty() {
                    return;
                }
                let index = index as usize % self.blocks.len();
                let (ptr, old, id) = {
                    let b = &self.blocks[index];
                    (b.ptr, b.layout, b.id)
                };
                let size = (old.size() + by.bytes(palette))
                    .min(MAX_SIZE)
                    .max(old.size());
                let align = align_log2.map_or(old.align(), align_from);
                let new = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a live block of this cache, allocated for `old`;
                // `new` is at least as large.
                let result = unsafe {
                    check(ptr.as_ptr(), id, 0..old.size(), "before grow");
                    with!(&self.cache, c => if zeroed {
                        c.grow_zeroed(ptr, old, new)
                    } else {
                        c.grow(ptr, old, new)
                    })
                };
                self.resized(index, result, new, zeroed, "grow");
            }
            Op::Shrink {
                index,
                to,
                align_log2,
            } => {
                if self.blocks.is_empty() {
                    return;
                }
                let index = index as usize % self.blocks.len();
                let (ptr, old, id) = {
                    let b = &self.blocks[index];
                    (b.ptr, b.layout, b.id)
                };
                let size = to.bytes(palette) % (old.size() + 1);
                let align = align_log2.map_or(old.align(), align_from);
                let new = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a live block of this cache, allocated for `old`;
                // `new` is at most as large.
                let result = unsafe {
                    check(ptr.as_ptr(), id, 0..old.size(), "before shrink");
                    with!(&self.cache, c => c.shrink(ptr, old, new))
                };
                self.resized(index, result, new, false, "shrink");
            }
            Op::Trim { target } => {
                let target = target as usize % (2 << 20);
                let before = self.stats();
                let shed = self.trim(target);
                let after = self.stats();
                assert!(shed <= before.bytes_cached, "trimmed more than cached");
                assert_eq!(
                    after.bytes_cached,
                    before.bytes_cached - shed,
                    "a trim's return is what left the cache"
                );
                assert_eq!(after.bytes_in_use, before.bytes_in_use);
                if after.bytes_cached > target {
                    // Only what cannot be shed stays: a second trim finds
                    // nothing.
                    assert_eq!(self.trim(target), 0, "a second trim shed more: {after:?}");
                }
                self.check_all("after trim");
            }
            Op::ReleaseCached => {
                let before = self.stats();
                let released = self.release_cached();
                let after = self.stats();
                assert_eq!(
                    after.bytes_cached,
                    before.bytes_cached - released,
                    "release's return is what left the cache: {before:?} {after:?}"
                );
                assert!(
                    after.bytes_cached <= after.bytes_pinned + after.blocks_cached * 2 * 4096,
                    "a release keeps only pinned bytes and partial pages: {after:?}"
                );
                if self.blocks.iter().all(|b| b.layout.size() == 0) {
                    assert_eq!(
                        after.bytes_reserved, 0,
                        "released with nothing live: {after:?}"
                    );
                }
                self.check_all("after release_cached");
            }
            Op::CheckAll => self.check_all("check all"),
        }
    }

    fn resized(
        &mut self,
        index: usize,
        result: Result<NonNull<[u8]>, allocator_api2::alloc::AllocError>,
        new: Layout,
        zeroed: bool,
        what: &str,
    ) {
        let may_fail = self.may_fail();
        let block = &mut self.blocks[index];
        let old = block.layout;
        match result {
            Ok(moved) => {
                assert!(moved.len() >= new.size());
                let ptr = moved.cast::<u8>();
                let kept = old.size().min(new.size());
                // SAFETY: the resized block, `new.size()` bytes, ours.
                unsafe {
                    check(ptr.as_ptr(), block.id, 0..kept, what);
                    if zeroed {
                        check_zero(ptr.as_ptr(), kept..new.size(), what);
                    }
                    fill(ptr.as_ptr(), block.id, kept..new.size());
                }
                block.ptr = ptr;
                block.layout = new;
            }
            Err(_) => {
                assert!(may_fail, "{what} failed with no failure scheduled");
                // SAFETY: on failure the old block stays live and untouched.
                unsafe {
                    check(
                        block.ptr.as_ptr(),
                        block.id,
                        0..old.size(),
                        "after a failed resize",
                    )
                };
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let cap = input.cap.map(|c| c as usize % (4 << 20));
    let mut builder = CachingAllocator::builder().size_policy(SizePolicy::BestFit);
    if let Some(cap) = cap {
        builder = builder.max_cached_bytes(cap);
    }
    let (cache, ledgers) = match input.source % 3 {
        0 => (Cache::Built(builder.build()), None),
        1 => (Cache::Global(builder.build_in(Global)), None),
        _ => {
            let ledgers = Ledgers::new(input.failures.to_vec());
            let cache = builder
                .stop_caching_after_failure(input.stop_caching_after_failure)
                .build_in(ledgers.backing(0));
            (Cache::Checked(cache), Some(ledgers))
        }
    };
    assert_eq!(with!(&cache, c => c.size_policy()), SizePolicy::BestFit);
    let mut world = World {
        cache,
        ledgers,
        cap,
        blocks: Vec::new(),
        next_id: 1,
    };
    world.check();
    for op in input.ops.iter().take(256) {
        world.run(op, &input.palette);
        world.check();
    }

    // Free everything and release: nothing may stay reserved.
    while let Some(last) = world.blocks.len().checked_sub(1) {
        world.free(last);
        world.check();
    }
    world.release_cached();
    let s = world.stats();
    assert_eq!(
        (
            s.bytes_reserved,
            s.bytes_cached,
            s.bytes_in_use,
            s.bytes_lost_to_rounding
        ),
        (0, 0, 0, 0),
        "reserved after freeing and releasing everything: {s:?}"
    );
    assert_eq!(s.blocks_in_use, 0);
    world.check();
    if let Some(ledgers) = &world.ledgers {
        assert_eq!(ledgers.live_bytes(0), 0);
        assert_eq!(
            ledgers.total_live_blocks(),
            0,
            "the backing still holds segments"
        );
    }
    drop(world);
});

//! `SizePolicy::BestFit` over both of its segment sources: a reserved,
//! growing address range (`Builder::build`, Linux) and fixed segments taken
//! from a backing allocator (`Builder::build_in`, here the ledger backing
//! `Counting`, which checks every segment comes back once with its layout).
//!
//! - A property test runs random sequences of allocations (1 byte to ~3 MiB,
//!   alignments 1 to 4096, some zeroed), frees, grows and shrinks (through
//!   allocator-api2's `grow`, `grow_zeroed`, `shrink`), trims and releases,
//!   and after every step checks: no two live blocks overlap, every live
//!   block holds what was written into it (sampled every step, in full when it
//!   is freed or resized and at the end), blocks are aligned, zeroed blocks
//!   are zero, and the counters agree with the model (bytes and blocks in
//!   use, hits + misses = blocks carved, frees, the stats invariant
//!   `in use + lost to rounding + cached == reserved`, the rounding within a
//!   block's slack; over fixed segments the ledger holds exactly
//!   `bytes_reserved`, and after a trim or release at most
//!   `max(target, bytes_pinned)` stays cached). At the end everything is
//!   freed and released: nothing may stay reserved, and every fixed segment
//!   went back exactly once.
//! - Targeted tests: a trim or release with nothing live leaves nothing
//!   reserved; the cap bounds the cached bytes after every free; a refusing
//!   backing gives `AllocError` and leaks nothing; two caches on one budget
//!   reconcile with it after every operation; the counters after a known
//!   sequence; which free range best fit picks, and coalescing.
//!
//! Under Miri: the fixed-segment property test at 4 cases with sizes up to
//! 64 KiB, and the targeted tests on fixed segments (Miri has no `mmap`, so
//! `build()` falls back to fixed segments from the global allocator there).
//! `PROPTEST_CASES` sets the number of cases natively.

use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};
use caching_allocator::{Budget, Builder, CachingAllocator, SizePolicy, Stats};
use proptest::prelude::*;

use crate::fixture::{Counting, Rng, assert_ledger_agrees};

/// The page size the cache rounds commits, decommits and fixed segments to:
/// the system's.
fn page() -> usize {
    #[cfg(all(target_os = "linux", not(miri)))]
    // SAFETY: `sysconf` reads a constant.
    return unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    #[cfg(not(all(target_os = "linux", not(miri))))]
    4096
}
/// A free tail shorter than this stays with its block.
const SPLIT_MIN: usize = 512;
/// The smallest fixed segment.
const MIN_SEGMENT: usize = 256 << 10;
/// The most a block may hold beyond its request rounded to 64: a tail too
/// small to split off (ranges are multiples of 64 bytes).
const MAX_SLACK: usize = SPLIT_MIN - 64;

/// The largest request the tests make.
#[cfg(not(miri))]
const MAX_SIZE: usize = 3 << 20;
#[cfg(miri)]
const MAX_SIZE: usize = 64 << 10;

/// A best-fit cache without front caches: these tests follow the arena
/// itself (where each free range goes, what a shed gives back). The default
/// fronts have their own suite (`per_cpu.rs`).
fn best_fit() -> Builder {
    CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .front_cache_bytes(0)
}

/// A best-fit cache over fixed segments from a new ledger backing.
fn fixed_with(builder: Builder) -> (CachingAllocator<Counting>, Counting) {
    let backing = Counting::new();
    (builder.build_in(backing.clone()), backing)
}

fn fixed() -> (CachingAllocator<Counting>, Counting) {
    fixed_with(best_fit())
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

fn rounded(size: usize) -> usize {
    size.next_multiple_of(64)
}

/// The period of the byte pattern: a prime, so the pattern never lines up
/// with pages or blocks.
const PERIOD: usize = 65521;

/// The pattern blocks are filled with: byte `i` of a block of seed `seed` is
/// `table[(seed + i) % PERIOD]`, so a copy to the wrong offset or a page that
/// went back shows up. Built by the compiler, not at run time (under Miri,
/// 65,521 steps).
static TABLE: [u8; PERIOD] = {
    let mut table = [0; PERIOD];
    let mut i = 0;
    while i < PERIOD {
        table[i] = (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8);
        i += 1;
    }
    table
};

fn table() -> &'static [u8] {
    &TABLE
}

fn expected_byte(seed: u8, index: usize) -> u8 {
    table()[(usize::from(seed) + index) % PERIOD]
}

/// The pattern's chunks for `len` bytes from offset 0: `(offset, bytes)`.
fn chunks(seed: u8, len: usize) -> impl Iterator<Item = (usize, &'static [u8])> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        (offset < len).then(|| {
            let at = (usize::from(seed) + offset) % PERIOD;
            let chunk = (PERIOD - at).min(len - offset);
            let piece = (offset, &table()[at..at + chunk]);
            offset += chunk;
            piece
        })
    })
}

/// Fills `bytes` with the pattern of `seed`.
fn write_pattern(bytes: &mut [u8], seed: u8) {
    for (offset, chunk) in chunks(seed, bytes.len()) {
        bytes[offset..offset + chunk.len()].copy_from_slice(chunk);
    }
}

/// Whether `bytes` hold the pattern of `seed`.
fn holds_pattern(bytes: &[u8], seed: u8) -> bool {
    chunks(seed, bytes.len()).all(|(offset, chunk)| &bytes[offset..offset + chunk.len()] == chunk)
}

fn is_zero(bytes: &[u8]) -> bool {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    bytes
        .chunks(ZEROS.len())
        .all(|chunk| chunk == &ZEROS[..chunk.len()])
}

/// `stats`' byte counts agree: what is in use, lost to rounding and cached
/// is what is reserved.
#[track_caller]
fn assert_invariant(stats: &Stats) {
    assert_eq!(
        stats.bytes_in_use + stats.bytes_lost_to_rounding + stats.bytes_cached,
        stats.bytes_reserved,
        "in use + lost + cached != reserved: {stats:?}"
    );
}

/// Nothing cached, nothing reserved.
#[track_caller]
fn assert_empty(stats: &Stats) {
    assert_eq!(
        (
            stats.bytes_reserved,
            stats.bytes_cached,
            stats.blocks_cached,
            stats.bytes_decommitted,
            stats.bytes_pinned
        ),
        (0, 0, 0, 0, 0),
        "{stats:?}"
    );
}

/// A live block and what was written into it.
struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Its contents are the pattern of `seed` (`write_pattern`).
    seed: u8,
}

impl Block {
    fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: a live block of `layout.size()` bytes, initialised when it
        // was handed out (`fill`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn fill(&mut self) {
        // SAFETY: a live block of `layout.size()` bytes, ours alone.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) };
        write_pattern(bytes, self.seed);
    }

    #[track_caller]
    fn check_all(&self) {
        assert!(
            holds_pattern(self.bytes(), self.seed),
            "contents of block {:#x} ({:?}) changed",
            self.addr(),
            self.layout
        );
    }

    /// The first and last 64 bytes and a byte every 1021 (so every page):
    /// a page dropped or handed to someone else shows.
    #[track_caller]
    fn check_sampled(&self) {
        let size = self.layout.size();
        let bytes = self.bytes();
        let sampled = (0..size.min(64))
            .chain(size.saturating_sub(64)..size)
            .chain((0..size).step_by(1021))
            .all(|index| bytes[index] == expected_byte(self.seed, index));
        assert!(
            sampled,
            "contents of block {:#x} ({:?}) changed",
            self.addr(),
            self.layout
        );
    }
}

/// Picks one of `len` live blocks; shrinks to the first.
#[derive(Clone, Copy, Debug)]
struct Pick(usize);

impl Pick {
    fn of(self, len: usize) -> usize {
        self.0 % len
    }
}

#[derive(Clone, Debug)]
enum Op {
    Allocate {
        size: usize,
        align: usize,
        zeroed: bool,
    },
    Free(Pick),
    /// `grow` (or `grow_zeroed`) by `by` bytes, to `align` if given.
    Grow {
        pick: Pick,
        by: usize,
        align: Option<usize>,
        zeroed: bool,
    },
    /// `shrink` to `permille`/1000 of the size (at least 1 byte), to `align`
    /// if given.
    Shrink {
        pick: Pick,
        permille: usize,
        align: Option<usize>,
    },
    Trim(usize),
    Release,
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1..=600usize,
        3 => 1..=(64usize << 10),
        1 => prop::sample::select(vec![1usize, 64, 65, 448, 449, 4096, 4097, 256 << 10]),
        1 => 1..=MAX_SIZE,
    ]
}

fn align() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 8, 16, 64, 128, 1024, 4096])
}

fn target() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        0..(1usize << 20),
        0..(8usize << 20),
        Just(usize::MAX),
    ]
}

fn pick() -> impl Strategy<Value = Pick> {
    any::<usize>().prop_map(Pick)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (size(), align(), any::<bool>())
            .prop_map(|(size, align, zeroed)| Op::Allocate { size, align, zeroed }),
        4 => pick().prop_map(Op::Free),
        2 => (pick(), size(), prop::option::of(align()), any::<bool>())
            .prop_map(|(pick, by, align, zeroed)| Op::Grow { pick, by, align, zeroed }),
        2 => (pick(), 0..=1000usize, prop::option::of(align()))
            .prop_map(|(pick, permille, align)| Op::Shrink { pick, permille, align }),
        1 => target().prop_map(Op::Trim),
        1 => Just(Op::Release),
    ]
}

/// Runs ops on a best-fit cache and checks it after every step against
/// what the model knows: the live blocks and their contents, and how many
/// blocks were carved and freed.
struct Harness<A: Allocator> {
    cache: CachingAllocator<A>,
    /// The ledger backing, for a cache over fixed segments.
    backing: Option<Counting>,
    live: Vec<Block>,
    next_seed: u8,
    /// Blocks the cache carved: allocations, and resizes that moved.
    carved: u64,
    /// Blocks it took back: frees, and the old blocks of resizes that moved.
    freed: u64,
}

impl<A: Allocator> Harness<A> {
    fn new(cache: CachingAllocator<A>, backing: Option<Counting>) -> Self {
        assert_eq!(cache.size_policy(), SizePolicy::BestFit);
        Self {
            cache,
            backing,
            live: Vec::new(),
            next_seed: 0,
            carved: 0,
            freed: 0,
        }
    }

    fn seed(&mut self) -> u8 {
        self.next_seed = self.next_seed.wrapping_add(1);
        self.next_seed
    }

    #[track_caller]
    fn check_placed(&self, got: NonNull<[u8]>, layout: Layout) {
        let addr = got.cast::<u8>().as_ptr() as usize;
        assert_eq!(got.len(), layout.size(), "exact sizes");
        assert_eq!(
            addr % layout.align(),
            0,
            "{layout:?} misaligned at {addr:#x}"
        );
        assert_eq!(addr % 64, 0, "blocks are 64-byte aligned at least");
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Allocate {
                size,
                align,
                zeroed,
            } => {
                let layout = layout(size, align);
                let got = if zeroed {
                    self.cache.allocate_zeroed(layout)
                } else {
                    self.cache.allocate(layout)
                }
                .expect("best fit refused an allocation");
                self.check_placed(got, layout);
                self.carved += 1;
                let seed = self.seed();
                let mut block = Block {
                    ptr: got.cast(),
                    layout,
                    seed,
                };
                if zeroed {
                    assert!(is_zero(block.bytes()), "a zeroed block is not zero");
                }
                block.fill();
                self.live.push(block);
            }
            Op::Free(pick) => {
                if self.live.is_empty() {
                    return;
                }
                let block = self.live.swap_remove(pick.of(self.live.len()));
                block.check_all();
                // SAFETY: handed out by this cache for this layout, and
                // dropped from the live set.
                unsafe { self.cache.deallocate(block.ptr, block.layout) };
                self.freed += 1;
            }
            Op::Grow {
                pick,
                by,
                align,
                zeroed,
            } => {
                if self.live.is_empty() {
                    return;
                }
                let index = pick.of(self.live.len());
                let old = self.live[index].layout;
                let size = (old.size() + by).min(MAX_SIZE.max(old.size()));
                let new = layout(size, align.unwrap_or(old.align()));
                let block = &self.live[index];
                // SAFETY: a live block of this cache allocated for `old`;
                // `new` is at least as large. On success the old pointer is
                // replaced.
                let got = unsafe {
                    if zeroed {
                        self.cache.grow_zeroed(block.ptr, old, new)
                    } else {
                        self.cache.grow(block.ptr, old, new)
                    }
                }
                .expect("best fit refused a grow");
                self.resized(index, got, new, zeroed);
            }
            Op::Shrink {
                pick,
                permille,
                align,
            } => {
                if self.live.is_empty() {
                    return;
                }
                let index = pick.of(self.live.len());
                let old = self.live[index].layout;
                let size = (old.size() * permille / 1000).max(1);
                let new = layout(size, align.unwrap_or(old.align()));
                // SAFETY: as for grow; `new` is at most as large.
                let got = unsafe { self.cache.shrink(self.live[index].ptr, old, new) }
                    .expect("best fit refused a shrink");
                self.resized(index, got, new, false);
            }
            Op::Trim(target) => {
                self.cache.trim(target);
                let stats = self.cache.stats();
                self.check_shed(&stats, target);
            }
            Op::Release => {
                self.cache.release_cached();
                let stats = self.cache.stats();
                self.check_shed(&stats, 0);
            }
        }
    }

    /// Block `index` is now `got`, for `new`: its first bytes survived, and
    /// with `zeroed` the new bytes are zero.
    fn resized(&mut self, index: usize, got: NonNull<[u8]>, new: Layout, zeroed: bool) {
        self.check_placed(got, new);
        let block = &mut self.live[index];
        let old = block.layout;
        if got.cast::<u8>() != block.ptr {
            // A new block was carved, the data copied, the old one freed.
            self.carved += 1;
            self.freed += 1;
        }
        block.ptr = got.cast();
        block.layout = new;
        let kept = old.size().min(new.size());
        assert!(
            holds_pattern(&block.bytes()[..kept], block.seed),
            "a resize from {old:?} to {new:?} lost the contents"
        );
        if zeroed && new.size() > old.size() {
            assert!(
                is_zero(&block.bytes()[old.size()..]),
                "grow_zeroed left the new bytes non-zero"
            );
        }
        block.fill();
    }

    /// After a trim to `target` (a release: 0).
    fn check_shed(&self, stats: &Stats, target: usize) {
        if self.backing.is_some() {
            // Whole free segments go until at most `target` stays cached, or
            // none is left: then only pinned bytes stay.
            assert!(
                stats.bytes_cached <= target.max(stats.bytes_pinned),
                "a trim to {target} left more cached: {stats:?}"
            );
        }
        if self.live.is_empty() {
            assert!(
                stats.bytes_reserved <= target,
                "a trim to {target} with nothing live left more reserved: {stats:?}"
            );
        }
    }

    fn check_invariants(&self) {
        let stats = self.cache.stats();
        assert_invariant(&stats);
        let in_use: usize = self.live.iter().map(|b| b.layout.size()).sum();
        assert_eq!(stats.bytes_in_use, in_use, "{stats:?}");
        assert_eq!(stats.blocks_in_use, self.live.len(), "{stats:?}");
        // A block holds its request rounded up to 64, plus at most a tail
        // too short to split off.
        let rounding: usize = self
            .live
            .iter()
            .map(|b| rounded(b.layout.size()) - b.layout.size())
            .sum();
        assert!(
            stats.bytes_lost_to_rounding >= rounding
                && stats.bytes_lost_to_rounding <= rounding + MAX_SLACK * self.live.len(),
            "lost to rounding {} outside [{rounding}, {}]: {stats:?}",
            stats.bytes_lost_to_rounding,
            rounding + MAX_SLACK * self.live.len()
        );
        assert_eq!(stats.hits + stats.misses, self.carved, "{stats:?}");
        assert_eq!(stats.frees, self.freed, "{stats:?}");
        assert!(stats.peak_bytes_in_use >= stats.bytes_in_use);
        assert!(stats.peak_bytes_reserved >= stats.bytes_reserved);
        assert!(stats.bytes_pinned <= stats.bytes_cached, "{stats:?}");
        assert_eq!(stats.failures, 0);
        match &self.backing {
            Some(backing) => {
                // Fixed segments hold all their memory: none is decommitted,
                // and the ledger holds exactly what is reserved.
                assert_eq!(stats.bytes_decommitted, 0, "{stats:?}");
                assert_ledger_agrees(&stats, backing);
                if self.live.is_empty() {
                    assert_eq!(stats.bytes_pinned, 0, "{stats:?}");
                }
            }
            // A reservation pins only the free bytes that share a page with
            // a live block.
            None => {
                assert!(stats.bytes_pinned <= stats.bytes_cached, "{stats:?}");
                if self.live.is_empty() {
                    assert_eq!(stats.bytes_pinned, 0, "{stats:?}");
                }
            }
        }
        // No two live blocks overlap, even rounded up to 64.
        let mut extents: Vec<(usize, usize)> = self
            .live
            .iter()
            .map(|b| (b.addr(), b.addr() + rounded(b.layout.size())))
            .collect();
        extents.sort_unstable();
        for pair in extents.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "live blocks overlap: {pair:?}");
        }
        for block in &self.live {
            assert_eq!(block.addr() % block.layout.align(), 0);
            block.check_sampled();
        }
    }

    /// Frees everything and releases: nothing may stay reserved or cached,
    /// and the cache still works.
    fn finish(mut self) {
        for block in &self.live {
            block.check_all();
        }
        while !self.live.is_empty() {
            self.step(&Op::Free(Pick(0)));
        }
        self.check_invariants();
        self.cache.release_cached();
        let stats = self.cache.stats();
        assert_empty(&stats);
        assert_eq!((stats.bytes_in_use, stats.bytes_lost_to_rounding), (0, 0));
        self.check_invariants();
        // Still usable.
        self.step(&Op::Allocate {
            size: 1000,
            align: 8,
            zeroed: true,
        });
        self.check_invariants();
        self.step(&Op::Free(Pick(0)));
        self.cache.release_cached();
        assert_empty(&self.cache.stats());
        if let Some(backing) = self.backing.take() {
            assert_eq!(backing.live_blocks(), 0);
            drop(self.cache);
            // Every segment came back, exactly once, with its layout (the
            // ledger panics otherwise).
            backing.assert_all_returned();
            for (addr, segment) in backing.returned() {
                assert!(
                    segment.size() >= MIN_SEGMENT && segment.size() % page() == 0,
                    "segment {addr:#x} of {segment:?}"
                );
                assert!(
                    segment.align() >= page(),
                    "segment {addr:#x} of {segment:?}"
                );
            }
        }
    }

    fn run(mut self, ops: &[Op]) {
        self.check_invariants();
        for op in ops {
            self.step(op);
            self.check_invariants();
        }
        self.finish();
    }
}

const REGRESSIONS: &str = "proptest-regressions/best_fit.txt";

fn config() -> ProptestConfig {
    if cfg!(miri) {
        // No regression file: isolation refuses the `getcwd` it takes.
        ProptestConfig {
            cases: 4,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    } else {
        crate::fixture::proptest_config(REGRESSIONS, 64)
    }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..if cfg!(miri) { 24 } else { 64 })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn best_fit_over_fixed_segments_matches_its_model(ops in ops()) {
        let (cache, backing) = fixed();
        Harness::new(cache, Some(backing)).run(&ops);
    }

    #[cfg(not(miri))]
    #[test]
    fn best_fit_over_a_reservation_matches_its_model(ops in ops()) {
        Harness::new(best_fit().build(), None).run(&ops);
    }
}

/// Allocates and fills a block, checking the counters stay consistent.
fn take<A: Allocator>(cache: &CachingAllocator<A>, layout: Layout, seed: u8) -> Block {
    let got = cache.allocate(layout).expect("allocation failed");
    let mut block = Block {
        ptr: got.cast(),
        layout,
        seed,
    };
    assert_eq!(block.addr() % layout.align().max(64), 0);
    block.fill();
    assert_invariant(&cache.stats());
    block
}

fn give<A: Allocator>(cache: &CachingAllocator<A>, block: Block) {
    block.check_all();
    // SAFETY: handed out by this cache for this layout, consumed here.
    unsafe { cache.deallocate(block.ptr, block.layout) };
    assert_invariant(&cache.stats());
}

/// Frees everything, in a scrambled order, then sheds with `shed`: nothing
/// may stay reserved; then the cache must work again.
fn nothing_live_then<A: Allocator>(
    cache: &CachingAllocator<A>,
    shed: impl Fn(&CachingAllocator<A>),
) {
    let sizes = [100, 4096, 70_000, 300 << 10, 5000, 1 << 20, 64, 3000];
    let mut blocks: Vec<Block> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            take(
                cache,
                layout(size, if i % 3 == 0 { 4096 } else { 8 }),
                i as u8,
            )
        })
        .collect();
    // Holes in the middle, then a partial trim: free pages get decommitted
    // (reservation) or whole segments go (fixed) while blocks are live.
    for index in [5, 2, 0] {
        give(cache, blocks.remove(index));
    }
    cache.trim(10_000);
    assert_invariant(&cache.stats());
    for block in &blocks {
        block.check_all();
    }
    while let Some(block) = blocks.pop() {
        give(cache, block);
    }
    shed(cache);
    let stats = cache.stats();
    assert_empty(&stats);
    assert_invariant(&stats);
    assert_eq!((stats.bytes_in_use, stats.blocks_in_use), (0, 0));

    // The cache still works, from nothing.
    let again: Vec<Block> = [64 << 10, 100, 2 << 20]
        .iter()
        .enumerate()
        .map(|(i, &size)| take(cache, layout(size, 64), 100 + i as u8))
        .collect();
    let stats = cache.stats();
    assert_eq!(stats.blocks_in_use, 3);
    assert!(
        stats.bytes_reserved >= (64 << 10) + 128 + (2 << 20),
        "{stats:?}"
    );
    for block in again {
        give(cache, block);
    }
    cache.release_cached();
    assert_empty(&cache.stats());
}

#[test]
fn trim_with_nothing_live_leaves_nothing_reserved() {
    type Shed<A> = fn(&CachingAllocator<A>);
    let sheds: [(&str, Shed<Counting>); 2] = [
        ("trim(0)", |cache| {
            cache.trim(0);
        }),
        ("release_cached()", |cache| {
            cache.release_cached();
        }),
    ];
    for (name, shed) in sheds {
        let (cache, backing) = fixed();
        nothing_live_then(&cache, shed);
        let stats = cache.stats();
        assert_eq!(
            stats.backing_allocs, stats.backing_frees,
            "{name}: {stats:?}"
        );
        drop(cache);
        backing.assert_all_returned();
    }
}

/// `trim_with_nothing_live_leaves_nothing_reserved` over a reservation.
#[cfg(not(miri))]
#[test]

fn trim_with_nothing_live_leaves_nothing_reserved_over_a_reservation() {
    type Shed = fn(&CachingAllocator);
    let sheds: [Shed; 2] = [
        |cache| {
            cache.trim(0);
        },
        |cache| {
            cache.release_cached();
        },
    ];
    for shed in sheds {
        nothing_live_then(&best_fit().build(), shed);
    }
}

/// The smallest case of the bug above: a free range in the middle is
/// decommitted while its neighbours are live; once they are freed too,
/// nothing is live, and a release must give back the whole range.
///
/// Diagnosis: `Arena::shed` sizes what it gives back by the excess of
/// *committed* free bytes (`cached`), but cuts a window at the top of the
/// segment (`keep = committed - excess`) or of a free range (`[to - excess,
/// to)`) whatever the window holds: when it covers pages already
/// decommitted, it gains nothing, and the pages below it are never
/// reached. Here the uncommit takes only the top 128 KiB (half of it
/// already decommitted), then the decommit window falls on decommitted
/// pages: the low block's 64 KiB stay reserved, 960 KiB decommitted above.
#[cfg(not(miri))]
#[test]

fn release_with_nothing_live_after_a_decommit_leaves_nothing_reserved() {
    for release in [false, true] {
        let cache = best_fit().build();
        let low = take(&cache, layout(64 << 10, 4096), 1);
        let middle = take(&cache, layout(1 << 20, 4096), 2);
        let high = take(&cache, layout(64 << 10, 4096), 3);
        give(&cache, middle);
        cache.trim(0);
        assert_eq!(cache.stats().bytes_decommitted, 1 << 20);
        give(&cache, low);
        give(&cache, high);
        if release {
            cache.release_cached();
        } else {
            cache.trim(0);
        }
        let stats = cache.stats();
        assert_eq!(stats.blocks_in_use, 0);
        assert_empty(&stats);
    }
}

/// With nothing live, a trim to a positive target keeps at most that much.
#[test]
fn trim_to_a_target_with_nothing_live_keeps_at_most_the_target() {
    // 4095 differs from 1 only where a reservation rounds to pages; under
    // Miri both caches run over fixed segments (no mmap), so it is left out
    // there (71 s of Miri's clock with all five).
    let targets: &[usize] = if cfg!(miri) {
        &[1, 4096, 100_000, 1 << 20]
    } else {
        &[1, 4095, 4096, 100_000, 1 << 20]
    };
    for &target in targets {
        let (cache, backing) = fixed();
        let blocks: Vec<Block> = (0..6)
            .map(|i| take(&cache, layout(200 << 10, 8), i))
            .collect();
        for block in blocks {
            give(&cache, block);
        }
        cache.trim(target);
        let stats = cache.stats();
        assert!(stats.bytes_reserved <= target, "{target}: {stats:?}");
        assert_invariant(&stats);
        drop(cache);
        backing.assert_all_returned();

        let cache = best_fit().build();
        let blocks: Vec<Block> = (0..6)
            .map(|i| take(&cache, layout(200 << 10, 8), i))
            .collect();
        for block in blocks {
            give(&cache, block);
        }
        cache.trim(target);
        let stats = cache.stats();
        assert!(stats.bytes_reserved <= target, "{target}: {stats:?}");
        assert_invariant(&stats);
    }
}

/// Random allocations and frees on a capped cache: after every free (and
/// every other step) the cached bytes are at most the cap plus the pinned
/// bytes.
fn cap_holds<A: Allocator>(cache: &CachingAllocator<A>, cap: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut live: Vec<Block> = Vec::new();
    let steps = if cfg!(miri) { 30 } else { 400 };
    for step in 0..steps {
        if live.is_empty() || rng.below(5) < 3 {
            let size = match rng.below(4) {
                0 => 1 + rng.below(600),
                1 | 2 => 1 + rng.below(40_000),
                _ => 1 + rng.below(MAX_SIZE / 2),
            };
            let align = 1 << rng.below(13);
            live.push(take(cache, layout(size, align), step as u8));
        } else {
            let block = live.swap_remove(rng.below(live.len()));
            give(cache, block);
        }
        let stats = cache.stats();
        assert!(
            stats.bytes_cached <= cap + stats.bytes_pinned,
            "cap {cap}, step {step}: {} cached, {} pinned: {stats:?}",
            stats.bytes_cached,
            stats.bytes_pinned
        );
    }
    for block in live {
        give(cache, block);
        let stats = cache.stats();
        assert!(stats.bytes_cached <= cap + stats.bytes_pinned, "{stats:?}");
    }
    let stats = cache.stats();
    assert!(stats.bytes_reserved <= cap, "nothing live: {stats:?}");
}

#[test]
fn the_cap_bounds_cached_bytes_over_fixed_segments() {
    // Under Miri (30 steps of blocks up to 40,000 bytes) a 4 MiB cap is never
    // reached and 1 MiB hardly: the caps that shed (0, a page, 64 KiB) reach
    // every path; 185 s of Miri's clock with all five, about 110 s without.
    let caps: &[usize] = if cfg!(miri) {
        &[0, 4096, 64 << 10]
    } else {
        &[0, 4096, 64 << 10, 1 << 20, 4 << 20]
    };
    for (i, &cap) in caps.iter().enumerate() {
        let (cache, backing) = fixed_with(best_fit().max_cached_bytes(cap));
        assert_eq!(cache.max_cached_bytes(), Some(cap));
        cap_holds(&cache, cap, 7 + i as u64);
        drop(cache);
        backing.assert_all_returned();
    }
}

/// The cap over a reservation: nothing is pinned there, so the cached bytes
/// must stay under the cap itself.
#[cfg(not(miri))]
#[test]

fn the_cap_bounds_cached_bytes_over_a_reservation() {
    for (i, cap) in [0, 4096, 64 << 10, 1 << 20, 4 << 20]
        .into_iter()
        .enumerate()
    {
        let cache = best_fit().max_cached_bytes(cap).build();
        cap_holds(&cache, cap, 7 + i as u64);
    }
}

/// The smallest case of the bug above: two 100-byte blocks in one page,
/// the first freed. The free bytes of that page (3968) can be neither
/// uncommitted nor decommitted (page-granular), so they stay cached above
/// the cap, while `bytes_pinned` (documented as the free bytes nothing can
/// give back) says 0. Either `bytes_pinned` should count a reservation's
/// partial free pages, or the cap's promise needs that exception.
#[cfg(not(miri))]
#[test]

fn a_capped_reservation_sheds_its_partial_pages() {
    let cache = best_fit().max_cached_bytes(0).build();
    let a = take(&cache, layout(100, 8), 1);
    let b = take(&cache, layout(100, 8), 2);
    give(&cache, a);
    let stats = cache.stats();
    assert!(
        stats.bytes_cached <= stats.bytes_pinned,
        "cap 0: {} cached, {} pinned: {stats:?}",
        stats.bytes_cached,
        stats.bytes_pinned
    );
    give(&cache, b);
}

/// A partial trim decommits the top pages of a free range in the middle of
/// a reservation; a later `trim(0)` or `release_cached` must then give back
/// the rest of that range too. Same cause as above: the second shed's
/// window, `[to - 512 KiB, to)`, is the half already decommitted.
#[cfg(not(miri))]
#[test]

fn release_after_a_partial_trim_gives_back_the_rest_of_the_range() {
    for release in [false, true] {
        let cache = best_fit().build();
        let low = take(&cache, layout(64 << 10, 4096), 1);
        let middle = take(&cache, layout(1 << 20, 4096), 2);
        let high = take(&cache, layout(64 << 10, 4096), 3);
        give(&cache, middle);
        assert_eq!(cache.stats().bytes_cached, 1 << 20);
        cache.trim(512 << 10);
        let stats = cache.stats();
        assert!(stats.bytes_cached <= 512 << 10, "{stats:?}");
        if release {
            cache.release_cached();
        } else {
            cache.trim(0);
        }
        let stats = cache.stats();
        // The range is page-aligned: every byte of it can go.
        assert_eq!(stats.bytes_cached, 0, "release {release}: {stats:?}");
        assert_eq!(
            stats.bytes_decommitted,
            1 << 20,
            "release {release}: {stats:?}"
        );
        give(&cache, low);
        give(&cache, high);
    }
}

/// A free range decommitted in part then fully, the pages coming back on the
/// next allocation: contents of live blocks survive and the pages read as
/// zero for a zeroed allocation.
#[cfg(not(miri))]
#[test]
fn decommitted_pages_come_back_as_a_miss() {
    let cache = best_fit().build();
    let low = take(&cache, layout(64 << 10, 4096), 1);
    let middle = take(&cache, layout(1 << 20, 4096), 2);
    let high = take(&cache, layout(64 << 10, 4096), 3);
    give(&cache, middle);
    cache.trim(0);
    let stats = cache.stats();
    assert!(stats.bytes_decommitted > 0, "{stats:?}");
    assert_invariant(&stats);
    low.check_all();
    high.check_all();
    let misses = stats.misses;
    let again = cache.allocate_zeroed(layout(1 << 20, 4096)).unwrap();
    // SAFETY: a fresh block of 1 MiB.
    let bytes = unsafe { std::slice::from_raw_parts(again.cast::<u8>().as_ptr(), 1 << 20) };
    assert!(is_zero(bytes));
    let stats = cache.stats();
    assert_eq!(
        stats.misses,
        misses + 1,
        "decommitted pages touched again: {stats:?}"
    );
    assert_eq!(stats.bytes_decommitted, 0, "{stats:?}");
    assert_invariant(&stats);
    // SAFETY: allocated above for this layout.
    unsafe { cache.deallocate(again.cast(), layout(1 << 20, 4096)) };
    give(&cache, low);
    give(&cache, high);
    cache.release_cached();
    assert_empty(&cache.stats());
}

/// A backing that refuses: `AllocError`, counted, nothing leaked, and the
/// cache works once the backing does again.
#[test]
fn a_refusing_backing_gives_alloc_error_and_leaks_nothing() {
    let (cache, backing) = fixed();
    backing.fail_all(true);
    for zeroed in [false, true] {
        let got = if zeroed {
            cache.allocate_zeroed(layout(1000, 8))
        } else {
            cache.allocate(layout(1000, 8))
        };
        assert!(matches!(got, Err(AllocError)));
    }
    let stats = cache.stats();
    assert_eq!((stats.failures, stats.retries), (2, 2), "{stats:?}");
    assert_eq!((stats.hits, stats.misses, stats.blocks_in_use), (0, 0, 0));
    assert_empty(&stats);
    assert_eq!(backing.live_blocks(), 0);
    assert_ledger_agrees(&stats, &backing);

    // A segment, then a request it holds: served with the backing refusing.
    backing.fail_all(false);
    let a = take(&cache, layout(1000, 8), 1);
    backing.fail_all(true);
    let attempts = backing.attempts();
    let b = take(&cache, layout(2000, 64), 2);
    assert_eq!(
        backing.attempts(),
        attempts,
        "a hit asks the backing nothing"
    );
    // One that needs a new segment: refused twice (the release in between
    // cannot give back a segment that holds live blocks).
    assert!(matches!(
        cache.allocate(layout(1 << 20, 8)),
        Err(AllocError)
    ));
    let stats = cache.stats();
    assert_eq!((stats.failures, stats.retries), (3, 3), "{stats:?}");
    assert_eq!((stats.hits, stats.misses, stats.blocks_in_use), (1, 1, 2));
    assert_invariant(&stats);
    assert_ledger_agrees(&stats, &backing);
    a.check_all();
    b.check_all();

    // The first attempt refused, the retry (after a release that gives the
    // free segment back) served.
    give(&cache, a);
    give(&cache, b);
    backing.fail_all(false);
    backing.fail_next(1);
    let c = take(&cache, layout(1 << 20, 8), 3);
    let stats = cache.stats();
    assert_eq!((stats.failures, stats.retries), (3, 4), "{stats:?}");
    assert_eq!(
        stats.backing_frees, 1,
        "the release gave the free segment back"
    );
    assert_ledger_agrees(&stats, &backing);
    give(&cache, c);
    drop(cache);
    backing.assert_all_returned();
}

/// With `stop_caching_after_failure`: after a failure, frees give whole free
/// segments back at once.
#[test]
fn a_failure_stops_caching_when_asked() {
    let (cache, backing) = fixed_with(best_fit().stop_caching_after_failure(true));
    let a = take(&cache, layout(1000, 8), 1);
    backing.fail_all(true);
    assert!(cache.allocate(layout(1 << 20, 8)).is_err());
    assert!(cache.is_caching_stopped());
    backing.fail_all(false);
    let stats = cache.stats();
    assert_eq!(stats.bytes_cached, stats.bytes_pinned, "{stats:?}");
    give(&cache, a);
    let stats = cache.stats();
    assert_empty(&stats);
    assert_ledger_agrees(&stats, &backing);
    drop(cache);
    backing.assert_all_returned();
}

/// Two best-fit caches on one budget: after every operation the budget
/// counts exactly their cached bytes, and holds at most its limit plus what
/// is pinned.
#[test]
fn two_caches_reconcile_with_their_budget() {
    // Under Miri (30 steps, blocks up to 100,000 bytes: at most 3 MB) the
    // 4 MiB limit is never reached and 1 MiB rarely: a limit of 0 (every free
    // evicts) and one of 300 KiB (partial evictions from either cache) reach
    // every path; 200 s of Miri's clock with all four.
    let limits: &[(u64, usize)] = if cfg!(miri) {
        &[(1, 0), (2, 300 << 10)]
    } else {
        &[(1, 0), (2, 300 << 10), (3, 1 << 20), (4, 4 << 20)]
    };
    for &(seed, limit) in limits {
        let budget = Budget::new(limit);
        let backings = [Counting::new(), Counting::new()];
        let caches: Vec<CachingAllocator<Counting>> = backings
            .iter()
            .map(|backing| best_fit().budget(&budget).build_in(backing.clone()))
            .collect();
        let mut live: Vec<(usize, Block)> = Vec::new();
        let mut rng = Rng::new(seed);
        let check = |what: &str| {
            let stats: Vec<Stats> = caches.iter().map(CachingAllocator::stats).collect();
            let cached: usize = stats.iter().map(|s| s.bytes_cached).sum();
            let pinned: usize = stats.iter().map(|s| s.bytes_pinned).sum();
            assert_eq!(
                budget.bytes_cached(),
                cached,
                "limit {limit}, after {what}: budget and caches disagree: {stats:?}"
            );
            assert!(
                cached <= limit + pinned,
                "limit {limit}, after {what}: {cached} cached, {pinned} pinned"
            );
            for (stats, backing) in stats.iter().zip(&backings) {
                assert_invariant(stats);
                assert_ledger_agrees(stats, backing);
            }
        };
        let steps = if cfg!(miri) { 30 } else { 400 };
        for step in 0..steps {
            let which = rng.below(2);
            match rng.below(10) {
                0..=4 => {
                    let size = match rng.below(3) {
                        0 => 1 + rng.below(2000),
                        1 => 1 + rng.below(100_000),
                        _ => 1 + rng.below(MAX_SIZE / 3),
                    };
                    let block = take(&caches[which], layout(size, 1 << rng.below(13)), step as u8);
                    live.push((which, block));
                    check("an allocation");
                }
                5..=8 if !live.is_empty() => {
                    let (which, block) = live.swap_remove(rng.below(live.len()));
                    give(&caches[which], block);
                    check("a free");
                }
                9 => {
                    caches[which].trim(rng.below(1 << 20));
                    check("a trim");
                }
                _ => {
                    caches[which].release_cached();
                    check("a release");
                }
            }
        }
        for (which, block) in live.drain(..) {
            give(&caches[which], block);
            check("a final free");
        }
        for cache in &caches {
            cache.release_cached();
            assert_empty(&cache.stats());
        }
        check("the releases");
        assert_eq!(budget.bytes_cached(), 0);
        drop(caches);
        for backing in backings {
            backing.assert_all_returned();
        }
    }
}

/// The counters after a known sequence, over fixed segments.
#[test]
fn stats_follow_a_known_sequence_over_fixed_segments() {
    let (cache, backing) = fixed();
    let a = take(&cache, layout(4096, 8), 1);
    let first = a.addr();
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.backing_allocs), (0, 1, 1));
    assert_eq!(stats.bytes_reserved, MIN_SEGMENT, "{stats:?}");
    assert_eq!(stats.bytes_cached, MIN_SEGMENT - 4096);
    assert_eq!(stats.bytes_pinned, MIN_SEGMENT - 4096);
    assert_eq!(stats.blocks_cached, 1);
    assert_eq!(backing.live_layouts()[0].1, layout(MIN_SEGMENT, page()));
    give(&cache, a);
    let stats = cache.stats();
    assert_eq!((stats.bytes_cached, stats.bytes_pinned), (MIN_SEGMENT, 0));
    // A block of at most 4 KiB waits on a quick list: one more free piece.
    assert_eq!((stats.blocks_cached, stats.frees), (2, 1));

    let a = take(&cache, layout(4096, 8), 1);
    assert_eq!(a.addr(), first, "the lowest address of the smallest fit");
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (1, 1), "{stats:?}");
    assert_eq!((stats.bytes_hit, stats.bytes_missed), (4096, 4096));

    let b = take(&cache, layout(100, 8), 2);
    assert_eq!(b.addr(), first + 4096);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (2, 1), "{stats:?}");
    assert_eq!(stats.bytes_in_use, 4196);
    assert_eq!(stats.bytes_lost_to_rounding, 28, "a 128-byte block for 100");
    assert_eq!(stats.bytes_cached, MIN_SEGMENT - 4096 - 128);
    assert_eq!((stats.blocks_in_use, stats.blocks_cached), (2, 1));
    assert_invariant(&stats);
    give(&cache, a);
    let stats = cache.stats();
    assert_eq!(stats.blocks_cached, 2, "a hole below b, the rest above");
    assert_eq!(stats.bytes_lost_to_rounding, 28);
    give(&cache, b);
    // A trim merges the quick-listed blocks (and gives nothing back here).
    assert_eq!(cache.trim(usize::MAX), 0);
    let stats = cache.stats();
    assert_eq!(stats.blocks_cached, 1, "all merged back into one range");
    assert_eq!(stats.bytes_lost_to_rounding, 0);
    assert_eq!(stats.bytes_cached, MIN_SEGMENT);
    assert_eq!(stats.peak_bytes_in_use, 4196);

    assert_eq!(cache.release_cached(), MIN_SEGMENT);
    let stats = cache.stats();
    assert_empty(&stats);
    assert_eq!((stats.backing_frees, stats.releases), (1, 1));
    assert_eq!(stats.bytes_released, MIN_SEGMENT as u64);
    assert_eq!(stats.peak_bytes_reserved, MIN_SEGMENT);
    drop(cache);
    backing.assert_all_returned();
}

/// The counters after a known sequence, over a reservation: it commits
/// page by page.
#[cfg(not(miri))]
#[test]
fn stats_follow_a_known_sequence_over_a_reservation() {
    let cache = best_fit().build();
    let a = take(&cache, layout(4096, 8), 1);
    let first = a.addr();
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.backing_allocs), (0, 1, 1));
    assert_eq!(
        (stats.bytes_reserved, stats.bytes_cached),
        (4096, 0),
        "{stats:?}"
    );
    give(&cache, a);
    let a = take(&cache, layout(4096, 8), 1);
    assert_eq!(a.addr(), first);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (1, 1), "{stats:?}");

    // Grows the range by a page.
    let b = take(&cache, layout(100, 8), 2);
    assert_eq!(b.addr(), first + 4096);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.backing_allocs), (1, 2, 2));
    assert_eq!(stats.bytes_lost_to_rounding, 28, "a 128-byte block for 100");
    assert_eq!(stats.bytes_reserved, 8192);
    assert_eq!(stats.bytes_cached, 4096 - 128);
    // The rest of b's page cannot be given back while b lives.
    assert_eq!(
        (stats.bytes_pinned, stats.bytes_decommitted),
        (4096 - 128, 0)
    );
    assert_invariant(&stats);
    // Served from the rest of that page.
    let c = take(&cache, layout(1000, 8), 3);
    assert_eq!(c.addr(), first + 4096 + 128);
    assert_eq!(cache.stats().hits, 2);
    give(&cache, c);
    give(&cache, b);
    give(&cache, a);
    assert_eq!(cache.trim(usize::MAX), 0);
    let stats = cache.stats();
    assert_eq!((stats.bytes_cached, stats.blocks_cached), (8192, 1));
    cache.release_cached();
    let stats = cache.stats();
    assert_empty(&stats);
    assert_eq!(stats.backing_frees, 1, "the top uncommitted at once");
    // Grows again from nothing, at the same address.
    let a = take(&cache, layout(4096, 8), 1);
    assert_eq!(a.addr(), first);
    give(&cache, a);
}

/// Best fit takes the smallest free range that fits (not the first, not
/// the largest), and frees coalesce.
#[test]
fn best_fit_picks_the_smallest_range_and_coalesces() {
    let (cache, backing) = fixed();
    let sizes = [4096, 64, 1024, 64, 2048, 64, 8192, 64];
    let mut blocks: Vec<Option<Block>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| Some(take(&cache, layout(size, 8), i as u8)))
        .collect();
    let addrs: Vec<usize> = blocks.iter().map(|b| b.as_ref().unwrap().addr()).collect();
    for pair in addrs.windows(2) {
        assert!(pair[0] < pair[1], "carved upwards from the segment's start");
    }
    // Holes of 4096, 1024, 2048 and 8192 bytes, plus the segment's rest.
    for index in [0, 2, 4, 6] {
        give(&cache, blocks[index].take().unwrap());
    }
    // Blocks of at most 4 KiB wait on quick lists; a trim merges them.
    cache.trim(usize::MAX);
    assert_eq!(cache.stats().blocks_cached, 5);
    let fit = take(&cache, layout(1500, 8), 20);
    assert_eq!(fit.addr(), addrs[4], "the 2048-byte hole is the best fit");
    let fit_small = take(&cache, layout(1000, 8), 21);
    assert_eq!(fit_small.addr(), addrs[2], "the 1024-byte hole");
    let stats = cache.stats();
    // 1500 rounds to 1536, and the 512-byte tail is kept free.
    assert_eq!(stats.blocks_cached, 4, "{stats:?}");
    assert_eq!(stats.bytes_lost_to_rounding, 36 + 24, "{stats:?}");
    // Alignment: a 4096-aligned request skips holes it cannot fit aligned.
    let aligned = take(&cache, layout(4000, 4096), 22);
    assert_eq!(aligned.addr() % 4096, 0);
    give(&cache, aligned);
    give(&cache, fit);
    give(&cache, fit_small);
    cache.trim(usize::MAX);
    assert_eq!(cache.stats().blocks_cached, 5);
    // Freeing the 64-byte blocks merges everything back into one range.
    for index in [1, 3, 5, 7] {
        give(&cache, blocks[index].take().unwrap());
    }
    cache.trim(usize::MAX);
    let stats = cache.stats();
    assert_eq!(stats.blocks_cached, 1, "{stats:?}");
    assert_eq!(stats.bytes_cached, MIN_SEGMENT);
    assert_eq!(stats.bytes_pinned, 0);
    cache.release_cached();
    assert_empty(&cache.stats());
    drop(cache);
    backing.assert_all_returned();
}

/// Grows and shrinks in place when the block allows it, and a shrink gives
/// a tail of at least 512 bytes back.
#[test]
fn resizes_in_place_and_give_back_tails() {
    let (cache, backing) = fixed();
    let mut a = take(&cache, layout(8192, 8), 1);
    let guard = take(&cache, layout(64, 8), 2);
    let stats = cache.stats();
    // SAFETY: `a` is live for its layout; 4000 <= 8192.
    let shrunk = unsafe { cache.shrink(a.ptr, a.layout, layout(4000, 8)) }.unwrap();
    assert_eq!(shrunk.cast::<u8>(), a.ptr, "a shrink stays in place");
    a.layout = layout(4000, 8);
    assert!(holds_pattern(a.bytes(), 1));
    let after = cache.stats();
    assert_eq!(
        after.blocks_cached,
        stats.blocks_cached + 1,
        "the tail is free"
    );
    assert_eq!(after.bytes_cached, stats.bytes_cached + 8192 - 4032);
    assert_eq!(after.bytes_lost_to_rounding, 32);
    assert_eq!(
        (after.hits, after.misses, after.frees),
        (stats.hits, stats.misses, 0)
    );
    assert_invariant(&after);
    // Grows back into the slack of its 64-byte rounding: in place.
    // SAFETY: `a` is live for its layout; 4030 >= 4000.
    let grown = unsafe { cache.grow_zeroed(a.ptr, a.layout, layout(4030, 8)) }.unwrap();
    assert_eq!(grown.cast::<u8>(), a.ptr);
    a.layout = layout(4030, 8);
    assert!(is_zero(&a.bytes()[4000..]));
    a.fill();
    // Grows past the block: moved (the tail next to it is free, but best
    // fit does not extend in place), contents kept.
    // SAFETY: `a` is live for its layout.
    let moved = unsafe { cache.grow(a.ptr, a.layout, layout(20_000, 8)) }.unwrap();
    assert_ne!(moved.cast::<u8>(), a.ptr);
    let old = a.layout.size();
    a.ptr = moved.cast();
    a.layout = layout(20_000, 8);
    assert!(holds_pattern(&a.bytes()[..old], 1));
    a.fill();
    let stats = cache.stats();
    assert_eq!((stats.frees, stats.blocks_in_use), (1, 2), "{stats:?}");
    assert_invariant(&stats);
    give(&cache, a);
    give(&cache, guard);
    cache.release_cached();
    assert_empty(&cache.stats());
    drop(cache);
    backing.assert_all_returned();
}

/// `shrink` to a zero-sized layout is allowed by the `Allocator` contract:
/// the old block must be freed and a dangling pointer returned, as the
/// other policies do.
///
/// Diagnosis: `resize_carved` moves through `allocate_carved(new)`, which
/// (unlike `RawAllocator::allocate`) does not answer zero-sized layouts
/// with a dangling pointer: `block_of` gives a 0-byte block and
/// `FreeRanges::take(0, 64)` trips its `len > 0` debug assertion. In a
/// release build a zero-length (or sub-512-byte tail) entry is carved and
/// counted in `blocks_in_use`, and since a zero-sized `deallocate` returns
/// early it is never taken back.
#[test]

fn shrink_to_zero_frees_the_block() {
    let (cache, backing) = fixed();
    let a = cache.allocate(layout(100, 8)).unwrap();
    // SAFETY: `a` is live for its layout; 0 <= 100.
    let zero = unsafe { cache.shrink(a.cast(), layout(100, 8), layout(0, 8)) }.unwrap();
    assert_eq!(zero.len(), 0);
    let stats = cache.stats();
    assert_eq!(
        (stats.blocks_in_use, stats.bytes_in_use),
        (0, 0),
        "{stats:?}"
    );
    // SAFETY: the zero-sized block handed out above.
    unsafe { cache.deallocate(zero.cast(), layout(0, 8)) };
    cache.release_cached();
    assert_empty(&cache.stats());
    drop(cache);
    backing.assert_all_returned();
}

/// Absurd requests are `AllocError` (counted in `failures`), never a panic
/// or an abort, over both sources; huge alignments that can be met are.
#[test]
fn absurd_requests_fail_cleanly_and_huge_alignments_are_met() {
    let caches: Vec<(CachingAllocator<Global>, bool)> = vec![
        (best_fit().build_in(Global), false),
        #[cfg(all(target_os = "linux", not(miri)))]
        (best_fit().build(), true),
    ];
    for (cache, reserves) in caches {
        for (size, align) in [
            (isize::MAX as usize - 63, 64),
            (isize::MAX as usize / 2, 4096),
            (1, 1 << 62),
            (usize::MAX / 4, 1 << 20),
        ] {
            let layout = Layout::from_size_align(size, align).unwrap();
            assert!(cache.allocate(layout).is_err(), "{size} bytes at {align}");
        }
        assert!(cache.stats().failures >= 4);
        // Large but possible alignments, from inside a segment or their own.
        for align in [page(), 64 << 10, 2 << 20] {
            let layout = Layout::from_size_align(1000, align).unwrap();
            let block = cache.allocate(layout).unwrap().cast::<u8>();
            assert_eq!(block.as_ptr() as usize % align, 0);
            // SAFETY: allocated just above with `layout`.
            unsafe { cache.deallocate(block, layout) };
        }
        cache.release_cached();
        assert_empty(&cache.stats());
        // Still carving from its own memory after the absurd requests: on
        // Linux, `build()` keeps its reservation (no fixed segment appears).
        let layout = Layout::from_size_align(4096, 64).unwrap();
        let block = cache.allocate(layout).unwrap().cast::<u8>();
        let reserved = cache.stats().bytes_reserved;
        // SAFETY: allocated just above with `layout`.
        unsafe { cache.deallocate(block, layout) };
        if reserves {
            assert_eq!(reserved, 4096, "one page committed, not a fixed segment");
        } else {
            assert_eq!(reserved, 256 << 10, "a fixed segment");
        }
    }
}

/// Pages of `[start, start + len)` resident in memory (`mincore`).
#[cfg(all(target_os = "linux", not(miri)))]
fn resident_pages(start: usize, len: usize) -> usize {
    let page = page();
    let from = start / page * page;
    let pages = (start + len).next_multiple_of(page) - from;
    let mut flags = vec![0u8; pages / page];
    // SAFETY: the range is mapped (committed memory of the cache's
    // reservation) and `flags` holds one byte per page.
    let done = unsafe { libc::mincore(from as *mut libc::c_void, pages, flags.as_mut_ptr()) };
    assert_eq!(done, 0, "mincore");
    flags.iter().filter(|&&flag| flag & 1 != 0).count()
}

/// A growth that completes a huge-page chunk may collapse it into one huge
/// page, which makes every page of it resident: never a chunk whose free
/// pages a trim decommitted (the books would call them decommitted while
/// they hold memory, and later trims would skip them). Nor may the kernel's
/// `khugepaged` collapse it in the background: the test does what it would
/// (`MADV_COLLAPSE` on the chunk) and the pages must stay out.
#[cfg(all(target_os = "linux", not(miri)))]
#[test]
fn a_growth_never_makes_decommitted_pages_resident_again() {
    use allocator_api2::vec::Vec;
    const HUGE_PAGE: usize = 2 << 20;
    let cache = best_fit().build();
    let mut below = Vec::<u8, _>::with_capacity_in(512 << 10, cache.clone());
    let mut freed = Vec::<u8, _>::with_capacity_in(512 << 10, cache.clone());
    let mut above = Vec::<u8, _>::with_capacity_in(256 << 10, cache.clone());
    below.resize(512 << 10, 1);
    freed.resize(512 << 10, 2);
    above.resize(256 << 10, 3);
    let (start, len) = (freed.as_ptr() as usize, freed.capacity());
    assert!(start > below.as_ptr() as usize && start < above.as_ptr() as usize);
    let chunk = start / HUGE_PAGE * HUGE_PAGE;
    assert_eq!(
        chunk,
        below.as_ptr() as usize,
        "the reservation is chunk-aligned"
    );
    drop(freed);
    cache.trim(0);
    assert_eq!(resident_pages(start, len), 0, "the trim dropped them");
    // Growing past the first 2 MiB completes the chunk the free range is in.
    let mut grown = Vec::<u8, _>::with_capacity_in(3 << 20, cache.clone());
    grown.resize(3 << 20, 4);
    assert_eq!(
        resident_pages(start, len),
        0,
        "the growth collapsed them in"
    );
    // What khugepaged would do to a chunk advised for huge pages.
    // SAFETY: advice on mapped memory; a collapse keeps every byte.
    unsafe {
        libc::madvise(
            chunk as *mut libc::c_void,
            HUGE_PAGE,
            25, /* MADV_COLLAPSE */
        )
    };
    assert_eq!(resident_pages(start, len), 0, "the chunk can be collapsed");
    cache.trim(0);
    assert_eq!(resident_pages(start, len), 0);
    assert!(below.iter().all(|&b| b == 1) && above.iter().all(|&b| b == 3));
    assert!(grown.iter().all(|&b| b == 4));
    // Once its pages are in use again, the chunk may be a huge page again.
    drop(grown);
    let mut again = Vec::<u8, _>::with_capacity_in(512 << 10, cache.clone());
    again.resize(512 << 10, 5);
    assert_eq!(again.as_ptr() as usize, start, "best fit reuses the hole");
    assert_eq!(resident_pages(start, len), len / page());
}

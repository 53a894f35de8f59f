//! Shared fixtures for the integration tests: backing allocators that check
//! what the cache does to them.
//!
//! - [`Counting`] records every block it handed out (address -> `Layout`) and
//!   panics on a double return or a return with a different layout, so any
//!   test that runs the cache over it also checks the cache's bookkeeping.
//! - [`Failing`] wraps a `Counting` and refuses allocations on demand.
//! - [`Faulty`] wraps a `Counting` and refuses allocations at random, on a
//!   seeded schedule (fault injection for the property and soak tests).
//!
//! Every test crate uses a different subset of these.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};
use caching_allocator::{SizePolicy, Stats};

/// The byte a `Counting` backing fills fresh (non-zeroed) blocks with, so a
/// test that expects zeros cannot pass by luck.
pub const FRESH_BYTE: u8 = 0xA5;
/// The byte a `Counting` backing fills returned blocks with, so a block used
/// after it went back is likely to show up as a pattern mismatch.
pub const RETURNED_BYTE: u8 = 0xDD;

/// Locks ignoring poison: a failed assertion in one thread must not hide the
/// bookkeeping from the checks that follow.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct Ledger {
    /// Live blocks: address -> layout they were handed out with.
    live: BTreeMap<usize, Layout>,
    allocs: u64,
    zeroed_allocs: u64,
    frees: u64,
    live_bytes: usize,
    /// Layouts of every successful allocation, in order.
    history: Vec<Layout>,
    /// Every block returned (address, layout), in order.
    returned: Vec<(usize, Layout)>,
}

struct CountingInner<A> {
    ledger: Mutex<Ledger>,
    /// Whether `history` and `returned` are kept (they grow with every call:
    /// a long soak turns them off).
    log: bool,
    backing: A,
}

/// A backing allocator that keeps a ledger of its live blocks and panics if a
/// block comes back twice, comes back with another layout, or was never
/// handed out. Clones share the ledger.
pub struct Counting<A: Allocator = Global> {
    inner: Arc<CountingInner<A>>,
}

impl Counting {
    pub fn new() -> Self {
        Self::new_in(Global)
    }
}

impl Default for Counting {
    fn default() -> Self {
        Self::new()
    }
}

impl Counting {
    /// Like `new`, but keeps no `history` and no `returned` log (both stay
    /// empty), so its memory stays bounded by the live blocks however long
    /// it runs. Every check on the live blocks still runs.
    pub fn without_log() -> Self {
        let mut counting = Self::new();
        Arc::get_mut(&mut counting.inner)
            .expect("not shared yet")
            .log = false;
        counting
    }
}

impl<A: Allocator> Counting<A> {
    pub fn new_in(backing: A) -> Self {
        Self {
            inner: Arc::new(CountingInner {
                ledger: Mutex::new(Ledger::default()),
                log: true,
                backing,
            }),
        }
    }

    /// Number of blocks handed out and not returned.
    pub fn live_blocks(&self) -> usize {
        lock(&self.inner.ledger).live.len()
    }

    /// Bytes (sum of layout sizes) handed out and not returned.
    pub fn live_bytes(&self) -> usize {
        lock(&self.inner.ledger).live_bytes
    }

    /// Successful allocations (plain and zeroed).
    pub fn allocs(&self) -> u64 {
        lock(&self.inner.ledger).allocs
    }

    /// Successful `allocate_zeroed` calls.
    pub fn zeroed_allocs(&self) -> u64 {
        lock(&self.inner.ledger).zeroed_allocs
    }

    /// Blocks returned.
    pub fn frees(&self) -> u64 {
        lock(&self.inner.ledger).frees
    }

    /// The layouts of the live blocks, by address.
    pub fn live_layouts(&self) -> Vec<(usize, Layout)> {
        lock(&self.inner.ledger)
            .live
            .iter()
            .map(|(&a, &l)| (a, l))
            .collect()
    }

    /// The layout the live block at `addr` was handed out with.
    pub fn layout_of(&self, addr: usize) -> Option<Layout> {
        lock(&self.inner.ledger).live.get(&addr).copied()
    }

    /// The layouts of every successful allocation so far, in order.
    pub fn history(&self) -> Vec<Layout> {
        lock(&self.inner.ledger).history.clone()
    }

    /// Every block returned so far (address, layout), in order.
    pub fn returned(&self) -> Vec<(usize, Layout)> {
        lock(&self.inner.ledger).returned.clone()
    }

    /// Whether the block at `addr` is live (handed out and not returned).
    pub fn is_live(&self, addr: usize) -> bool {
        lock(&self.inner.ledger).live.contains_key(&addr)
    }

    fn record(&self, block: NonNull<[u8]>, layout: Layout, zeroed: bool) {
        let addr = block.cast::<u8>().as_ptr() as usize;
        assert!(
            layout.size() > 0,
            "a zero-sized request reached the backing"
        );
        assert!(
            block.len() >= layout.size(),
            "backing returned a short block"
        );
        assert_eq!(
            addr % layout.align(),
            0,
            "backing returned a misaligned block"
        );
        let mut ledger = lock(&self.inner.ledger);
        // No live block may overlap the new one.
        if let Some((&before, &before_layout)) = ledger.live.range(..=addr).next_back() {
            assert!(
                before + before_layout.size().max(1) <= addr,
                "new block {addr:#x} overlaps live block {before:#x} ({before_layout:?})"
            );
        }
        if let Some((&after, _)) = ledger.live.range(addr..).next() {
            assert!(
                addr + layout.size().max(1) <= after,
                "new block {addr:#x} ({layout:?}) overlaps live block {after:#x}"
            );
        }
        ledger.live.insert(addr, layout);
        ledger.allocs += 1;
        ledger.zeroed_allocs += u64::from(zeroed);
        ledger.live_bytes += layout.size();
        if self.inner.log {
            ledger.history.push(layout);
        }
    }
}

impl<A: Allocator> Clone for Counting<A> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

// SAFETY: blocks come from the inner allocator and go back to it unchanged;
// the ledger only observes.
unsafe impl<A: Allocator> Allocator for Counting<A> {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let block = self.inner.backing.allocate(layout)?;
        // SAFETY: the block is fresh and holds `layout.size()` bytes.
        unsafe { ptr::write_bytes(block.cast::<u8>().as_ptr(), FRESH_BYTE, layout.size()) };
        self.record(block, layout, false);
        Ok(block)
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let block = self.inner.backing.allocate_zeroed(layout)?;
        self.record(block, layout, true);
        Ok(block)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        let addr = ptr.as_ptr() as usize;
        {
            let mut ledger = lock(&self.inner.ledger);
            // Checked before removing, so a caller that catches the panic can
            // still return the block properly.
            match ledger.live.get(&addr) {
                None => panic!(
                    "Counting: deallocate of {addr:#x} ({layout:?}), which is not live \
                     (double return or foreign pointer)"
                ),
                Some(&recorded) => assert_eq!(
                    recorded, layout,
                    "Counting: block {addr:#x} returned with a different layout"
                ),
            }
            ledger.live.remove(&addr);
            if self.inner.log {
                ledger.returned.push((addr, layout));
            }
            ledger.frees += 1;
            ledger.live_bytes -= layout.size();
        }
        // SAFETY: the block was live in the ledger with this layout, so it came
        // from the inner allocator with it and is returned once.
        unsafe {
            ptr::write_bytes(ptr.as_ptr(), RETURNED_BYTE, layout.size());
            self.inner.backing.deallocate(ptr, layout);
        }
    }
}

#[derive(Default)]
struct FailingState {
    /// Decisions for the next allocation attempts, front first: `true` fails.
    script: Mutex<VecDeque<bool>>,
    fail_all: AtomicBool,
    /// Refuse an allocation that would take the live bytes past this.
    budget: Mutex<Option<usize>>,
    attempts: AtomicU64,
    refused: AtomicU64,
}

/// A backing allocator that fails on demand, over a [`Counting`] so leaks,
/// double returns and layout mismatches are still caught. Clones share state.
#[derive(Clone)]
pub struct Failing {
    counting: Counting,
    state: Arc<FailingState>,
}

impl Default for Failing {
    fn default() -> Self {
        Self::new()
    }
}

impl Failing {
    pub fn new() -> Self {
        Self {
            counting: Counting::new(),
            state: Arc::default(),
        }
    }

    /// The ledger underneath.
    pub fn counting(&self) -> &Counting {
        &self.counting
    }

    /// The next `n` allocation attempts fail (after any already scripted).
    pub fn fail_next(&self, n: usize) {
        lock(&self.state.script).extend(std::iter::repeat_n(true, n));
    }

    /// Replaces the scripted decisions: `true` fails that attempt; attempts
    /// past the script succeed.
    pub fn script(&self, decisions: impl IntoIterator<Item = bool>) {
        let mut script = lock(&self.state.script);
        script.clear();
        script.extend(decisions);
    }

    /// Scripted decisions not consumed yet.
    pub fn pending(&self) -> usize {
        lock(&self.state.script).len()
    }

    /// Every attempt fails while set.
    pub fn fail_all(&self, on: bool) {
        self.state.fail_all.store(on, Ordering::SeqCst);
    }

    /// Refuse any allocation that would take the live bytes past `budget`.
    pub fn set_budget(&self, budget: Option<usize>) {
        *lock(&self.state.budget) = budget;
    }

    /// Allocation attempts seen (refused or not).
    pub fn attempts(&self) -> u64 {
        self.state.attempts.load(Ordering::SeqCst)
    }

    /// Allocation attempts refused.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    fn refuse(&self, layout: Layout) -> bool {
        self.state.attempts.fetch_add(1, Ordering::SeqCst);
        let scripted = lock(&self.state.script).pop_front().unwrap_or(false);
        let over_budget = lock(&self.state.budget)
            .is_some_and(|budget| self.counting.live_bytes() + layout.size() > budget);
        let refuse = scripted || over_budget || self.state.fail_all.load(Ordering::SeqCst);
        if refuse {
            self.state.refused.fetch_add(1, Ordering::SeqCst);
        }
        refuse
    }
}

// SAFETY: delegates to `Counting`, or fails without allocating.
unsafe impl Allocator for Failing {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if self.refuse(layout) {
            return Err(AllocError);
        }
        self.counting.allocate(layout)
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if self.refuse(layout) {
            return Err(AllocError);
        }
        self.counting.allocate_zeroed(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract; every block came from `counting`.
        unsafe { self.counting.deallocate(ptr, layout) }
    }
}

/// SplitMix64's output function: a well-mixed 64-bit value for each input.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small seeded generator (SplitMix64) for tests that must not depend on
/// anything random outside their seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`; the bias is negligible for small `n`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `true` with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// Probabilities are kept as a threshold out of 2^32: an attempt fails when
/// the top 32 bits of its draw are below it.
const FAULTY_ONE: u64 = 1 << 32;

struct FaultyState {
    seed: u64,
    /// Draws taken so far: attempt `n` fails iff
    /// `splitmix64(seed + n)`'s top bits are below the threshold, so the
    /// sequence of decisions is a function of the seed alone (which thread
    /// makes which attempt is up to the scheduler).
    draws: AtomicU64,
    threshold: AtomicU64,
    attempts: AtomicU64,
    failures: AtomicU64,
}

/// A backing allocator that refuses each allocation attempt with probability
/// `p`, on a schedule drawn from a seed, over a [`Counting`] (so leaks, double
/// returns and layout mismatches are still caught). Thread-safe: the
/// generator is one atomic counter. Clones share the state and the ledger.
#[derive(Clone)]
pub struct Faulty {
    counting: Counting,
    state: Arc<FaultyState>,
}

impl Faulty {
    /// Fails each attempt with probability `probability` (clamped to
    /// `0.0..=1.0`), on the schedule of `seed`.
    pub fn new(seed: u64, probability: f64) -> Self {
        Self::with_counting(Counting::new(), seed, probability)
    }

    /// The same over a given ledger (`Counting::without_log()` for a long run).
    pub fn with_counting(counting: Counting, seed: u64, probability: f64) -> Self {
        let faulty = Self {
            counting,
            state: Arc::new(FaultyState {
                seed,
                draws: AtomicU64::new(0),
                threshold: AtomicU64::new(0),
                attempts: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        };
        faulty.set_probability(probability);
        faulty
    }

    /// Changes the probability from now on (0 turns failures off).
    pub fn set_probability(&self, probability: f64) {
        let threshold = (probability.clamp(0.0, 1.0) * FAULTY_ONE as f64) as u64;
        self.state.threshold.store(threshold, Ordering::SeqCst);
    }

    /// The current probability of a failure.
    pub fn probability(&self) -> f64 {
        self.state.threshold.load(Ordering::SeqCst) as f64 / FAULTY_ONE as f64
    }

    pub fn seed(&self) -> u64 {
        self.state.seed
    }

    /// The ledger underneath.
    pub fn counting(&self) -> &Counting {
        &self.counting
    }

    /// Allocation attempts seen (failed or not).
    pub fn attempts(&self) -> u64 {
        self.state.attempts.load(Ordering::SeqCst)
    }

    /// Allocation attempts refused.
    pub fn failures(&self) -> u64 {
        self.state.failures.load(Ordering::SeqCst)
    }

    fn refuse(&self) -> bool {
        self.state.attempts.fetch_add(1, Ordering::SeqCst);
        let threshold = self.state.threshold.load(Ordering::SeqCst);
        if threshold == 0 {
            return false;
        }
        let draw = self.state.draws.fetch_add(1, Ordering::SeqCst);
        let refuse = splitmix64(self.state.seed.wrapping_add(draw)) >> 32 < threshold;
        if refuse {
            self.state.failures.fetch_add(1, Ordering::SeqCst);
        }
        refuse
    }
}

// SAFETY: delegates to `Counting`, or fails without allocating.
unsafe impl Allocator for Faulty {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if self.refuse() {
            return Err(AllocError);
        }
        self.counting.allocate(layout)
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if self.refuse() {
            return Err(AllocError);
        }
        self.counting.allocate_zeroed(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract; every block came from `counting`.
        unsafe { self.counting.deallocate(ptr, layout) }
    }
}

/// The layout the cache takes a block for `layout` with: same size, alignment
/// at least 64.
pub fn block_layout(layout: Layout) -> Layout {
    Layout::from_size_align(
        layout.size(),
        layout.align().max(caching_allocator::MIN_ALIGN),
    )
    .unwrap()
}

/// The block size `policy` serves a request of `size` bytes with, computed
/// independently of the library (division and `ilog2` instead of bit tricks):
/// requests up to 64 bytes get 64; otherwise the power-of-two interval the size
/// falls in is cut into `n` (rounded up to a power of two, 0 as 1) steps of at
/// least 64 bytes, and the size is rounded up to a step. `None` on overflow.
pub fn reference_class(policy: SizePolicy, size: usize) -> Option<usize> {
    match policy {
        SizePolicy::Exact => Some(size),
        SizePolicy::PowerOfTwoDivisions(n) => {
            if size <= 64 {
                return Some(64);
            }
            let divisions = (n.max(1) as usize).next_power_of_two();
            let interval = 1usize << size.ilog2();
            let step = (interval / divisions).max(64);
            size.div_ceil(step).checked_mul(step)
        }
    }
}

/// The layout the cache takes a block for `layout` with under `policy`: the
/// class size, alignment at least 64.
pub fn class_layout(policy: SizePolicy, layout: Layout) -> Layout {
    Layout::from_size_align(
        reference_class(policy, layout.size()).unwrap(),
        layout.align().max(caching_allocator::MIN_ALIGN),
    )
    .unwrap()
}

/// The counters of a `Stats` by name: every field the tests model.
pub fn stats_fields(stats: &Stats) -> [(&'static str, u64); 22] {
    let u = |n: usize| n as u64;
    [
        ("hits", stats.hits),
        ("misses", stats.misses),
        ("frees", stats.frees),
        ("bytes_hit", stats.bytes_hit),
        ("bytes_missed", stats.bytes_missed),
        ("bytes_in_use", u(stats.bytes_in_use)),
        ("bytes_cached", u(stats.bytes_cached)),
        ("bytes_reserved", u(stats.bytes_reserved)),
        ("bytes_lost_to_rounding", u(stats.bytes_lost_to_rounding)),
        ("blocks_in_use", u(stats.blocks_in_use)),
        ("blocks_cached", u(stats.blocks_cached)),
        ("peak_bytes_in_use", u(stats.peak_bytes_in_use)),
        ("peak_bytes_cached", u(stats.peak_bytes_cached)),
        ("peak_bytes_reserved", u(stats.peak_bytes_reserved)),
        ("backing_allocs", stats.backing_allocs),
        ("backing_frees", stats.backing_frees),
        ("releases", stats.releases),
        ("bytes_released", stats.bytes_released),
        ("evictions", stats.evictions),
        ("bytes_evicted", stats.bytes_evicted),
        ("retries", stats.retries),
        ("failures", stats.failures),
    ]
}

/// Asserts that every modelled counter of `actual` equals `expected`'s,
/// naming the ones that differ.
#[track_caller]
pub fn assert_stats_eq(actual: &Stats, expected: &Stats) {
    let differ: Vec<String> = stats_fields(actual)
        .iter()
        .zip(stats_fields(expected))
        .filter(|(a, e)| a.1 != e.1)
        .map(|(a, e)| format!("{}: {} (expected {})", a.0, a.1, e.1))
        .collect();
    assert!(
        differ.is_empty(),
        "stats differ: {}\nactual:   {actual:?}\nexpected: {expected:?}",
        differ.join(", ")
    );
}

/// Number of cases for a property test: `PROPTEST_CASES` if set, else
/// `default`.
pub fn cases_from_env_or(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A position-dependent byte pattern: block contents are `pattern(seed, len)`,
/// so a copy to the wrong offset is caught, not only a wrong byte.
pub fn pattern(seed: u8, len: usize) -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    const MAX: usize = 1 << 17;
    let bytes = PATTERN.get_or_init(|| {
        (0..MAX + 256)
            .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8))
            .collect()
    });
    assert!(
        len <= MAX,
        "pattern of {len} bytes is longer than the fixture"
    );
    let start = usize::from(seed);
    &bytes[start..start + len]
}

/// `len` zero bytes, without allocating.
pub fn zeros(len: usize) -> &'static [u8] {
    static ZEROS: [u8; 1 << 17] = [0; 1 << 17];
    &ZEROS[..len]
}

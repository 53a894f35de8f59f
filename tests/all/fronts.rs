//! Per-thread front caches (`Builder::front_cache_bytes`), for every size
//! policy, with real threads: every thread that uses a cache gets its own
//! front, so the tests run their operations on chosen threads.
//!
//! - A property test runs random operations, each on one of three long-lived
//!   worker threads (or the test's own thread): allocations, frees on any
//!   thread (not only the allocating one), a worker's exit (a fresh thread
//!   takes its place), trims, releases and stats read on a worker. After
//!   every operation: the stats' counters and gauges equal the model's
//!   (exact: no thread is inside the cache between operations), the backing
//!   ledger holds exactly what `bytes_reserved` says, no two live blocks
//!   overlap, and every live block keeps its bytes. For exact sizes and size
//!   classes the model knows every cached block by address: a hit must
//!   return one of them, of the request's key; a miss a new backing block. A
//!   thread that frees a block and then asks for the same key gets that very
//!   block back (its front is LIFO and nobody else can take from it).
//! - Targeted tests: a trim or release reaching idle threads' fronts; a
//!   producer/consumer pair staying bounded; a thread's exit handing its
//!   front over; the last handle dropped while threads hold fronts; many
//!   threads freeing one thread's blocks and blocks handed round a ring;
//!   `stop_caching_after_failure`; zero-sized, over-aligned and absurd
//!   requests; `Vec` growth and `shrink_to_fit` through the fronts; peaks
//!   (exact for one thread, never below a value reported with several);
//!   releases and trims racing with other threads' slow paths, and stats
//!   read while other threads work (each going on until a drain or a read
//!   ran while a worker allocated or freed).
//!
//! Best fit runs over fixed segments from the ledger backing (`build_in`),
//! so the ledger checks every segment comes back once.

use std::collections::BTreeMap;
use std::panic;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};
use allocator_api2::vec::Vec as AVec;
use caching_allocator::{Builder, CachingAllocator, FRONT_CACHE_BYTES, SizePolicy, Stats};
use proptest::prelude::*;

use crate::fixture::{
    Counting, Held, assert_cache_agrees, assert_ledger_agrees, built, class_layout, give,
    give_stamped, l, layout, pattern, proptest_config, take,
};

type Cache = CachingAllocator<Counting>;

/// The three policies every test runs under.
const POLICIES: [SizePolicy; 3] = [
    SizePolicy::Exact,
    SizePolicy::PowerOfTwoDivisions(4),
    SizePolicy::BestFit,
];

/// A best-fit block holds its request rounded up to 64, plus at most a free
/// tail too short to split off (see `best_fit.rs`).
const MAX_SLACK: usize = 512 - 64;

/// A cache with fronts of `limit` bytes under `policy`.
/// A cache with per-thread fronts (best fit's default, per-CPU fronts, has
/// its own suite: `per_cpu.rs`).
fn fronted(policy: SizePolicy, limit: usize) -> Builder {
    CachingAllocator::builder()
        .size_policy(policy)
        .front_cache_bytes(limit)
        .per_cpu_fronts(false)
}

/// The block layout a request of `layout` takes under `policy` (best fit:
/// before any tail too short to split off).
fn block_of(policy: SizePolicy, layout: Layout) -> Layout {
    class_layout(policy, layout)
}

/// The books of any snapshot taken with no thread inside the cache: the
/// bytes reserved are in use, lost to rounding or cached; the ledger holds
/// them; every block handed out and not freed is in use.
#[track_caller]
fn assert_books(stats: &Stats, backing: &Counting, policy: SizePolicy) {
    assert_eq!(
        stats.bytes_reserved,
        stats.bytes_in_use + stats.bytes_lost_to_rounding + stats.bytes_cached,
        "in use + lost + cached != reserved: {stats:?}"
    );
    assert_eq!(
        stats.hits + stats.misses - stats.frees,
        stats.blocks_in_use as u64,
        "{stats:?}"
    );
    assert!(stats.peak_bytes_in_use >= stats.bytes_in_use, "{stats:?}");
    assert!(stats.peak_bytes_cached >= stats.bytes_cached, "{stats:?}");
    assert!(
        stats.peak_bytes_reserved >= stats.bytes_reserved,
        "{stats:?}"
    );
    match policy {
        SizePolicy::BestFit => {
            assert_ledger_agrees(stats, backing);
            assert!(stats.bytes_pinned <= stats.bytes_cached, "{stats:?}");
        }
        _ => assert_cache_agrees(stats, backing),
    }
    if policy == SizePolicy::Exact {
        assert_eq!(stats.bytes_lost_to_rounding, 0, "{stats:?}");
    }
}

/// Nothing in use: a release gives back everything reserved (draining every
/// front first), after which nothing is cached, nothing lost to rounding,
/// and the ledger holds nothing.
#[track_caller]
fn release_everything(cache: &Cache, backing: &Counting) {
    let stats = cache.stats();
    assert_eq!(
        (stats.bytes_in_use, stats.blocks_in_use),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(cache.release_cached(), stats.bytes_reserved, "{stats:?}");
    let after = cache.stats();
    assert_eq!(
        (
            after.bytes_reserved,
            after.bytes_cached,
            after.blocks_cached,
            after.bytes_lost_to_rounding
        ),
        (0, 0, 0, 0),
        "{after:?}"
    );
    assert_eq!(backing.live_bytes(), 0);
}

/// Runs the checks `f` of a thread that others wait for at a barrier,
/// unless one failed already: a failure is kept in `failure` (to be resumed
/// once the others are released), not left to hang them.
fn checking(failure: &mut Option<Box<dyn std::any::Any + Send>>, f: impl FnOnce()) {
    if failure.is_none()
        && let Err(payload) = panic::catch_unwind(panic::AssertUnwindSafe(f))
    {
        *failure = Some(payload);
    }
}

/// A job for a [`Worker`].
type Job = Box<dyn FnOnce() + Send>;

/// A long-lived thread that runs closures one at a time, in the order they
/// are sent, and hands back their results: whatever runs on it uses its
/// front cache. A panic on it is resumed on the caller's thread.
struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn() -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("front-worker".into())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })
            .expect("spawn a worker");
        Self {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// Runs `job` on the worker and waits for its result.
    fn run<R: Send + 'static>(&mut self, job: impl FnOnce() -> R + Send + 'static) -> R {
        let (reply, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = reply.send(job());
        });
        let sent = self.jobs.as_ref().expect("a running worker").send(job);
        match sent.ok().and_then(|()| result.recv().ok()) {
            Some(value) => value,
            None => self.rethrow(),
        }
    }

    /// The worker died: its panic, here.
    fn rethrow(&mut self) -> ! {
        drop(self.jobs.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(payload)) => panic::resume_unwind(payload),
            _ => panic!("a worker stopped without a panic"),
        }
    }

    /// Lets the thread finish and waits until it is gone, its thread-locals
    /// (its front caches' table) destroyed.
    fn exit(mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && let Err(payload) = thread.join()
        {
            panic::resume_unwind(payload);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The property test.

/// Worker threads of the property test.
const THREADS: usize = 3;
/// Request sizes: the first few often, so keys repeat and bins fill; 24 000
/// and 70 000 are larger than the small front limit.
const SIZES: [usize; 9] = [64, 100, 1000, 4096, 1, 24, 5000, 24_000, 70_000];
/// The small front limit the property test also runs with: blocks larger
/// than it skip the front, and a few blocks fill it.
const SMALL_FRONT: usize = 16 << 10;

#[derive(Clone, Copy, Debug)]
enum Op {
    /// `thread` allocates `SIZES[size]` bytes at `align`.
    Alloc {
        thread: usize,
        size: usize,
        align: usize,
    },
    /// `thread` frees live block `pick % live` (allocated by any thread).
    Free { thread: usize, pick: usize },
    /// `thread` allocates `count` blocks of one size, then `freer` frees
    /// them (fills a bin and more).
    Burst {
        thread: usize,
        freer: usize,
        size: usize,
        count: usize,
    },
    /// Worker `thread` exits; a fresh thread takes its place.
    Exit { thread: usize },
    /// `thread` (`None`: the thread that freed it) allocates the layout of
    /// a recently freed block: a hit if that block, or another of its key,
    /// is within the thread's reach.
    Reuse { thread: Option<usize>, pick: usize },
    /// `trim(target)`, on a worker or (`None`) the test's thread, with
    /// `target` the given share of the bytes cached, in percent (0 to 120).
    Trim { on: Option<usize>, percent: usize },
    /// `release_cached()`, on a worker or the test's thread.
    Release { on: Option<usize> },
    /// `stats()` read on a worker equals the test thread's reading.
    Stats { thread: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let thread = || 0..THREADS;
    let size = || prop_oneof![3 => 0..4usize, 1 => 0..SIZES.len()];
    // 1, 8 and 64 share an alignment class; 4096 has its own.
    let align = prop_oneof![4 => Just(8usize), 1 => Just(1), 1 => Just(64), 1 => Just(4096)];
    let percent = prop_oneof![Just(0usize), 0..=120usize];
    prop_oneof![
        8 => (thread(), size(), align)
            .prop_map(|(thread, size, align)| Op::Alloc { thread, size, align }),
        7 => (thread(), any::<usize>()).prop_map(|(thread, pick)| Op::Free { thread, pick }),
        4 => (prop_oneof![3 => Just(None), 1 => thread().prop_map(Some)], any::<usize>())
            .prop_map(|(thread, pick)| Op::Reuse { thread, pick }),
        1 => (thread(), thread(), size(), 1..=12usize)
            .prop_map(|(thread, freer, size, count)| Op::Burst { thread, freer, size, count }),
        1 => thread().prop_map(|thread| Op::Exit { thread }),
        1 => (prop::option::of(thread()), percent)
            .prop_map(|(on, percent)| Op::Trim { on, percent }),
        1 => prop::option::of(thread()).prop_map(|on| Op::Release { on }),
        1 => thread().prop_map(|thread| Op::Stats { thread }),
    ]
}

/// A live block, what was written into it, and its block layout.
struct Live {
    held: Held,
    seed: u8,
    block: Layout,
}

impl Live {
    /// The whole block holds its pattern.
    #[track_caller]
    fn check_all(&self) {
        assert!(
            self.held.bytes() == pattern(self.seed, self.held.layout.size()),
            "block {:#x} ({:?}) changed",
            self.held.addr(),
            self.held.layout
        );
    }

    /// The first and last 64 bytes and one every 1021.
    #[track_caller]
    fn check_sampled(&self) {
        let size = self.held.layout.size();
        let (bytes, expected) = (self.held.bytes(), pattern(self.seed, size));
        let intact = (0..size.min(64))
            .chain(size.saturating_sub(64)..size)
            .chain((0..size).step_by(1021))
            .all(|i| bytes[i] == expected[i]);
        assert!(
            intact,
            "block {:#x} ({:?}) changed",
            self.held.addr(),
            self.held.layout
        );
    }
}

/// The peaks a model saw.
#[derive(Clone, Copy, Debug, Default)]
struct Peaks {
    in_use: usize,
    cached: usize,
    reserved: usize,
}

impl Peaks {
    fn see(&mut self, stats: &Stats) {
        self.in_use = self.in_use.max(stats.bytes_in_use);
        self.cached = self.cached.max(stats.bytes_cached);
        self.reserved = self.reserved.max(stats.bytes_reserved);
    }

    /// `stats`' peaks are at least the ones seen.
    #[track_caller]
    fn assert_bounded_by(&self, stats: &Stats) {
        assert!(
            stats.peak_bytes_in_use >= self.in_use
                && stats.peak_bytes_cached >= self.cached
                && stats.peak_bytes_reserved >= self.reserved,
            "peaks below the ones seen ({self:?}): {stats:?}"
        );
    }

    /// `stats`' peaks are exactly the ones seen.
    #[track_caller]
    fn assert_exact(&self, stats: &Stats) {
        assert_eq!(
            (
                stats.peak_bytes_in_use,
                stats.peak_bytes_cached,
                stats.peak_bytes_reserved
            ),
            (self.in_use, self.cached, self.reserved),
            "peaks (in use, cached, reserved) differ from the ones seen: {stats:?}"
        );
    }
}

struct Harness {
    policy: SizePolicy,
    limit: usize,
    cache: Cache,
    backing: Counting,
    workers: Vec<Worker>,
    live: Vec<Live>,
    /// Exact sizes and size classes: every cached block (in a front or on a
    /// free list), by address, with its block layout.
    cached: BTreeMap<usize, Layout>,
    allocations: u64,
    frees: u64,
    /// The highest bytes in use, cached and reserved seen after an
    /// operation (each changes one way within an operation, so these are
    /// the true peaks).
    peaks: Peaks,
    /// Whether the peaks of bytes in use and cached must be at least the
    /// highest values seen.
    check_peaks: bool,
    /// Per worker: the block its last operation freed, if it was a free
    /// (and no trim, release or exit came since).
    last_free: [Option<(Layout, usize)>; THREADS],
    /// The last blocks freed, for `Op::Reuse`: the freeing thread, the
    /// layout.
    freed_layouts: Vec<(usize, Layout)>,
    next_seed: u8,
}

impl Harness {
    fn new(policy: SizePolicy, limit: usize) -> Self {
        let (cache, backing) = built(fronted(policy, limit));
        Self {
            policy,
            limit,
            cache,
            backing,
            workers: (0..THREADS).map(|_| Worker::spawn()).collect(),
            live: Vec::new(),
            cached: BTreeMap::new(),
            allocations: 0,
            frees: 0,
            peaks: Peaks::default(),
            check_peaks: false,
            last_free: [None; THREADS],
            freed_layouts: Vec::new(),
            next_seed: 0,
        }
    }

    /// Runs `job` with a handle on worker `on`, or on this thread.
    fn on<R: Send + 'static>(
        &mut self,
        on: Option<usize>,
        job: impl FnOnce(&Cache) -> R + Send + 'static,
    ) -> R {
        let cache = self.cache.clone();
        match on {
            Some(thread) => self.workers[thread].run(move || job(&cache)),
            None => job(&cache),
        }
    }

    /// Whether the model knows each cached block (not best fit: it carves).
    fn lists(&self) -> bool {
        self.policy != SizePolicy::BestFit
    }

    fn alloc(&mut self, thread: usize, size: usize, align: usize) {
        let layout = layout(size, align);
        let block = block_of(self.policy, layout);
        let before = self.cache.stats();
        let backing_allocs = self.backing.allocs();
        let held = self.on(Some(thread), move |cache| {
            cache.allocate(layout).map(|got| {
                assert_eq!(got.len(), layout.size());
                Held {
                    ptr: got.cast(),
                    layout,
                }
            })
        });
        let held = held.expect("an allocation was refused");
        let addr = held.addr();
        assert_eq!(
            addr % block.align(),
            0,
            "{layout:?} misaligned at {addr:#x}"
        );
        self.allocations += 1;
        let after = self.cache.stats();
        let (hit, missed) = (after.hits - before.hits, after.misses - before.misses);
        assert_eq!(hit + missed, 1, "one allocation: {before:?} -> {after:?}");
        if let Some((freed_block, freed)) = self.last_free[thread]
            && freed_block == block
            && block.size() <= self.limit
        {
            assert_eq!(
                (addr, hit),
                (freed, 1),
                "thread {thread} freed {freed:#x} ({block:?}) and then asked for its key: \
                 its front must hand that block back"
            );
        }
        self.last_free[thread] = None;
        if self.lists() {
            if hit == 1 {
                assert_eq!(
                    self.cached.remove(&addr),
                    Some(block),
                    "a hit for {layout:?} returned {addr:#x}, not a cached block of its key"
                );
                assert_eq!(
                    self.backing.allocs(),
                    backing_allocs,
                    "a hit took new memory"
                );
            } else {
                assert!(
                    !self.cached.contains_key(&addr),
                    "a miss returned the cached block {addr:#x}"
                );
                assert_eq!(self.backing.allocs(), backing_allocs + 1);
                assert_eq!(self.backing.layout_of(addr), Some(block));
            }
        }
        self.next_seed = self.next_seed.wrapping_add(1);
        held.fill(self.next_seed);
        self.live.push(Live {
            held,
            seed: self.next_seed,
            block,
        });
    }

    fn free(&mut self, thread: usize, pick: usize) {
        if self.live.is_empty() {
            return;
        }
        let live = self.live.swap_remove(pick % self.live.len());
        live.check_all();
        let (addr, block) = (live.held.addr(), live.block);
        if self.freed_layouts.len() == 8 {
            self.freed_layouts.remove(0);
        }
        self.freed_layouts.push((thread, live.held.layout));
        let returned = self.backing.frees();
        let held = live.held;
        self.on(Some(thread), move |cache| give(cache, held));
        self.frees += 1;
        assert_eq!(
            self.backing.frees(),
            returned,
            "a free gave memory back to the backing"
        );
        if self.lists() {
            assert_eq!(self.cached.insert(addr, block), None);
        }
        self.last_free[thread] = Some((block, addr));
    }

    fn trim(&mut self, on: Option<usize>, percent: usize) {
        let before = self.cache.stats();
        let target = before.bytes_cached * percent / 100;
        let trimmed = self.on(on, move |cache| cache.trim(target));
        let after = self.cache.stats();
        self.last_free = [None; THREADS];
        assert_eq!(
            trimmed,
            before.bytes_reserved - after.bytes_reserved,
            "trim({target}) returned what it gave back: {before:?} -> {after:?}"
        );
        if !self.lists() {
            assert!(
                after.bytes_cached <= target.max(after.bytes_pinned),
                "trim({target}) left more cached: {after:?}"
            );
            return;
        }
        assert!(
            after.bytes_cached <= target,
            "trim({target}) left more cached: {after:?}"
        );
        // The blocks it gave back: the model's cached blocks the ledger no
        // longer holds.
        let gone: Vec<(usize, Layout)> = self
            .cached
            .iter()
            .filter(|&(&addr, _)| !self.backing.is_live(addr))
            .map(|(&addr, &block)| (addr, block))
            .collect();
        for (addr, _) in &gone {
            self.cached.remove(addr);
        }
        assert_eq!(
            gone.iter().map(|(_, block)| block.size()).sum::<usize>(),
            trimmed
        );
        // Only as many as needed: one block fewer would have been too few.
        match gone.iter().map(|(_, block)| block.size()).max() {
            None => assert_eq!(trimmed, 0),
            Some(largest) => assert!(
                before.bytes_cached > target && after.bytes_cached + largest > target,
                "trim({target}) gave back more than needed: {before:?} -> {after:?}"
            ),
        }
    }

    fn release(&mut self, on: Option<usize>) {
        let before = self.cache.stats();
        let released = self.on(on, |cache| cache.release_cached());
        let after = self.cache.stats();
        self.last_free = [None; THREADS];
        assert_eq!(
            released,
            before.bytes_reserved - after.bytes_reserved,
            "{before:?} -> {after:?}"
        );
        if self.lists() {
            assert_eq!(released, before.bytes_cached);
            assert_eq!(
                (after.bytes_cached, after.blocks_cached),
                (0, 0),
                "{after:?}"
            );
            for addr in std::mem::take(&mut self.cached).into_keys() {
                assert!(!self.backing.is_live(addr), "{addr:#x} survived a release");
            }
        } else {
            // Over fixed segments, only the free bytes of segments that
            // still hold a live block stay.
            assert_eq!(after.bytes_cached, after.bytes_pinned, "{after:?}");
        }
        if self.live.is_empty() {
            assert_eq!(after.bytes_reserved, 0, "{after:?}");
        }
    }

    fn exit(&mut self, thread: usize) {
        let before = self.cache.stats();
        std::mem::replace(&mut self.workers[thread], Worker::spawn()).exit();
        self.last_free[thread] = None;
        // The exited thread's front is orphaned, not lost: still counted.
        assert_eq!(
            self.cache.stats(),
            before,
            "a thread's exit changed the stats"
        );
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Alloc {
                thread,
                size,
                align,
            } => self.alloc(thread, SIZES[size], align),
            Op::Free { thread, pick } => self.free(thread, pick),
            Op::Burst {
                thread,
                freer,
                size,
                count,
            } => {
                for _ in 0..count {
                    self.alloc(thread, SIZES[size], 8);
                    self.check();
                }
                for _ in 0..count {
                    // The newest block first: the burst's own.
                    let newest = self.live.len() - 1;
                    self.free(freer, newest);
                    self.check();
                }
            }
            Op::Exit { thread } => self.exit(thread),
            Op::Reuse { thread, pick } => {
                if !self.freed_layouts.is_empty() {
                    let (freer, layout) = self.freed_layouts[pick % self.freed_layouts.len()];
                    self.alloc(thread.unwrap_or(freer), layout.size(), layout.align());
                }
            }
            Op::Trim { on, percent } => self.trim(on, percent),
            Op::Release { on } => self.release(on),
            Op::Stats { thread } => {
                let there = self.on(Some(thread), |cache| cache.stats());
                assert_eq!(there, self.cache.stats(), "stats differ between threads");
            }
        }
    }

    /// The stats against the model, the ledger, and the live blocks.
    fn check(&mut self) {
        let stats = self.cache.stats();
        // With several threads the peaks of bytes in use and cached are
        // documented as upper bounds (exact only while one thread works):
        // with `check_peaks` (`exact_fronts_peaks_bound_what_stats_reported`)
        // they must be at least every value `stats()` reported. The bytes
        // reserved move only under the shared lock: their peak is exact.
        self.peaks.see(&stats);
        if self.check_peaks {
            self.peaks.assert_bounded_by(&stats);
        }
        assert_eq!(
            stats.peak_bytes_reserved, self.peaks.reserved,
            "peak reserved: {stats:?}"
        );
        let in_use: usize = self.live.iter().map(|live| live.held.layout.size()).sum();
        assert_eq!(
            (stats.bytes_in_use, stats.blocks_in_use),
            (in_use, self.live.len()),
            "{stats:?}"
        );
        assert_eq!(stats.hits + stats.misses, self.allocations, "{stats:?}");
        assert_eq!(stats.frees, self.frees, "{stats:?}");
        assert_eq!((stats.failures, stats.retries), (0, 0), "{stats:?}");
        assert_eq!(stats.bytes_decommitted, 0, "{stats:?}");
        assert_books(&stats, &self.backing, self.policy);
        let rounding: usize = self
            .live
            .iter()
            .map(|live| live.block.size() - live.held.layout.size())
            .sum();
        if self.lists() {
            assert_eq!(stats.bytes_lost_to_rounding, rounding, "{stats:?}");
            let cached: usize = self.cached.values().map(Layout::size).sum();
            assert_eq!(
                (stats.bytes_cached, stats.blocks_cached),
                (cached, self.cached.len()),
                "{stats:?}"
            );
            for (&addr, &block) in &self.cached {
                assert_eq!(self.backing.layout_of(addr), Some(block), "{addr:#x}");
            }
            for live in &self.live {
                assert_eq!(
                    self.backing.layout_of(live.held.addr()),
                    Some(live.block),
                    "{:#x}",
                    live.held.addr()
                );
            }
        } else {
            // Blocks in use, and blocks waiting in fronts, may each hold a
            // tail too short to split off.
            let slack = MAX_SLACK * (self.live.len() + stats.blocks_cached);
            assert!(
                stats.bytes_lost_to_rounding >= rounding
                    && stats.bytes_lost_to_rounding <= rounding + slack,
                "lost to rounding outside [{rounding}, {}]: {stats:?}",
                rounding + slack
            );
        }
        // No two live blocks overlap, whole blocks counted.
        let mut extents: Vec<(usize, usize)> = self
            .live
            .iter()
            .map(|live| (live.held.addr(), live.held.addr() + live.block.size()))
            .collect();
        extents.sort_unstable();
        for pair in extents.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "live blocks overlap: {pair:?}");
        }
        for live in &self.live {
            live.check_sampled();
        }
    }

    /// Frees everything on the workers in turn, lets every worker exit (their
    /// fronts orphaned, still counted), then releases (or not) and drops the
    /// cache: the ledger must end empty, every block returned once.
    fn finish(mut self, release: bool) {
        let mut turn = 0;
        while !self.live.is_empty() {
            self.free(turn % THREADS, 0);
            self.check();
            turn += 1;
        }
        let before = self.cache.stats();
        for worker in std::mem::take(&mut self.workers) {
            worker.exit();
        }
        assert_eq!(
            self.cache.stats(),
            before,
            "the workers' exits changed the stats"
        );
        if release {
            release_everything(&self.cache, &self.backing);
        }
        drop(self.cache);
        self.backing.assert_all_returned();
    }

    fn run(mut self, ops: &[Op], release: bool) {
        self.check();
        for &op in ops {
            self.step(op);
            self.check();
        }
        self.finish(release);
    }
}

const REGRESSIONS: &str = "proptest-regressions/fronts.txt";

fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![Just(FRONT_CACHE_BYTES), Just(SMALL_FRONT)]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..60)
}

proptest! {
    #![proptest_config(proptest_config(REGRESSIONS, 32))]

    /// Exact sizes: every counter and gauge, and every hit's address,
    /// against the model, with operations on three threads.
    #[test]
    fn exact_fronts_on_three_threads_match_the_model(
        limit in limit(), ops in ops(), release in any::<bool>()
    ) {
        Harness::new(SizePolicy::Exact, limit).run(&ops, release);
    }

    /// Size classes (`PowerOfTwoDivisions(4)`): as for exact sizes, with
    /// the rounding counted per live block.
    #[test]
    fn size_class_fronts_on_three_threads_match_the_model(
        limit in limit(), ops in ops(), release in any::<bool>()
    ) {
        Harness::new(SizePolicy::PowerOfTwoDivisions(4), limit).run(&ops, release);
    }

    /// Best fit over fixed segments: the gauges, the ledger, trims and
    /// releases, and a thread's own freed block coming back to it.
    #[test]
    fn best_fit_fronts_on_three_threads_match_the_model(
        limit in limit(), ops in ops(), release in any::<bool>()
    ) {
        Harness::new(SizePolicy::BestFit, limit).run(&ops, release);
    }

    /// Exact sizes, also checking that the peaks of bytes in use and cached
    /// are upper bounds of every value `stats()` reported (documented:
    /// exact while one thread works, an upper bound with several).
    #[test]
    fn exact_fronts_peaks_bound_what_stats_reported(
        limit in limit(), ops in ops(), release in any::<bool>()
    ) {
        let mut harness = Harness::new(SizePolicy::Exact, limit);
        harness.check_peaks = true;
        harness.run(&ops, release);
    }
}

// ---------------------------------------------------------------------------
// Idle threads' fronts, thread exits, the last handle.

/// Sizes the targeted tests cycle through.
const FEW_SIZES: [usize; 4] = [100, 1000, 4096, 20_000];

/// Eight threads fill their fronts and wait, alive and idle; `give_back`
/// (a trim to 0 or a release) on the test's thread must reach all eight
/// fronts: it returns every cached byte and the ledger ends empty. Then the
/// threads allocate again (new blocks: nothing is cached any more).
fn idle_fronts_give_everything_back(policy: SizePolicy, give_back: fn(&Cache) -> usize) {
    const IDLE: usize = 8;
    const EACH: usize = 3;
    let per_thread = FEW_SIZES.len() * EACH;
    let (cache, backing) = built(fronted(policy, FRONT_CACHE_BYTES));
    let filled = Barrier::new(IDLE + 1);
    let drained = Barrier::new(IDLE + 1);
    let allocated = Barrier::new(IDLE + 1);
    let checked = Barrier::new(IDLE + 1);
    let held_bytes: usize = FEW_SIZES.iter().sum::<usize>() * EACH * IDLE;
    thread::scope(|threads| {
        for _ in 0..IDLE {
            threads.spawn(|| {
                let sizes = || FEW_SIZES.iter().flat_map(|&size| [size; EACH]);
                let blocks: Vec<Held> = sizes().map(|size| take(&cache, l(size))).collect();
                blocks
                    .into_iter()
                    .for_each(|held| give_stamped(&cache, held));
                filled.wait();
                drained.wait();
                let again: Vec<Held> = sizes().map(|size| take(&cache, l(size))).collect();
                allocated.wait();
                checked.wait();
                again
                    .into_iter()
                    .for_each(|held| give_stamped(&cache, held));
            });
        }
        // A failed check must not leave the threads waiting at a barrier:
        // kept, and resumed once they are done.
        let mut failure = None;
        let mut drained_stats = Stats::default();
        filled.wait();
        checking(&mut failure, || {
            let before = cache.stats();
            assert_eq!(before.hits + before.misses, (IDLE * per_thread) as u64);
            assert_eq!(before.frees, (IDLE * per_thread) as u64);
            assert_books(&before, &backing, policy);
            assert_eq!(before.bytes_in_use, 0, "{before:?}");
            assert!(before.bytes_cached >= held_bytes, "{before:?}");

            let returned = give_back(&cache);
            let after = cache.stats();
            assert_eq!(returned, before.bytes_reserved, "{before:?} -> {after:?}");
            assert_eq!(
                (
                    after.bytes_cached,
                    after.blocks_cached,
                    after.bytes_reserved
                ),
                (0, 0, 0),
                "{after:?}"
            );
            assert_books(&after, &backing, policy);
            assert_eq!(backing.live_bytes(), 0);
            drained_stats = after;
        });
        drained.wait();
        allocated.wait();
        checking(&mut failure, || {
            let (after, busy) = (drained_stats, cache.stats());
            assert_eq!(busy.bytes_in_use, held_bytes, "{busy:?}");
            assert_eq!(
                busy.hits + busy.misses - after.hits - after.misses,
                (IDLE * per_thread) as u64
            );
            if policy == SizePolicy::BestFit {
                // New segments; the rest carved from them.
                assert!(busy.misses > after.misses, "{busy:?}");
            } else {
                assert_eq!(busy.hits, after.hits, "nothing was cached: {busy:?}");
            }
            assert_books(&busy, &backing, policy);
        });
        checked.wait();
        if let Some(payload) = failure {
            panic::resume_unwind(payload);
        }
    });
    release_everything(&cache, &backing);
    drop(cache);
    backing.assert_all_returned();
}

/// `trim(0)` with eight idle threads holding front caches gives back every
/// cached byte (every policy).
#[test]
fn trim_to_zero_reaches_the_fronts_of_idle_threads() {
    for policy in POLICIES {
        idle_fronts_give_everything_back(policy, |cache| cache.trim(0));
    }
}

/// `release_cached()` with eight idle threads holding front caches gives
/// back every cached byte (every policy).
#[test]
fn release_reaches_the_fronts_of_idle_threads() {
    for policy in POLICIES {
        idle_fronts_give_everything_back(policy, |cache| cache.release_cached());
    }
}

/// A thread frees blocks into its front and exits; before anyone touches
/// the cache again, `stats()` counts them as cached; then the test's thread
/// asks for the same sizes and gets those very blocks (hits, no backing
/// allocation).
#[test]
fn a_thread_exit_hands_its_front_to_the_cache() {
    const EACH: usize = 3;
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, FRONT_CACHE_BYTES));
        let worker_cache = cache.clone();
        let addrs: Vec<usize> = thread::spawn(move || {
            let sizes = FEW_SIZES.iter().flat_map(|&size| [size; EACH]);
            let blocks: Vec<Held> = sizes.map(|size| take(&worker_cache, l(size))).collect();
            let addrs = blocks.iter().map(Held::addr).collect();
            blocks
                .into_iter()
                .for_each(|held| give_stamped(&worker_cache, held));
            addrs
        })
        .join()
        .unwrap();
        let blocks = FEW_SIZES.len() * EACH;
        let freed: usize = FEW_SIZES
            .iter()
            .map(|&size| block_of(policy, l(size)).size())
            .sum::<usize>()
            * EACH;
        let stats = cache.stats();
        assert_eq!((stats.bytes_in_use, stats.frees), (0, blocks as u64));
        assert_books(&stats, &backing, policy);
        if policy == SizePolicy::BestFit {
            assert!(stats.bytes_cached >= freed, "{stats:?}");
        } else {
            assert_eq!(
                (stats.bytes_cached, stats.blocks_cached),
                (freed, blocks),
                "the exited thread's front counts as cached: {stats:?}"
            );
        }
        let allocs = backing.allocs();
        let again: Vec<Held> = FEW_SIZES
            .iter()
            .flat_map(|&size| [size; EACH])
            .map(|size| take(&cache, l(size)))
            .collect();
        let after = cache.stats();
        assert_eq!(
            backing.allocs(),
            allocs,
            "{policy:?}: new memory: {after:?}"
        );
        assert_eq!(
            (after.hits - stats.hits, after.misses - stats.misses),
            (blocks as u64, 0),
            "{policy:?}"
        );
        if policy != SizePolicy::BestFit {
            let mut got: Vec<usize> = again.iter().map(Held::addr).collect();
            let mut freed = addrs.clone();
            got.sort_unstable();
            freed.sort_unstable();
            assert_eq!(got, freed, "the exited thread's blocks, reused");
        }
        again
            .into_iter()
            .for_each(|held| give_stamped(&cache, held));
        assert_books(&cache.stats(), &backing, policy);
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

/// Threads fill their fronts, drop their handles and wait, alive; the test
/// drops the last handle: every front is drained and the ledger ends empty,
/// nothing returned twice. Then the threads use a new cache with fronts
/// (their tables hold the dropped cache's dead slots) and exit: nothing may
/// touch the dropped cache.
#[test]
fn the_last_handle_drops_while_threads_hold_fronts() {
    const HOLDERS: usize = 4;
    for policy in POLICIES {
        let backing = Counting::new();
        let cache = fronted(policy, FRONT_CACHE_BYTES).build_in(backing.clone());
        let filled = Arc::new(Barrier::new(HOLDERS + 1));
        let dropped = Arc::new(Barrier::new(HOLDERS + 1));
        let holders: Vec<JoinHandle<()>> = (0..HOLDERS)
            .map(|_| {
                let cache = cache.clone();
                let (filled, dropped) = (filled.clone(), dropped.clone());
                thread::spawn(move || {
                    let blocks: Vec<Held> = FEW_SIZES
                        .iter()
                        .flat_map(|&size| [size; 2])
                        .map(|size| take(&cache, l(size)))
                        .collect();
                    blocks
                        .into_iter()
                        .for_each(|held| give_stamped(&cache, held));
                    drop(cache);
                    filled.wait();
                    dropped.wait();
                    let other_backing = Counting::new();
                    let other = fronted(policy, FRONT_CACHE_BYTES).build_in(other_backing.clone());
                    for _ in 0..3 {
                        let held = take(&other, l(1000));
                        give_stamped(&other, held);
                    }
                    let stats = other.stats();
                    assert_eq!((stats.misses, stats.hits), (1, 2), "{stats:?}");
                    drop(other);
                    other_backing.assert_all_returned();
                })
            })
            .collect();
        filled.wait();
        let stats = cache.stats();
        assert_eq!(stats.bytes_in_use, 0, "{stats:?}");
        assert!(stats.bytes_cached > 0, "{stats:?}");
        assert_books(&stats, &backing, policy);
        assert!(backing.live_bytes() > 0);
        drop(cache);
        backing.assert_all_returned();
        dropped.wait();
        for holder in holders {
            holder.join().unwrap();
        }
        backing.assert_all_returned();
    }
}

/// Caches with fronts built and dropped one after another on one thread (a
/// new one often where the last one was): each starts empty (its first
/// request a miss, then its own block back), and every block of each goes
/// back to its backing when it drops.
#[test]
fn a_new_cache_never_finds_a_dropped_caches_front() {
    for round in 0..30 {
        let policy = POLICIES[round % POLICIES.len()];
        let (cache, backing) = built(fronted(policy, FRONT_CACHE_BYTES));
        let mut addrs = Vec::new();
        for _ in 0..3 {
            let held = take(&cache, l(1000));
            addrs.push(held.addr());
            give_stamped(&cache, held);
        }
        let stats = cache.stats();
        assert_eq!(
            (stats.misses, stats.hits),
            (1, 2),
            "{policy:?}, round {round}: {stats:?}"
        );
        assert!(addrs.iter().all(|&addr| addr == addrs[0]), "{addrs:x?}");
        drop(cache);
        backing.assert_all_returned();
    }
}

/// A trim drains the fronts first, then gives back the oldest cached
/// blocks: a block on the shared lists freed before a block that sits in a
/// front goes first (documented: "a trim takes the fronts' blocks after the
/// shared cache's older ones").
#[test]
fn a_trim_takes_the_shared_caches_older_blocks_before_a_fronts() {
    for policy in [SizePolicy::Exact, SizePolicy::PowerOfTwoDivisions(4)] {
        // Fronts of 16 KiB: a block of 20 000 bytes skips them.
        let (cache, backing) = built(fronted(policy, 16 << 10));
        let older = take(&cache, l(20_000));
        let newer = take(&cache, l(4096));
        let (older_addr, newer_addr) = (older.addr(), newer.addr());
        give(&cache, older);
        give(&cache, newer);
        let newer_block = block_of(policy, l(4096)).size();
        assert_eq!(cache.trim(newer_block), block_of(policy, l(20_000)).size());
        assert!(!backing.is_live(older_addr), "{policy:?}");
        assert!(backing.is_live(newer_addr), "{policy:?}");
        let stats = cache.stats();
        assert_eq!(stats.bytes_cached, newer_block, "{stats:?}");
        assert_books(&stats, &backing, policy);
    }
}

// ---------------------------------------------------------------------------
// Blocks crossing threads.

/// Blocks in flight between threads.
type Parcel = (u8, AVec<u8, Cache>);

/// A block of `size` bytes holding `pattern(seed, size)` (copied at once:
/// allocator-api2's `extend_from_slice` goes byte by byte in a debug build).
fn filled_vec(cache: &Cache, size: usize, seed: u8) -> AVec<u8, Cache> {
    let mut block = AVec::with_capacity_in(size, cache.clone());
    // SAFETY: the vector has room for `size` bytes, all written here.
    unsafe {
        std::ptr::copy_nonoverlapping(pattern(seed, size).as_ptr(), block.as_mut_ptr(), size);
        block.set_len(size);
    }
    block
}

#[track_caller]
fn check_parcel((seed, block): &Parcel) {
    assert!(
        block[..] == *pattern(*seed, block.len()),
        "a block of {} bytes changed in flight",
        block.len()
    );
}

/// One thread allocates, another frees, 20 000 blocks of three sizes through
/// a bounded channel, with fronts of 256 KiB: the freeing thread's front
/// fills and moves its blocks to the shared cache in batches, where the
/// allocating thread finds them. The memory held stays bounded by the two
/// fronts and the blocks in flight (not 20 000 blocks), and most
/// allocations hit.
#[test]
fn a_producer_and_a_consumer_stay_bounded() {
    const LIMIT: usize = 256 << 10;
    const IN_FLIGHT: usize = 64;
    const BLOCKS: usize = 20_000;
    const PIPE_SIZES: [usize; 3] = [1000, 4096, 16_000];
    const LARGEST: usize = 16_000;
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, LIMIT));
        // Two fronts, the blocks in flight (the channel's and one at each
        // end), one more block of each size (a miss while the others are
        // away); best fit adds a segment's worth of granularity.
        let segment = if policy == SizePolicy::BestFit {
            2 * (256 << 10)
        } else {
            0
        };
        let bound = 2 * LIMIT + (IN_FLIGHT + 2 + PIPE_SIZES.len()) * LARGEST + segment;
        let (send, receive) = mpsc::sync_channel::<Parcel>(IN_FLIGHT);
        thread::scope(|threads| {
            let producer_cache = &cache;
            threads.spawn(move || {
                for i in 0..BLOCKS {
                    let seed = i as u8;
                    let size = PIPE_SIZES[i % PIPE_SIZES.len()];
                    send.send((seed, filled_vec(producer_cache, size, seed)))
                        .unwrap();
                    if i % 1000 == 0 {
                        let reserved = producer_cache.stats().bytes_reserved;
                        assert!(reserved <= bound, "{reserved} > {bound} after {i} blocks");
                    }
                }
            });
            threads.spawn(move || {
                for parcel in receive {
                    check_parcel(&parcel);
                }
            });
        });
        let stats = cache.stats();
        assert_eq!(stats.hits + stats.misses, BLOCKS as u64, "{stats:?}");
        assert_eq!(stats.frees, BLOCKS as u64, "{stats:?}");
        assert_books(&stats, &backing, policy);
        assert!(
            stats.peak_bytes_reserved <= bound,
            "{policy:?}: peak reserved {} > {bound}: {stats:?}",
            stats.peak_bytes_reserved
        );
        assert!(
            stats.hits >= stats.misses * 10,
            "{policy:?}: most blocks are reused: {stats:?}"
        );
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

/// One thread allocates blocks of several sizes and hands them to four
/// threads, which check and free them: their fronts fill and overflow into
/// the shared cache, where the allocating thread finds them again. Every
/// block keeps its bytes, and the books are exact at the end.
#[test]
fn many_threads_free_one_threads_blocks() {
    const FREERS: usize = 4;
    const ROUNDS: usize = 100;
    const PER_ROUND: usize = 40;
    const MANY_SIZES: [usize; 5] = [64, 1000, 4096, 5000, 20_000];
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, FRONT_CACHE_BYTES));
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..FREERS)
            .map(|_| mpsc::sync_channel::<Parcel>(16))
            .unzip();
        thread::scope(|threads| {
            for receive in receivers {
                threads.spawn(move || {
                    for parcel in receive {
                        check_parcel(&parcel);
                    }
                });
            }
            for round in 0..ROUNDS {
                for i in 0..PER_ROUND {
                    let seed = (round * PER_ROUND + i) as u8;
                    let size = MANY_SIZES[(round + i) % MANY_SIZES.len()];
                    senders[i % FREERS]
                        .send((seed, filled_vec(&cache, size, seed)))
                        .unwrap();
                }
            }
            drop(senders);
        });
        let stats = cache.stats();
        let blocks = (ROUNDS * PER_ROUND) as u64;
        assert_eq!((stats.hits + stats.misses, stats.frees), (blocks, blocks));
        assert_books(&stats, &backing, policy);
        assert_eq!(stats.bytes_in_use, 0, "{stats:?}");
        assert!(stats.hits > 0, "{policy:?}: {stats:?}");
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

/// Four threads in a ring: each allocates a block a round and sends it to
/// the next, and frees only what the previous one sent. Every block keeps
/// its bytes; the books are exact at the end.
#[test]
fn blocks_handed_round_a_ring_of_threads() {
    const RING: usize = 4;
    const ROUNDS: usize = 1000;
    const RING_SIZES: [usize; 6] = [1, 100, 1000, 4096, 5000, 30_000];
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, FRONT_CACHE_BYTES));
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..RING).map(|_| mpsc::channel::<Parcel>()).unzip();
        thread::scope(|threads| {
            for (t, receive) in receivers.into_iter().enumerate() {
                let send = senders[(t + 1) % RING].clone();
                let cache = &cache;
                threads.spawn(move || {
                    for round in 0..ROUNDS {
                        let seed = (t * 61 + round * 7) as u8;
                        let size = RING_SIZES[(round + t) % RING_SIZES.len()];
                        send.send((seed, filled_vec(cache, size, seed))).unwrap();
                        while let Ok(parcel) = receive.try_recv() {
                            check_parcel(&parcel);
                        }
                    }
                    drop(send);
                    for parcel in receive {
                        check_parcel(&parcel);
                    }
                });
            }
            drop(senders);
        });
        let stats = cache.stats();
        let blocks = (RING * ROUNDS) as u64;
        assert_eq!((stats.hits + stats.misses, stats.frees), (blocks, blocks));
        assert_books(&stats, &backing, policy);
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

// ---------------------------------------------------------------------------
// Failures and odd requests.

/// With `stop_caching_after_failure(true)`: two threads' fronts hold
/// blocks; an allocation fails twice (the release before the retry drains
/// the fronts); from then on every free, on either thread, goes back to the
/// backing: nothing is cached anywhere, fronts included.
#[test]
fn after_a_failure_frees_skip_the_fronts() {
    for policy in POLICIES {
        let (cache, backing) =
            built(fronted(policy, FRONT_CACHE_BYTES).stop_caching_after_failure(true));
        let mut worker = Worker::spawn();
        let fill = |cache: &Cache| {
            for size in [1000, 1000, 4096, 4096] {
                let held = take(cache, l(size));
                give_stamped(cache, held);
            }
            take(cache, l(5000))
        };
        let mine = fill(&cache);
        let worker_cache = cache.clone();
        let theirs = worker.run(move || fill(&worker_cache));
        let before = cache.stats();
        assert!(before.bytes_cached > 0, "{before:?}");
        assert_books(&before, &backing, policy);

        backing.fail_all(true);
        assert_eq!(cache.allocate(l(300_000)), Err(AllocError));
        backing.fail_all(false);
        assert!(cache.is_caching_stopped());
        let stopped = cache.stats();
        assert_eq!((stopped.retries, stopped.failures), (1, 1), "{stopped:?}");
        assert_eq!(
            stopped.bytes_cached, stopped.bytes_pinned,
            "the release before the retry drained the fronts: {stopped:?}"
        );
        assert_books(&stopped, &backing, policy);

        // Every free from now on goes back, on this thread and the worker.
        let check_nothing_cached = |cache: &Cache| {
            let stats = cache.stats();
            assert_eq!(stats.bytes_cached, stats.bytes_pinned, "{stats:?}");
            assert_books(&stats, &backing, policy);
        };
        give_stamped(&cache, mine);
        check_nothing_cached(&cache);
        let worker_cache = cache.clone();
        worker.run(move || give_stamped(&worker_cache, theirs));
        check_nothing_cached(&cache);
        for round in 0..3 {
            let frees = backing.frees();
            for size in [1000, 4096] {
                let held = take(&cache, l(size));
                give_stamped(&cache, held);
                check_nothing_cached(&cache);
                let worker_cache = cache.clone();
                worker.run(move || {
                    let held = take(&worker_cache, l(size));
                    give_stamped(&worker_cache, held);
                });
                check_nothing_cached(&cache);
            }
            if policy != SizePolicy::BestFit {
                assert_eq!(backing.frees(), frees + 4, "round {round}: a free was kept");
            }
        }
        let stats = cache.stats();
        assert_eq!(
            (stats.bytes_in_use, stats.bytes_cached, stats.bytes_reserved),
            (0, 0, 0),
            "{stats:?}"
        );
        worker.exit();
        drop(cache);
        backing.assert_all_returned();
    }
}

/// With fronts on: zero-sized requests succeed with a dangling, aligned
/// pointer and touch nothing (no counter, no backing call); requests no
/// block can serve (sizes near `isize::MAX`, an alignment of 2^62) are an
/// `AllocError`, never a panic; large but possible alignments are met and
/// go through the front like any block; the cache works afterwards.
#[test]
fn zero_sized_over_aligned_and_absurd_requests_with_fronts() {
    let max = isize::MAX as usize;
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, FRONT_CACHE_BYTES));
        for align in [1, 8, 64, 4096, 1 << 20] {
            let zero = layout(0, align);
            for zeroed in [false, true] {
                let got = if zeroed {
                    cache.allocate_zeroed(zero)
                } else {
                    cache.allocate(zero)
                }
                .unwrap();
                assert_eq!(got.len(), 0);
                assert_eq!(got.cast::<u8>().as_ptr() as usize % align, 0);
                // SAFETY: allocated just above with `zero`.
                unsafe { cache.deallocate(got.cast(), zero) };
            }
        }
        assert_eq!(
            cache.stats(),
            Stats::default(),
            "zero-sized requests counted"
        );
        assert_eq!(backing.attempts(), 0);

        let absurd = [
            layout(max - 7, 8),
            layout(max - 62, 1),
            layout(max / 2, 64),
            layout(max / 2 + 1, 4096),
            layout(1, 1 << 62),
        ];
        for &request in &absurd {
            assert_eq!(cache.allocate(request), Err(AllocError), "{request:?}");
            assert_eq!(
                cache.allocate_zeroed(request),
                Err(AllocError),
                "{request:?}"
            );
        }
        let stats = cache.stats();
        assert_eq!(stats.failures, 2 * absurd.len() as u64, "{stats:?}");
        assert_eq!(
            (stats.hits, stats.misses, stats.bytes_in_use),
            (0, 0, 0),
            "{stats:?}"
        );

        // A live block survives a failed grow to an absurd size.
        let held = take(&cache, l(1000));
        held.fill(7);
        // SAFETY: `held` is live, allocated for `l(1000)`; the new layout is
        // larger.
        let grown = unsafe { cache.grow(held.ptr, held.layout, layout(max - 7, 8)) };
        assert_eq!(grown, Err(AllocError));
        assert!(
            held.bytes() == pattern(7, 1000),
            "a failed grow touched the block"
        );
        give(&cache, held);

        for align in [4096, 64 << 10, 2 << 20] {
            let request = layout(1000, align);
            let first = cache.allocate(request).unwrap().cast::<u8>();
            assert_eq!(first.as_ptr() as usize % align, 0);
            // SAFETY: allocated just above with `request`.
            unsafe { cache.deallocate(first, request) };
            let again = cache.allocate(request).unwrap().cast::<u8>();
            assert_eq!(again, first, "{policy:?}: the front hands the block back");
            // SAFETY: as above.
            unsafe { cache.deallocate(again, request) };
        }
        assert_books(&cache.stats(), &backing, policy);
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

/// The same absurd requests on a best-fit cache over its own reserved range
/// (`build()`) with fronts: `AllocError`s, and the cache works afterwards.
#[cfg(not(miri))]
#[test]
fn absurd_requests_fail_on_a_reserved_best_fit_cache_with_fronts() {
    let cache = fronted(SizePolicy::BestFit, FRONT_CACHE_BYTES).build();
    let max = isize::MAX as usize;
    for request in [
        layout(max - 63, 64),
        layout(max / 2, 4096),
        layout(1, 1 << 62),
    ] {
        assert_eq!(cache.allocate(request), Err(AllocError), "{request:?}");
    }
    let held = take(&cache, l(4096));
    give_stamped(&cache, held);
    let held = take(&cache, l(4096));
    assert_eq!(cache.stats().hits, 1);
    give_stamped(&cache, held);
    cache.release_cached();
    assert_eq!(cache.stats().bytes_reserved, 0);
}

/// Zeroed requests served from a front (or from blocks the shared side
/// refilled it with, adopted from a thread that exited) are zero, though
/// the blocks were dirty when freed; `grow_zeroed` into a dirty block from
/// a front keeps the old bytes and zeroes the rest.
#[test]
fn zeroed_requests_served_from_fronts_are_zero() {
    const DIRTY: u8 = 0xAB;
    fn dirty(cache: &Cache, size: usize) -> Held {
        let held = take(cache, l(size));
        // SAFETY: a live block of `size` bytes, ours alone.
        unsafe { held.ptr.as_ptr().write_bytes(DIRTY, size) };
        held
    }
    let zero = |cache: &Cache, request: Layout| -> Held {
        let got = cache.allocate_zeroed(request).unwrap();
        let held = Held {
            ptr: got.cast(),
            layout: request,
        };
        assert!(
            held.bytes().iter().all(|&b| b == 0),
            "a zeroed block is not zero"
        );
        held
    };
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, FRONT_CACHE_BYTES));
        // From this thread's front: the very block, zeroed.
        let held = dirty(&cache, 1000);
        let addr = held.addr();
        give(&cache, held);
        let again = zero(&cache, l(1000));
        assert_eq!(again.addr(), addr, "{policy:?}");
        give(&cache, again);
        // From an exited thread's front, adopted (and refilled into this
        // thread's front).
        let worker_cache = cache.clone();
        thread::spawn(move || {
            let blocks: Vec<Held> = (0..6).map(|_| dirty(&worker_cache, 4096)).collect();
            blocks
                .into_iter()
                .for_each(|held| give(&worker_cache, held));
        })
        .join()
        .unwrap();
        let hits = cache.stats().hits;
        let blocks: Vec<Held> = (0..6).map(|_| zero(&cache, l(4096))).collect();
        assert_eq!(cache.stats().hits, hits + 6, "{policy:?}");
        blocks.into_iter().for_each(|held| give(&cache, held));
        // `grow_zeroed` into a dirty 8 KiB block waiting in this front.
        let spare = dirty(&cache, 8192);
        let spare_addr = spare.addr();
        give(&cache, spare);
        let small = take(&cache, l(1000));
        small.fill(9);
        // SAFETY: `small` is live, allocated for `l(1000)`; `l(8192)` is
        // larger.
        let grown = unsafe { cache.grow_zeroed(small.ptr, small.layout, l(8192)) }.unwrap();
        let grown = Held {
            ptr: grown.cast(),
            layout: l(8192),
        };
        assert_eq!(grown.addr(), spare_addr, "{policy:?}: the front's block");
        assert!(grown.bytes()[..1000] == *pattern(9, 1000), "{policy:?}");
        assert!(grown.bytes()[1000..].iter().all(|&b| b == 0), "{policy:?}");
        give(&cache, grown);
        assert_books(&cache.stats(), &backing, policy);
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

// ---------------------------------------------------------------------------
// Resizes.

/// allocator-api2 `Vec`s grow element by element and `shrink_to_fit`
/// through a cache with fronts, on one thread and across threads (pass 2
/// grows on a worker; the test's thread shrinks and frees): contents
/// survive, the gauges are exact after each step, and a pass repeated on
/// the same thread (pass 1) takes no new memory.
#[test]
fn vec_growth_and_shrink_through_fronts() {
    const LEN: usize = 20_000;
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, FRONT_CACHE_BYTES));
        let mut worker = Worker::spawn();
        for pass in 0..3u64 {
            let misses = cache.stats().misses;
            let grow = move |cache: Cache| {
                let mut v: AVec<u64, Cache> = AVec::new_in(cache);
                for i in 0..LEN as u64 {
                    v.push(i * 3 + pass);
                }
                v
            };
            let mut v = if pass == 2 {
                let worker_cache = cache.clone();
                worker.run(move || grow(worker_cache))
            } else {
                grow(cache.clone())
            };
            let intact =
                |v: &AVec<u64, Cache>| v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3 + pass);
            assert!(
                intact(&v),
                "{policy:?}, pass {pass}: growth lost the contents"
            );
            let check_one_live = |v: &AVec<u64, Cache>| {
                let stats = cache.stats();
                let bytes = v.capacity() * 8;
                assert_eq!(
                    (stats.bytes_in_use, stats.blocks_in_use),
                    (bytes, 1),
                    "{policy:?}: {stats:?}"
                );
                if policy != SizePolicy::BestFit {
                    assert_eq!(
                        stats.bytes_lost_to_rounding,
                        block_of(policy, layout(bytes, 8)).size() - bytes,
                        "{stats:?}"
                    );
                }
                assert_books(&stats, &backing, policy);
            };
            check_one_live(&v);
            for keep in [LEN / 3, 10] {
                v.truncate(keep);
                v.shrink_to_fit();
                assert_eq!(v.capacity(), keep);
                assert!(
                    intact(&v),
                    "{policy:?}, pass {pass}: a shrink lost the contents"
                );
                check_one_live(&v);
            }
            drop(v);
            let stats = cache.stats();
            assert_eq!(
                (stats.bytes_in_use, stats.blocks_in_use),
                (0, 0),
                "{stats:?}"
            );
            assert_books(&stats, &backing, policy);
            if pass == 1 {
                assert_eq!(
                    stats.misses, misses,
                    "{policy:?}: the same growth on the same thread took new memory"
                );
            }
        }
        worker.exit();
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

/// Best fit: a block may be longer than its request rounded to 64 (a free
/// tail too short to split off stays with it: a block shrunk in place, or
/// the last block carved from a segment). Freed into a front, with nothing
/// in use, the stats must count no byte as lost to rounding ("bytes of the
/// blocks in use beyond what their requests asked for"), and everything
/// reserved is cached.
#[test]
fn best_fit_fronts_count_nothing_lost_to_rounding_with_nothing_in_use() {
    const SEGMENT: usize = 256 << 10;
    #[track_caller]
    fn assert_nothing_lost(cache: &Cache, backing: &Counting) {
        let stats = cache.stats();
        assert_eq!(
            (stats.bytes_in_use, stats.blocks_in_use),
            (0, 0),
            "{stats:?}"
        );
        assert_books(&stats, backing, SizePolicy::BestFit);
        assert_eq!(
            (stats.bytes_lost_to_rounding, stats.bytes_cached),
            (0, stats.bytes_reserved),
            "nothing in use, yet bytes lost to rounding: {stats:?}"
        );
    }
    let mut failures = Vec::new();

    // A block shrunk in place from 1000 to 700 bytes: without fronts it
    // would keep its 1024 (a 320-byte tail is too short to split off); with
    // them the tail goes back.
    let (cache, backing) = built(fronted(SizePolicy::BestFit, FRONT_CACHE_BYTES));
    let (old, new) = (l(1000), l(700));
    let block = cache.allocate(old).unwrap().cast::<u8>();
    // SAFETY: `block` is live, allocated for `old`; `new` is smaller.
    let shrunk = unsafe { cache.shrink(block, old, new) }
        .unwrap()
        .cast::<u8>();
    assert_eq!(shrunk, block, "shrunk in place");
    // SAFETY: live, now of layout `new`.
    unsafe { cache.deallocate(shrunk, new) };
    failures.extend(panic::catch_unwind(|| assert_nothing_lost(&cache, &backing)).err());

    // A segment filled with 4 KiB blocks but the last 4 KiB, then a request
    // of 3648 bytes: with front caches the 448 bytes left after it go back
    // to the free ranges (a cache without fronts keeps them with the block).
    let (cache, backing) = built(fronted(SizePolicy::BestFit, FRONT_CACHE_BYTES));
    let mut blocks: Vec<Held> = (0..SEGMENT / 4096 - 1)
        .map(|_| take(&cache, l(4096)))
        .collect();
    blocks.push(take(&cache, l(3648)));
    assert_eq!(cache.stats().bytes_reserved, SEGMENT, "one segment");
    assert_eq!(
        cache.stats().bytes_lost_to_rounding,
        0,
        "the tail is split off"
    );
    for held in blocks.into_iter().rev() {
        give_stamped(&cache, held);
    }
    failures.extend(panic::catch_unwind(|| assert_nothing_lost(&cache, &backing)).err());

    if let Some(payload) = failures.into_iter().next() {
        panic::resume_unwind(payload);
    }
}

/// One thread alone (exact sizes and size classes): a seeded random mix of
/// allocations, frees, trims and releases through its front; after every
/// operation the peaks of bytes in use, cached and reserved are exactly the
/// highest values seen (the stats fold the thread's front counters, its
/// own peaks included, over shared books nothing else moved).
#[test]
fn a_single_thread_sees_exact_peaks() {
    const STEPS: usize = 3000;
    let sizes = [64, 100, 1000, 4096, 5000, 20_000, 70_000];
    for policy in [SizePolicy::Exact, SizePolicy::PowerOfTwoDivisions(4)] {
        for limit in [FRONT_CACHE_BYTES, 16 << 10] {
            let (cache, backing) = built(fronted(policy, limit));
            let mut rng = crate::fixture::Rng::new(0xF207 + limit as u64);
            let mut live: Vec<Held> = Vec::new();
            let mut peaks = Peaks::default();
            for step in 0..STEPS {
                match rng.below(20) {
                    0..=9 if live.len() < 40 => {
                        live.push(take(&cache, l(sizes[rng.below(sizes.len())])));
                    }
                    0..=17 if !live.is_empty() => {
                        let held = live.swap_remove(rng.below(live.len()));
                        give_stamped(&cache, held);
                    }
                    18 => drop(cache.trim(rng.below(200_000))),
                    19 => drop(cache.release_cached()),
                    _ => {}
                }
                let stats = cache.stats();
                peaks.see(&stats);
                assert_books(&stats, &backing, policy);
                if let Err(payload) = panic::catch_unwind(|| peaks.assert_exact(&stats)) {
                    eprintln!("{policy:?}, front limit {limit}, step {step}");
                    panic::resume_unwind(payload);
                }
            }
            live.into_iter().for_each(|held| give_stamped(&cache, held));
            release_everything(&cache, &backing);
            drop(cache);
            backing.assert_all_returned();
        }
    }
}

/// A block freed into a front, then its front drained into the shared
/// lists (a trim with nothing to give back, a release, or another thread's
/// slow path adopting the front of a thread that exited): the block is
/// cached once all along, so the peak of cached bytes stays its size.
#[test]
fn draining_a_front_counts_its_blocks_once_in_the_peak() {
    const SIZE: usize = 64 << 10;
    fn free_here(cache: &Cache) {
        let held = take(cache, l(SIZE));
        give(cache, held);
    }
    type Drain = (&'static str, fn(&Cache));
    let drains: [Drain; 3] = [
        ("trim(usize::MAX)", |cache| {
            free_here(cache);
            cache.trim(usize::MAX);
        }),
        ("release_cached()", |cache| {
            free_here(cache);
            cache.release_cached();
        }),
        ("a thread's exit, then a miss here", |cache| {
            let worker_cache = cache.clone();
            thread::spawn(move || free_here(&worker_cache))
                .join()
                .unwrap();
            // This thread's next slow path adopts the exited thread's front.
            let held = take(cache, l(1000));
            give(cache, held);
        }),
    ];
    let mut failures = Vec::new();
    for policy in [SizePolicy::Exact, SizePolicy::PowerOfTwoDivisions(4)] {
        for (name, drain) in drains {
            let (cache, _backing) = built(fronted(policy, FRONT_CACHE_BYTES));
            drain(&cache);
            let stats = cache.stats();
            let highest = SIZE + block_of(policy, l(1000)).size();
            if stats.peak_bytes_cached > highest {
                failures.push(format!(
                    "{policy:?}, {name}: peak_bytes_cached {} (at most {highest}): {stats:?}",
                    stats.peak_bytes_cached
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Two threads taking turns (never inside the cache at once): a peak of
/// cached bytes, documented as an upper bound with several threads, must
/// never fall below a value `stats()` already reported. Thread B keeps a
/// block in its front (folded into the shared books), A frees one into
/// its front (not folded): 3000 bytes cached, reported. Then B takes its
/// block back and folds: the shared books lose B's 1000 bytes while A's
/// peak delta (2000) is still added to them as they stand.
#[test]
fn peaks_never_fall_below_what_stats_reported() {
    let (cache, backing) = built(fronted(SizePolicy::Exact, FRONT_CACHE_BYTES));
    let mut b = Worker::spawn();
    // Runs on B: takes a block of each size; frees them unless `keep`.
    let on_b = |b: &mut Worker, sizes: &'static [usize], keep: bool| -> Vec<Held> {
        let cache = cache.clone();
        b.run(move || {
            let blocks = sizes.iter().map(|&size| take(&cache, l(size)));
            if keep {
                return blocks.collect();
            }
            blocks.for_each(|held| give(&cache, held));
            Vec::new()
        })
    };
    // B: 1000 bytes into its front; a miss folds them.
    on_b(&mut b, &[1000], false);
    let mut kept = on_b(&mut b, &[64], true);
    // A (this thread): 2000 bytes into its front.
    let held = take(&cache, l(2000));
    give(&cache, held);
    let reported = cache.stats();
    assert_eq!(reported.bytes_cached, 3000, "{reported:?}");
    assert!(reported.peak_bytes_cached >= 3000, "{reported:?}");
    // B takes its block back (a hit) and misses (a fold).
    kept.extend(on_b(&mut b, &[1000, 128], true));
    let later = cache.stats();
    b.exit();
    kept.into_iter().for_each(|held| give(&cache, held));
    release_everything(&cache, &backing);
    assert!(
        later.peak_bytes_cached >= reported.bytes_cached,
        "peak_bytes_cached {} fell below the {} bytes cached reported before: {later:?}",
        later.peak_bytes_cached,
        reported.bytes_cached
    );
}

// ---------------------------------------------------------------------------
// Concurrency: drains and stats while other threads work.

/// Counts its thread out when dropped, panicking or not: a thread looping
/// until the others are done never hangs on one that panicked.
struct Finished<'a>(&'a AtomicUsize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// Sizes with many keys, so a thread's front slow paths (misses that fold
/// its counters, full bins and over-limit fronts moving a batch) are
/// frequent.
fn many_keys() -> Vec<usize> {
    (1..=48).map(|i| i * 64).collect()
}

/// The largest of [`many_keys`], and its block under every policy.
const MANY_KEYS_MAX: usize = 48 * 64;

/// The front limit of the concurrency tests.
const RACE_FRONT: usize = 8 << 10;

/// How long workers go on past their rounds for an observer that has not
/// yet seen them work (a loaded machine may run it late).
const OVERLAP_DEADLINE: Duration = Duration::from_secs(60);

/// Worker threads' traffic and one observer racing it (a drainer, a stats
/// reader). Each worker counts its operations (allocations and frees); a
/// call of the observer overlapped the traffic if some worker did a whole
/// operation while it ran (its count moved by two between loads just
/// before and just after the call). Workers do their rounds, then go on
/// until the observer has seen the overlap it waits for, has stopped
/// (panicking or not), or the deadline passed.
struct Traffic {
    ops: Vec<AtomicUsize>,
    working: AtomicUsize,
    /// The observer saw what it waits for, or stopped.
    observed: AtomicBool,
    deadline: Instant,
}

impl Traffic {
    fn new(workers: usize) -> Self {
        Self {
            ops: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            working: AtomicUsize::new(workers),
            observed: AtomicBool::new(false),
            deadline: Instant::now() + OVERLAP_DEADLINE,
        }
    }

    /// Whether a worker that did `round` rounds (at least `rounds`) goes on.
    fn more(&self, round: usize, rounds: usize) -> bool {
        round < rounds
            || !(self.observed.load(Ordering::Acquire) || Instant::now() >= self.deadline)
    }

    /// `worker` finished an allocation or a free.
    fn op_done(&self, worker: usize) {
        self.ops[worker].fetch_add(1, Ordering::Release);
    }

    fn working(&self) -> bool {
        self.working.load(Ordering::Acquire) > 0
    }

    /// Runs `call`; true if some worker did a whole operation meanwhile.
    fn during<R>(&self, call: impl FnOnce() -> R) -> (R, bool) {
        let before: Vec<usize> = self.ops.iter().map(|n| n.load(Ordering::Acquire)).collect();
        let result = call();
        let overlapped =
            (self.ops.iter().zip(before)).any(|(n, was)| n.load(Ordering::Acquire) >= was + 2);
        (result, overlapped)
    }

    /// Every worker's allocations (half its operations, once all are done).
    fn allocations(&self) -> u64 {
        self.ops
            .iter()
            .map(|n| n.load(Ordering::Acquire) as u64 / 2)
            .sum()
    }
}

/// Marks the observer done when dropped, panicking or not, so workers
/// waiting for it stop.
struct Observing<'a>(&'a Traffic);

impl Drop for Observing<'_> {
    fn drop(&mut self) {
        self.0.observed.store(true, Ordering::Release);
    }
}

/// What a `stats()` snapshot taken while `workers` threads work fronts of
/// `limit` bytes may be off by, in bytes: the README's "what is in flight".
/// A snapshot reads each front's counters (those since its thread's last
/// slow path), then the shared books; meanwhile the thread may fold those
/// counters into the books (counted twice) or take them and not yet fold
/// them (missed), and go on counting. A front holds at most its limit, so
/// between two slow paths its counters move by at most twice its limit
/// (its limit in, its limit out, a refill included); the snapshot can be
/// off by two such sets per thread.
fn in_flight(workers: usize, limit: usize) -> usize {
    workers * 2 * 2 * limit
}

/// Three threads allocate and free blocks of many sizes through small
/// fronts (their slow paths take their counters and fold them under the
/// shared lock), while another loops `release_cached()` and `trim(0)`,
/// draining their fronts in between, until a drain ran while a worker did
/// a whole allocation or free and (but for best fit, which gives back only
/// whole free segments) gave bytes back: nothing may panic, every block
/// keeps its bytes, and once all are done the books are exact, the peaks
/// within what the threads could hold (plus what was in flight), and a
/// release leaves nothing reserved.
#[test]
fn releases_and_trims_racing_with_front_slow_paths() {
    const WORKERS: usize = 3;
    const ROUNDS: usize = 1000;
    const BLOCKS: usize = 4;
    let sizes = many_keys();
    // Each worker holds at most `BLOCKS` blocks at once.
    let live = WORKERS * BLOCKS * MANY_KEYS_MAX;
    let slack = in_flight(WORKERS, RACE_FRONT);
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, RACE_FRONT));
        let traffic = Traffic::new(WORKERS);
        let raced = panic::catch_unwind(panic::AssertUnwindSafe(|| {
            thread::scope(|threads| {
                for worker in 0..WORKERS {
                    let (cache, sizes, traffic) = (&cache, &sizes, &traffic);
                    threads.spawn(move || {
                        let _done = Finished(&traffic.working);
                        let mut round = 0;
                        while traffic.more(round, ROUNDS) {
                            // Blocks with no destructor: a panic in one free
                            // must not run the others' while unwinding.
                            let blocks: Vec<Held> = (0..BLOCKS)
                                .map(|i| {
                                    let at = round * 7 + i * 13 + worker * 5;
                                    let held = take(cache, l(sizes[at % sizes.len()]));
                                    traffic.op_done(worker);
                                    held
                                })
                                .collect();
                            for held in blocks {
                                give_stamped(cache, held);
                                traffic.op_done(worker);
                            }
                            round += 1;
                        }
                    });
                }
                let drainer = threads.spawn(|| {
                    let _observing = Observing(&traffic);
                    let (mut drains, mut overlapping) = (0u64, 0u64);
                    while traffic.working() {
                        let (given_back, overlapped) = traffic.during(|| {
                            if drains.is_multiple_of(2) {
                                cache.release_cached()
                            } else {
                                cache.trim(0)
                            }
                        });
                        drains += 1;
                        // Best fit gives back only whole free segments,
                        // which the workers' blocks keep while they work:
                        // there a drain that overlapped them is enough.
                        if overlapped && (given_back > 0 || policy == SizePolicy::BestFit) {
                            overlapping += 1;
                            traffic.observed.store(true, Ordering::Release);
                        }
                    }
                    (drains, overlapping)
                });
                drainer
                    .join()
                    .unwrap_or_else(|payload| panic::resume_unwind(payload))
            })
        }));
        let (drains, drains_overlapping) = match raced {
            Ok(counts) => counts,
            Err(payload) => {
                // The cache's books may be broken: its drop could panic
                // again while this one unwinds (an abort that would take the
                // other tests of this binary with it). Leaked instead.
                std::mem::forget(cache);
                panic::resume_unwind(payload);
            }
        };
        let stats = cache.stats();
        assert!(
            drains_overlapping > 0,
            "{policy:?}: none of {drains} drains ran while a worker allocated or freed \
             (and gave bytes back): {stats:?}"
        );
        let blocks = traffic.allocations();
        assert!(blocks >= (WORKERS * ROUNDS * BLOCKS) as u64);
        assert_eq!((stats.hits + stats.misses, stats.frees), (blocks, blocks));
        assert_books(&stats, &backing, policy);
        // The peaks are estimates built from the shared books and each
        // front's counters as they stood: within what the workers could
        // hold at once, plus what was in flight (a wrapped figure is far
        // out).
        assert!(
            stats.peak_bytes_in_use <= live + slack,
            "{policy:?}: peak_bytes_in_use over {}: {stats:?}",
            live + slack
        );
        assert!(
            stats.peak_bytes_cached <= stats.peak_bytes_reserved + slack,
            "{policy:?}: peak_bytes_cached over peak_bytes_reserved + {slack}: {stats:?}"
        );
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

/// `stats()` read while other threads work their fronts (misses, hits and
/// frees whose slow paths fold the thread's counters), until at least one
/// read ran while a worker did a whole allocation or free. A snapshot is
/// exact only with no thread inside; one taken during the traffic may be
/// off by what is in flight (`in_flight`), so each is checked against what
/// the test knows, within that: bytes and blocks in use within what the
/// workers can hold at once, cached bytes within the bytes reserved (which
/// only move under the shared lock, so are exact), and so the bytes in use,
/// lost and cached together; cached blocks within their bytes' range of
/// sizes; peaks within the same bounds and never below an earlier read's.
/// At rest, the books are exact.
///
/// What no check here can see: a gauge that dips below zero reads 0
/// (`stats()` clamps it), so a snapshot that undercounts by more than what
/// is in flight passes.
#[test]
fn stats_read_during_front_traffic_stay_plausible() {
    const WORKERS: usize = 2;
    const ROUNDS: usize = 3000;
    let sizes = many_keys();
    // Each worker holds at most two blocks at once.
    let (live_blocks, live) = (WORKERS * 2, WORKERS * 2 * MANY_KEYS_MAX);
    let slack = in_flight(WORKERS, RACE_FRONT);
    // The smallest block.
    let least = sizes[0];
    for policy in POLICIES {
        let (cache, backing) = built(fronted(policy, RACE_FRONT));
        let traffic = Traffic::new(WORKERS);
        let (reads, overlapping) = thread::scope(|threads| {
            for worker in 0..WORKERS {
                let (cache, sizes, traffic) = (&cache, &sizes, &traffic);
                threads.spawn(move || {
                    let _done = Finished(&traffic.working);
                    let mut round = 0;
                    while traffic.more(round, ROUNDS) {
                        let a = take(cache, l(sizes[(round * 7 + worker) % sizes.len()]));
                        traffic.op_done(worker);
                        let b = take(cache, l(sizes[round % sizes.len()]));
                        traffic.op_done(worker);
                        give(cache, a);
                        traffic.op_done(worker);
                        give(cache, b);
                        traffic.op_done(worker);
                        round += 1;
                    }
                });
            }
            let _observing = Observing(&traffic);
            let (mut reads, mut overlapping) = (0u64, 0u64);
            let mut last = Stats::default();
            while traffic.working() {
                let (s, overlapped) = traffic.during(|| cache.stats());
                reads += 1;
                if overlapped {
                    overlapping += 1;
                    traffic.observed.store(true, Ordering::Release);
                }
                // Listed blocks (not best fit's free ranges): cached bytes
                // are whole blocks of the keys.
                let listed = policy != SizePolicy::BestFit;
                let checks = [
                    ("bytes_in_use", s.bytes_in_use <= live + slack),
                    (
                        "blocks_in_use",
                        s.blocks_in_use <= live_blocks + slack / least,
                    ),
                    (
                        "bytes_lost_to_rounding",
                        s.bytes_lost_to_rounding
                            <= if policy == SizePolicy::Exact { 0 } else { live } + slack,
                    ),
                    ("bytes_cached", s.bytes_cached <= s.bytes_reserved + slack),
                    (
                        "blocks_cached against bytes_cached",
                        !listed
                            || s.blocks_cached.saturating_mul(least) <= s.bytes_cached + slack
                                && s.bytes_cached
                                    <= s.blocks_cached.saturating_mul(MANY_KEYS_MAX) + slack,
                    ),
                    (
                        "in use, lost and cached against reserved",
                        (s.bytes_in_use)
                            .saturating_add(s.bytes_lost_to_rounding)
                            .saturating_add(s.bytes_cached)
                            <= s.bytes_reserved + slack,
                    ),
                    ("peak_bytes_in_use", s.peak_bytes_in_use <= live + slack),
                    (
                        "peak_bytes_cached",
                        s.peak_bytes_cached <= s.peak_bytes_reserved + slack,
                    ),
                    (
                        "peaks never fall",
                        s.peak_bytes_in_use >= last.peak_bytes_in_use
                            && s.peak_bytes_cached >= last.peak_bytes_cached
                            && s.peak_bytes_reserved >= last.peak_bytes_reserved,
                    ),
                ];
                for (name, holds) in checks {
                    assert!(
                        holds,
                        "{policy:?}, read {reads} (overlapping: {overlapped}): {name}: {s:?} \
                         after {last:?} (live {live}, slack {slack})"
                    );
                }
                last = s;
            }
            (reads, overlapping)
        });
        let stats = cache.stats();
        assert!(reads > 0, "{policy:?}: no read during the traffic");
        assert!(
            overlapping > 0,
            "{policy:?}: none of {reads} reads ran while a worker allocated or freed"
        );
        let blocks = traffic.allocations();
        assert!(blocks >= (WORKERS * ROUNDS * 2) as u64);
        assert_eq!(
            (stats.hits + stats.misses, stats.frees),
            (blocks, blocks),
            "{stats:?}"
        );
        assert_eq!(
            (stats.bytes_in_use, stats.blocks_in_use),
            (0, 0),
            "{stats:?}"
        );
        assert_books(&stats, &backing, policy);
        assert!(
            stats.peak_bytes_in_use <= live + slack,
            "{policy:?}: {stats:?}"
        );
        release_everything(&cache, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

/// A front cache over the global allocator, for the `Global` bound of
/// `build_in` (no ledger): the doc example's shape with two threads.
#[test]
fn fronts_over_the_global_allocator_serve_two_threads() {
    let cache = fronted(SizePolicy::Exact, FRONT_CACHE_BYTES).build_in(Global);
    thread::scope(|threads| {
        for _ in 0..2 {
            threads.spawn(|| {
                for _ in 0..100 {
                    drop(AVec::<u8, _>::with_capacity_in(1 << 16, cache.clone()));
                }
            });
        }
    });
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.misses, 200);
    assert!(stats.misses <= 2, "{stats:?}");
    assert_eq!(cache.release_cached(), stats.bytes_cached);
    assert_eq!(cache.stats().bytes_reserved, 0);
}

//! Soak: many threads (more than cores) mixing every API for a bounded time,
//! with seeded fault injection, then a check that nothing leaked.
//!
//! Eight workers run until the deadline, each doing a random mix of:
//! - allocator-api2 `Vec`/`Box` and hashbrown `HashMap`s on caches of
//!   different size policies and caps, most of them on one shared `Budget`;
//!   each worker drops its own caches and builds new ones now and then
//!   (caches leaving and joining the budget while their blocks are still
//!   held elsewhere);
//! - scopes (`cache.enter()`, nested sometimes) under `ScopedGlobal`, with
//!   plain `Vec`/`String` workloads whose buffers are kept past the scope's
//!   end, or sent over a channel to the next worker and freed there;
//! - passes on one shared `Planned` arena (recorded once by a `Recorder`),
//!   through the allocator API or a planned scope, sometimes deviating from
//!   the recording (bigger, extra or kept blocks; and passes of several
//!   workers overlap), plus short private record-plan-run rounds;
//! - `trim`, `release_cached` and stats snapshots, checked for consistency;
//! - producer/consumer pipelines through caches with per-thread front caches
//!   (`Builder::front_cache_bytes`; exact sizes, size classes on the faulty
//!   backing, best fit): a batch of blocks allocated on one worker, through
//!   the handle or as plain `Vec`s in the cache's scope, and sent to the next
//!   worker, which frees them on its own thread. The front caches also serve
//!   the other operations (collections, maps, scopes, trims and releases
//!   racing with traffic). Their stats are exact only with no thread inside
//!   them, so they are checked once the workers are joined, not while they
//!   run. `soak` leaves them on reliable backings and does not trim or
//!   release them while the workers run; `soak_with_front_drains` does both.
//!
//! Half the caches (and the private plans) take their blocks from a `Counting`
//! backing whose refusal knob refuses 2% of attempts on a seeded schedule, so the
//! release-and-retry path and clean `AllocError`s run under load; code on
//! those caches uses only fallible calls (`try_reserve`, `try_new_in`).
//!
//! Every buffer carries a pattern that is checked when it is freed. At the
//! end every worker is joined and everything dropped; every backing ledger
//! must hold nothing and the budget nothing.
//!
//! Knobs (environment):
//! - `SOAK_SECONDS`: how long the workers run; default 15. CI runs this test
//!   four times (`cargo test`, `--features nightly`, `+stable`, and under
//!   AddressSanitizer), so the default costs about a minute in total.
//! - `SOAK_SEED`: the base seed (default fixed). Worker and backing seeds are
//!   derived from it and printed; the interleaving is up to the scheduler,
//!   but each worker's choices follow its seed.

#[path = "all/fixture/mod.rs"]
mod fixture;

use std::io::Write as _;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use allocator_api2::alloc::{AllocError, Allocator};
use allocator_api2::boxed::Box as ABox;
use allocator_api2::vec::Vec as AVec;
use caching_allocator::plan::{Plan, Planned, Recorder};
use caching_allocator::{
    Budget, CachingAllocator, FRONT_CACHE_BYTES, ScopedGlobal, SizePolicy, Stats,
};
use fixture::{Counting, Rng, pattern, splitmix64};

#[global_allocator]
static GLOBAL: ScopedGlobal = ScopedGlobal::new();

const WORKERS: usize = 8;
const DEFAULT_SECONDS: f64 = 15.0;
const DEFAULT_SEED: u64 = 0x50A4_7E57;
/// The shared budget: small enough that caches evict each other all the time.
const BUDGET: usize = 1 << 20;
/// Probability that the faulty backing refuses an attempt.
const FAULT_PROBABILITY: f64 = 0.02;
/// Buffers a worker keeps (past scopes, across operations) at most.
const HELD: usize = 48;
const BOXED: usize = 3000;

type Cache = CachingAllocator<Counting>;
type Map = hashbrown::HashMap<u32, AVec<u8, Cache>, hashbrown::DefaultHashBuilder, Cache>;

/// What the workers share: built by the test before they start.
struct Shared {
    budget: Budget,
    /// Never fails (probability 0): code on it may use infallible calls.
    reliable: Counting,
    /// Fails `FAULT_PROBABILITY` of attempts.
    faulty: Counting,
    /// Caches every worker uses at once.
    caches: Vec<Cache>,
    /// Caches with per-thread front caches, every worker's too; their stats
    /// are exact only with no thread inside them (checked at the end).
    fronted: Vec<Cache>,
    /// Whether workers trim and release the front caches too.
    front_drains: bool,
    plan: Plan,
    planned: Planned<Counting>,
    deadline: Instant,
}

/// A byte of a text buffer: ASCII, position dependent.
fn text_byte(seed: u8, i: usize) -> u8 {
    b'a' + ((usize::from(seed) + i) % 26) as u8
}

enum Payload {
    Plain(Vec<u8>),
    Text(String),
    Cached(AVec<u8, Cache>),
    Boxed(ABox<[u8; BOXED], Cache>),
    Arena(AVec<u8, Planned<Counting>>),
}

/// A buffer and the seed of its contents, checked whenever it is freed.
struct Buf {
    payload: Payload,
    seed: u8,
}

impl Buf {
    fn new(payload: Payload, seed: u8) -> Self {
        let buf = Self { payload, seed };
        buf.check();
        buf
    }

    fn bytes(&self) -> &[u8] {
        match &self.payload {
            Payload::Plain(v) => v,
            Payload::Text(s) => s.as_bytes(),
            Payload::Cached(v) => v,
            Payload::Boxed(b) => &b[..],
            Payload::Arena(v) => v,
        }
    }

    fn check(&self) {
        let bytes = self.bytes();
        let intact = match self.payload {
            Payload::Text(_) => bytes
                .iter()
                .enumerate()
                .all(|(i, &b)| b == text_byte(self.seed, i)),
            _ => bytes == pattern(self.seed, bytes.len()),
        };
        assert!(
            intact,
            "buffer of {} bytes (seed {}) changed",
            bytes.len(),
            self.seed
        );
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if !thread::panicking() {
            self.check();
        }
    }
}

/// `len` pattern bytes in a new allocator-api2 `Vec`, or the allocator's
/// clean refusal.
fn filled<A: Allocator>(alloc: A, len: usize, seed: u8) -> Result<AVec<u8, A>, AllocError> {
    let mut v = AVec::new_in(alloc);
    v.try_reserve_exact(len).map_err(|_| AllocError)?;
    v.extend_from_slice(pattern(seed, len));
    Ok(v)
}

/// The same in a plain `Vec`, fallibly (inside a scope of a cache that may
/// fail, an infallible allocation would abort).
fn filled_plain(len: usize, seed: u8) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.extend_from_slice(pattern(seed, len));
    Some(v)
}

/// How a pass departs from the recording.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Deviation {
    None,
    /// The first block is bigger than its slot.
    Bigger,
    /// An allocation the recording did not have, shifting the rest.
    Extra,
    /// The last block outlives the pass.
    Keep,
}

/// Sizes of the recorded pass: all at least the scoped global allocator's
/// minimum, so a planned scope sees the same sequence as the API.
const PASS: [usize; 4] = [16 << 10, 8 << 10, 32 << 10, 4 << 10];

/// A small model pass: four blocks with overlapping lifetimes, each made by
/// `fill(len, seed)` and checked. Returns the block kept with
/// `Deviation::Keep`; `None` if `fill` failed.
fn forward<V: std::ops::Deref<Target = [u8]>>(
    fill: impl Fn(usize, u8) -> Option<V>,
    seed: u8,
    deviation: Deviation,
) -> Option<Option<V>> {
    let first = if deviation == Deviation::Bigger {
        PASS[0] * 2
    } else {
        PASS[0]
    };
    let a = fill(first, seed)?;
    let b = fill(PASS[1], seed.wrapping_add(1))?;
    assert!(a[..] == *pattern(seed, first));
    drop(a);
    let extra = if deviation == Deviation::Extra {
        Some(fill(12 << 10, seed.wrapping_add(9))?)
    } else {
        None
    };
    let c = fill(PASS[2], seed.wrapping_add(2))?;
    let d = fill(PASS[3], seed.wrapping_add(3))?;
    assert!(b[..] == *pattern(seed.wrapping_add(1), PASS[1]));
    drop(b);
    assert!(c[..] == *pattern(seed.wrapping_add(2), PASS[2]));
    if let Some(extra) = &extra {
        assert!(extra[..] == *pattern(seed.wrapping_add(9), 12 << 10));
    }
    drop(c);
    assert!(d[..] == *pattern(seed.wrapping_add(3), PASS[3]));
    Some((deviation == Deviation::Keep).then_some(d))
}

/// The model pass through an allocator.
fn forward_in<A: Allocator + Clone>(
    alloc: &A,
    seed: u8,
    deviation: Deviation,
) -> Result<Option<AVec<u8, A>>, AllocError> {
    forward(
        |len, seed| filled(alloc.clone(), len, seed).ok(),
        seed,
        deviation,
    )
    .ok_or(AllocError)
}

/// The same pass with plain `Vec`s, for a planned scope.
fn forward_plain(seed: u8, deviation: Deviation) -> Option<Option<Vec<u8>>> {
    forward(filled_plain, seed, deviation)
}

/// What every snapshot of a cache's counters must satisfy, whatever other
/// threads are doing (a snapshot is taken under the cache's lock; with front
/// caches, only while no thread is inside the cache).
fn check_stats(stats: &Stats, cap: Option<usize>, policy: SizePolicy) {
    assert_eq!(
        stats.bytes_reserved,
        stats.bytes_in_use + stats.bytes_lost_to_rounding + stats.bytes_cached,
        "{stats:?}"
    );
    // Best fit counts segments and free ranges, not blocks.
    if policy != SizePolicy::BestFit {
        assert_eq!(
            stats.backing_allocs - stats.backing_frees,
            (stats.blocks_in_use + stats.blocks_cached) as u64,
            "{stats:?}"
        );
    }
    assert_eq!(
        stats.hits + stats.misses - stats.frees,
        stats.blocks_in_use as u64,
        "{stats:?}"
    );
    assert!(stats.peak_bytes_in_use >= stats.bytes_in_use, "{stats:?}");
    assert!(
        stats.peak_bytes_reserved >= stats.bytes_reserved,
        "{stats:?}"
    );
    // No absurd sizes here: every failure had a retry first.
    assert!(stats.failures <= stats.retries, "{stats:?}");
    if let Some(cap) = cap {
        assert!(stats.bytes_cached <= cap, "over the cap: {stats:?}");
        assert!(stats.peak_bytes_cached <= cap, "over the cap: {stats:?}");
    }
}

#[derive(Default, Debug)]
struct Counts {
    ops: u64,
    collections: u64,
    maps: u64,
    scopes: u64,
    passes: u64,
    private_plans: u64,
    maintenance: u64,
    sent: u64,
    received: u64,
    refused: u64,
    caches_built: u64,
    pipelines: u64,
}

struct Worker {
    rng: Rng,
    shared: Arc<Shared>,
    /// This worker's caches: replaced now and then.
    own: Vec<Cache>,
    held: Vec<Buf>,
    maps: Vec<Map>,
    tx: Sender<Buf>,
    rx: Receiver<Buf>,
    counts: Counts,
}

impl Worker {
    fn seed(&mut self) -> u8 {
        self.rng.byte()
    }

    /// A cache with a random policy, maybe a cap, maybe on the budget, on
    /// the reliable or the faulty backing.
    fn build_cache(&mut self) -> Cache {
        self.counts.caches_built += 1;
        let policies = [
            SizePolicy::Exact,
            SizePolicy::PowerOfTwoDivisions(1),
            SizePolicy::PowerOfTwoDivisions(4),
            SizePolicy::PowerOfTwoDivisions(8),
        ];
        let mut builder =
            CachingAllocator::builder().size_policy(policies[self.rng.below(policies.len())]);
        if self.rng.one_in(2) {
            builder = builder.max_cached_bytes([4 << 10, 64 << 10, 512 << 10][self.rng.below(3)]);
        }
        if self.rng.below(4) != 0 {
            builder = builder.budget(&self.shared.budget);
        }
        if self.rng.one_in(4) {
            builder = builder.stop_caching_after_failure(true);
        }
        let backing = if self.rng.one_in(2) {
            self.shared.faulty.clone()
        } else {
            self.shared.reliable.clone()
        };
        builder.build_in(backing)
    }

    /// One of this worker's caches or a shared one (front caches included).
    fn any_cache(&mut self) -> Cache {
        let shared = &self.shared;
        let i = self
            .rng
            .below(self.own.len() + shared.caches.len() + shared.fronted.len());
        self.own
            .iter()
            .chain(&shared.caches)
            .chain(&shared.fronted)
            .nth(i)
            .expect("a cache")
            .clone()
    }

    /// Whether `cache` has front caches (its stats are exact only while no
    /// thread is inside it).
    fn is_fronted(&self, cache: &Cache) -> bool {
        self.shared.fronted.iter().any(|f| f.same_cache(cache))
    }

    fn size(&mut self) -> usize {
        match self.rng.below(4) {
            0 => 1 + self.rng.below(256),
            1 => 1 + self.rng.below(4096),
            2 => 4096 + self.rng.below(28 << 10),
            _ => [4096, 8192, 16 << 10, 64 << 10][self.rng.below(4)],
        }
    }

    fn keep(&mut self, buf: Buf) {
        if self.held.len() >= HELD {
            let i = self.rng.below(self.held.len());
            self.held.swap_remove(i);
        }
        self.held.push(buf);
    }

    /// Keeps it, sends it to the next worker, or frees it now.
    fn dispose(&mut self, buf: Buf) {
        match self.rng.below(3) {
            0 => self.keep(buf),
            1 => self.send(buf),
            _ => drop(buf),
        }
    }

    fn send(&mut self, buf: Buf) {
        self.counts.sent += 1;
        // The next worker frees it, or keeps it; it is gone only at the end.
        self.tx
            .send(buf)
            .expect("the next worker holds its receiver");
    }

    fn receive(&mut self) {
        while let Ok(buf) = self.rx.try_recv() {
            self.counts.received += 1;
            if self.rng.one_in(3) {
                self.keep(buf);
            } else {
                drop(buf);
            }
        }
    }

    fn run(mut self) -> Counts {
        while Instant::now() < self.shared.deadline {
            self.counts.ops += 1;
            self.receive();
            match self.rng.below(17) {
                0..=4 => self.collections(),
                5..=6 => self.map_op(),
                7..=10 => self.scope_op(),
                11..=12 => self.pass_op(),
                13 => self.private_plan(),
                16 => self.front_pipeline(),
                _ => self.maintenance(),
            }
        }
        self.finish()
    }

    /// allocator-api2 `Vec`s and `Box`es on some cache: grown, checked,
    /// and kept, sent or freed.
    fn collections(&mut self) {
        self.counts.collections += 1;
        let cache = self.any_cache();
        let (len, seed) = (self.size(), self.seed());
        match self.rng.below(3) {
            0 => {
                let Ok(mut v) = filled(cache, len, seed) else {
                    self.counts.refused += 1;
                    return;
                };
                // Grow (through the cache: in place within a class, else a
                // move) and refill the tail.
                let more = self.size();
                if v.try_reserve(more).is_ok() {
                    v.extend_from_slice(&pattern(seed, len + more)[len..]);
                } else {
                    self.counts.refused += 1;
                }
                if self.rng.one_in(2) {
                    let keep = v.len() / 2;
                    v.truncate(keep);
                    // `shrink_to_fit` aborts on failure: only on a reliable
                    // backing.
                    if v.allocator().backing().probability() == 0.0 {
                        v.shrink_to_fit();
                    }
                }
                self.dispose(Buf::new(Payload::Cached(v), seed));
            }
            1 => match ABox::try_new_in([0u8; BOXED], cache) {
                Ok(mut b) => {
                    b.copy_from_slice(pattern(seed, BOXED));
                    self.dispose(Buf::new(Payload::Boxed(b), seed));
                }
                Err(AllocError) => self.counts.refused += 1,
            },
            _ => {
                // Several at once, freed in a random order.
                let mut bufs = Vec::new();
                for _ in 0..1 + self.rng.below(6) {
                    let (len, seed) = (self.size(), self.seed());
                    match filled(cache.clone(), len, seed) {
                        Ok(v) => bufs.push(Buf::new(Payload::Cached(v), seed)),
                        Err(AllocError) => self.counts.refused += 1,
                    }
                }
                while !bufs.is_empty() {
                    let buf = bufs.swap_remove(self.rng.below(bufs.len()));
                    self.dispose(buf);
                }
            }
        }
    }

    /// hashbrown maps on caches, their values on other caches.
    fn map_op(&mut self) {
        self.counts.maps += 1;
        if self.maps.len() < 3 || self.rng.one_in(16) {
            if self.maps.len() >= 3 {
                let map = self.maps.swap_remove(self.rng.below(self.maps.len()));
                check_map(&map);
            }
            let cache = self.any_cache();
            self.maps.push(Map::new_in(cache));
        }
        let m = self.rng.below(self.maps.len());
        for _ in 0..1 + self.rng.below(8) {
            let key = self.rng.below(64) as u32;
            if self.rng.one_in(3) {
                if let Some(value) = self.maps[m].remove(&key) {
                    assert!(value[..] == *pattern(key as u8, value.len()));
                }
                continue;
            }
            let cache = self.any_cache();
            let len = self.size();
            let Ok(value) = filled(cache, len, key as u8) else {
                self.counts.refused += 1;
                continue;
            };
            // Room first: `insert` itself would abort on a refusal.
            if self.maps[m].try_reserve(1).is_err() {
                self.counts.refused += 1;
                continue;
            }
            if let Some(old) = self.maps[m].insert(key, value) {
                assert!(old[..] == *pattern(key as u8, old.len()));
            }
        }
        if self.rng.one_in(8) {
            let map = &mut self.maps[m];
            check_map(map);
            map.retain(|key, _| key % 2 == 0);
            // Aborts on a refusal: only on a reliable backing.
            if map.allocator().backing().probability() == 0.0 {
                map.shrink_to_fit();
            }
        }
    }

    /// A scope (sometimes two, nested) with plain `Vec`/`String` work.
    fn scope_op(&mut self) {
        self.counts.scopes += 1;
        let outer = self.any_cache();
        let inner = self.rng.one_in(4).then(|| self.any_cache());
        let reliable = outer.backing().probability() == 0.0
            && inner
                .as_ref()
                .is_none_or(|c| c.backing().probability() == 0.0);
        // Nothing below may grow a vector of ours inside the scope (that
        // would be an infallible allocation from a cache that may fail):
        // room first.
        self.held.reserve(HELD + 16);
        let mut out: Vec<Buf> = Vec::with_capacity(32);
        let mut local: Vec<Buf> = Vec::with_capacity(32);
        let specs: Vec<(usize, u8, u32)> = (0..1 + self.rng.below(8))
            .map(|_| (self.size(), self.seed(), self.rng.next_u64() as u32))
            .collect();
        {
            let _scope = outer.enter();
            for &(len, seed, choice) in &specs[..specs.len() / 2 + 1] {
                if let Some(buf) = scoped_buffer(len, seed, choice, reliable) {
                    local.push(buf);
                } else {
                    self.counts.refused += 1;
                }
            }
            if let Some(inner) = &inner {
                let _nested = inner.enter();
                // Some of the outer cache's buffers are freed in the inner
                // scope: they go back to the outer cache.
                if let Some(buf) = local.pop() {
                    drop(buf);
                }
                for &(len, seed, choice) in &specs[specs.len() / 2 + 1..] {
                    if let Some(buf) = scoped_buffer(len, seed, choice, reliable) {
                        local.push(buf);
                    } else {
                        self.counts.refused += 1;
                    }
                }
            }
            // Received buffers freed inside this scope go to their owners.
            if let Ok(buf) = self.rx.try_recv() {
                self.counts.received += 1;
                drop(buf);
            }
            while let Some(buf) = local.pop() {
                match buf.seed % 3 {
                    // Sent from inside the scope (the channel's own blocks are
                    // below the scoped minimum size).
                    0 if reliable => {
                        self.counts.sent += 1;
                        self.tx.send(buf).expect("receiver alive");
                    }
                    0 => out.push(buf),
                    1 if self.held.len() < HELD => self.held.push(buf),
                    _ => drop(buf),
                }
            }
        }
        // After the scope: sent on, kept, or freed.
        for buf in out {
            self.send(buf);
        }
        if self.held.len() > HELD {
            let excess = self.held.len() - HELD;
            self.held.drain(..excess);
        }
    }

    /// A pass on the shared plan, through the API or a planned scope.
    fn pass_op(&mut self) {
        self.counts.passes += 1;
        let deviation = match self.rng.below(8) {
            0 => Deviation::Bigger,
            1 => Deviation::Extra,
            2 => Deviation::Keep,
            _ => Deviation::None,
        };
        let seed = self.seed();
        let planned = self.shared.planned.clone();
        if self.rng.one_in(2) {
            let pass = planned.pass();
            let kept =
                forward_in(&planned, seed, deviation).expect("the plan's backing never fails");
            drop(pass);
            if let Some(kept) = kept {
                // An arena block outliving its pass, freed anywhere.
                let buf = Buf::new(Payload::Arena(kept), seed.wrapping_add(3));
                self.dispose(buf);
            }
        } else {
            self.held.reserve(HELD + 16);
            let kept = {
                let _scope = planned.enter();
                let _pass = planned.pass();
                forward_plain(seed, deviation).expect("the plan's backing never fails")
            };
            if let Some(kept) = kept {
                let buf = Buf::new(Payload::Plain(kept), seed.wrapping_add(3));
                self.dispose(buf);
            }
        }
        let stats = planned.stats();
        assert!(
            stats.bytes_reserved >= self.shared.plan.arena_bytes(),
            "{stats:?}"
        );
    }

    /// Record a (maybe deviating) pass on the faulty backing, plan it, and
    /// run a few passes from an arena on it: every step may fail cleanly.
    fn private_plan(&mut self) {
        self.counts.private_plans += 1;
        let faulty = self.shared.faulty.clone();
        let recorder = Recorder::new_in(faulty.clone());
        let seed = self.seed();
        let recorded = if self.rng.one_in(2) {
            let deviation = [Deviation::None, Deviation::Extra][self.rng.below(2)];
            forward_in(&recorder, seed, deviation).map(drop)
        } else {
            // A recorder scope: plain `Vec`s are recorded.
            let _scope = recorder.enter();
            forward_plain(seed, Deviation::None)
                .map(drop)
                .ok_or(AllocError)
        };
        if recorded.is_err() {
            self.counts.refused += 1;
        }
        let plan = recorder.plan();
        drop(recorder);
        let planned = Planned::new_in(&plan, faulty);
        for _ in 0..1 + self.rng.below(3) {
            let _pass = planned.pass();
            if forward_in(&planned, seed, Deviation::None).is_err() {
                self.counts.refused += 1;
            }
        }
    }

    /// Producer/consumer through a front cache: a batch of blocks allocated
    /// here, through the handle or as plain `Vec`s in the cache's scope, all
    /// sent to the next worker, which frees (or keeps) them on its thread:
    /// this worker's front misses, the next one's fills and overflows.
    fn front_pipeline(&mut self) {
        self.counts.pipelines += 1;
        let cache = self.shared.fronted[self.rng.below(self.shared.fronted.len())].clone();
        let reliable = cache.backing().probability() == 0.0;
        let specs: Vec<(usize, u8, u32)> = (0..1 + self.rng.below(16))
            .map(|_| (self.size(), self.seed(), self.rng.next_u64() as u32))
            .collect();
        let mut out: Vec<Buf> = Vec::with_capacity(specs.len());
        if self.rng.one_in(2) {
            for &(len, seed, _) in &specs {
                match filled(cache.clone(), len, seed) {
                    Ok(v) => out.push(Buf::new(Payload::Cached(v), seed)),
                    Err(AllocError) => self.counts.refused += 1,
                }
            }
        } else {
            let _scope = cache.enter();
            for &(len, seed, choice) in &specs {
                match scoped_buffer(len, seed, choice, reliable) {
                    Some(buf) => out.push(buf),
                    None => self.counts.refused += 1,
                }
            }
        }
        for buf in out {
            self.send(buf);
        }
    }

    fn maintenance(&mut self) {
        self.counts.maintenance += 1;
        let cache = self.any_cache();
        let drains = self.shared.front_drains || !self.is_fronted(&cache);
        match self.rng.below(6) {
            0 if drains => {
                let target = [0, 4096, 64 << 10, usize::MAX][self.rng.below(4)];
                cache.trim(target);
            }
            1 if drains => {
                cache.release_cached();
            }
            2 => {
                // This worker's cache leaves (its blocks held elsewhere keep
                // it alive until they are freed) and a new one joins.
                let i = self.rng.below(self.own.len());
                self.own[i] = self.build_cache();
            }
            3 if !self.held.is_empty() => {
                // Free a few kept buffers, some on the next worker.
                for _ in 0..self.rng.below(self.held.len()) {
                    let buf = self.held.swap_remove(self.rng.below(self.held.len()));
                    if self.rng.one_in(2) {
                        self.send(buf);
                    }
                }
            }
            _ => {}
        }
        // A front cache's snapshot taken while other workers are inside it
        // is not exact (see `fronts::stats_read_during_front_traffic_stay_plausible`
        // in tests/all): checked at the end.
        if !self.is_fronted(&cache) {
            check_stats(
                &cache.stats(),
                cache.max_cached_bytes(),
                cache.size_policy(),
            );
        }
        let budget = &self.shared.budget;
        assert!(budget.bytes_cached() <= budget.limit(), "{budget:?}");
    }

    /// After the deadline: stop sending, take in everything the previous
    /// worker sends until it stops too, and free it all.
    fn finish(self) -> Counts {
        let Worker {
            tx,
            rx,
            held,
            maps,
            own,
            mut counts,
            ..
        } = self;
        drop(tx);
        for buf in rx {
            counts.received += 1;
            drop(buf);
        }
        drop(held);
        for map in &maps {
            check_map(map);
        }
        drop(maps);
        for cache in &own {
            check_stats(
                &cache.stats(),
                cache.max_cached_bytes(),
                cache.size_policy(),
            );
        }
        drop(own);
        counts
    }
}

/// A plain buffer made inside a scope: a `Vec` or a `String`, grown in steps
/// (realloc through the scoped allocator) when the scope's caches cannot
/// fail, else reserved once, fallibly.
fn scoped_buffer(len: usize, seed: u8, choice: u32, reliable: bool) -> Option<Buf> {
    let text = choice.is_multiple_of(2);
    if reliable {
        if text {
            let mut s = String::new();
            for i in 0..len {
                s.push(char::from(text_byte(seed, i)));
            }
            Some(Buf::new(Payload::Text(s), seed))
        } else if choice % 4 == 1 {
            Some(Buf::new(Payload::Plain(pattern(seed, len).to_vec()), seed))
        } else {
            let mut v: Vec<u8> = Vec::new();
            for chunk in pattern(seed, len).chunks(1000) {
                v.extend_from_slice(chunk);
            }
            Some(Buf::new(Payload::Plain(v), seed))
        }
    } else if text {
        let mut s = String::new();
        s.try_reserve_exact(len).ok()?;
        s.extend((0..len).map(|i| char::from(text_byte(seed, i))));
        Some(Buf::new(Payload::Text(s), seed))
    } else {
        Some(Buf::new(Payload::Plain(filled_plain(len, seed)?), seed))
    }
}

fn check_map(map: &Map) {
    for (&key, value) in map {
        assert!(value[..] == *pattern(key as u8, value.len()));
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Progress lines go to the real stderr: the seeds must be visible even when
/// the harness captures output.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "soak: {line}");
}

/// The soak, with front caches on reliable backings and no trim or release
/// of a front cache while the workers run (see [`soak_with_front_drains`]).
#[test]
fn soak() {
    run_soak(false);
}

/// The soak with front caches drained while the workers run: trims and
/// releases of the front caches in the workers' maintenance, and a front
/// cache on the faulty backing (a refused attempt releases the cache, which
/// drains every front).
#[test]
fn soak_with_front_drains() {
    run_soak(true);
}

/// Runs the soak; `front_drains`: the front caches are also trimmed and
/// released while the workers run, and one is on the faulty backing.
fn run_soak(front_drains: bool) {
    let seconds: f64 = env_or("SOAK_SECONDS", DEFAULT_SECONDS);
    let base_seed: u64 = env_or("SOAK_SEED", DEFAULT_SEED);
    // The pattern table is allocated on first use: outside any scope, or a
    // cache would own it (and so stay alive) forever.
    let _ = pattern(0, 0);

    let reliable_ledger = Counting::without_log();
    let faulty_ledger = Counting::without_log();
    let plan_ledger = Counting::without_log();
    reliable_ledger.set_faults(splitmix64(base_seed), 0.0);
    faulty_ledger.set_faults(splitmix64(base_seed ^ 1), FAULT_PROBABILITY);
    let (reliable, faulty) = (reliable_ledger.clone(), faulty_ledger.clone());
    let budget = Budget::new(BUDGET);

    // The pass, recorded once.
    let recorder = Recorder::new_in(plan_ledger.clone());
    forward_in(&recorder, 0, Deviation::None).unwrap();
    let plan = recorder.plan();
    drop(recorder);
    assert_eq!(plan.allocations(), PASS.len());
    let planned = Planned::new_in(&plan, plan_ledger.clone());

    let caches = vec![
        CachingAllocator::builder()
            .budget(&budget)
            .build_in(faulty.clone()),
        CachingAllocator::builder()
            .size_policy(SizePolicy::PowerOfTwoDivisions(4))
            .max_cached_bytes(256 << 10)
            .build_in(reliable.clone()),
        CachingAllocator::builder()
            .size_policy(SizePolicy::PowerOfTwoDivisions(1))
            .max_cached_bytes(128 << 10)
            .budget(&budget)
            .stop_caching_after_failure(true)
            .build_in(faulty.clone()),
        CachingAllocator::new_in(reliable.clone()),
    ];
    let fronted = vec![
        CachingAllocator::builder()
            .front_cache_bytes(256 << 10)
            .build_in(reliable.clone()),
        CachingAllocator::builder()
            .size_policy(SizePolicy::PowerOfTwoDivisions(4))
            .front_cache_bytes(FRONT_CACHE_BYTES)
            .build_in(if front_drains {
                faulty.clone()
            } else {
                reliable.clone()
            }),
        CachingAllocator::builder()
            .size_policy(SizePolicy::BestFit)
            .front_cache_bytes(FRONT_CACHE_BYTES)
            .build_in(reliable.clone()),
    ];
    let start = Instant::now();
    let shared = Arc::new(Shared {
        budget: budget.clone(),
        reliable: reliable.clone(),
        faulty: faulty.clone(),
        caches,
        fronted,
        front_drains,
        plan,
        planned,
        deadline: start + Duration::from_secs_f64(seconds),
    });

    report(&format!(
        "{WORKERS} workers for {seconds} s (SOAK_SECONDS), base seed {base_seed:#x} (SOAK_SEED), \
         faulty backing seed {:#x} at p = {FAULT_PROBABILITY}",
        faulty.seed()
    ));
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..WORKERS).map(|_| mpsc::channel()).unzip();
    let mut senders: Vec<Option<Sender<Buf>>> = senders.into_iter().map(Some).collect();
    let workers: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(id, rx)| {
            let seed = splitmix64(base_seed.wrapping_add(0x100 + id as u64));
            report(&format!("worker {id}: seed {seed:#x}"));
            let tx = senders[(id + 1) % WORKERS].take().unwrap();
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("soak-{id}"))
                .spawn(move || {
                    let mut worker = Worker {
                        rng: Rng::new(seed),
                        shared,
                        own: Vec::new(),
                        held: Vec::new(),
                        maps: Vec::new(),
                        tx,
                        rx,
                        counts: Counts::default(),
                    };
                    worker.own = (0..3).map(|_| worker.build_cache()).collect();
                    worker.run()
                })
                .unwrap()
        })
        .collect();
    let mut total = Counts::default();
    for worker in workers {
        let counts = worker.join().expect("a worker panicked");
        total.ops += counts.ops;
        total.collections += counts.collections;
        total.maps += counts.maps;
        total.scopes += counts.scopes;
        total.passes += counts.passes;
        total.private_plans += counts.private_plans;
        total.maintenance += counts.maintenance;
        total.sent += counts.sent;
        total.received += counts.received;
        total.refused += counts.refused;
        total.caches_built += counts.caches_built;
        total.pipelines += counts.pipelines;
    }
    let elapsed = start.elapsed();
    assert_eq!(total.sent, total.received, "every buffer sent was received");

    let shared = Arc::into_inner(shared).expect("the workers are gone");
    let (mut retries, mut failures) = (0, 0);
    for cache in shared.caches.iter().chain(&shared.fronted) {
        let stats = cache.stats();
        check_stats(&stats, cache.max_cached_bytes(), cache.size_policy());
        retries += stats.retries;
        failures += stats.failures;
    }
    // Nothing is in use any more: a release reaches every front, the exited
    // workers' included, and leaves nothing reserved.
    for cache in &shared.fronted {
        let stats = cache.stats();
        assert_eq!(
            (stats.bytes_in_use, stats.blocks_in_use),
            (0, 0),
            "{stats:?}"
        );
        assert_eq!(cache.release_cached(), stats.bytes_reserved, "{stats:?}");
        let released = cache.stats();
        assert_eq!(
            (released.bytes_reserved, released.bytes_cached),
            (0, 0),
            "{released:?}"
        );
    }
    let planned_stats = shared.planned.stats();
    assert_eq!(planned_stats.bytes_in_use, 0, "{planned_stats:?}");
    drop(shared);

    report(&format!(
        "ran {:.2} s: {} operations ({:.0}/s); {total:?}",
        elapsed.as_secs_f64(),
        total.ops,
        total.ops as f64 / elapsed.as_secs_f64().max(1e-9),
    ));
    report(&format!(
        "faulty backing: {} attempts, {} refused; reliable backing: {} attempts; \
         shared caches: {retries} retries, {failures} failures; planned: {planned_stats}",
        faulty.attempts(),
        faulty.refused(),
        reliable.attempts(),
    ));

    // Everything is dropped: every ledger must be empty, the budget too.
    drop((reliable, faulty));
    for (name, ledger) in [
        ("reliable", &reliable_ledger),
        ("faulty", &faulty_ledger),
        ("plan", &plan_ledger),
    ] {
        let live = ledger.live_layouts();
        assert_eq!(
            (live.len(), ledger.live_bytes()),
            (0, 0),
            "the {name} backing still holds blocks, the first: {:?}",
            &live[..live.len().min(8)]
        );
        assert_eq!(ledger.allocs(), ledger.frees(), "{name}");
    }
    assert_eq!(budget.bytes_cached(), 0, "{budget:?}");
}

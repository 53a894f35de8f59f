//! Per-thread front caches: a small magazine of freed blocks per (thread,
//! cache), in front of the shared, locked cache.
//!
//! A hit and a free on the owning thread touch only the thread's own
//! [`ThreadFront`]: no lock, no atomic read-modify-write. Blocks move between a slot
//! and the shared cache in batches (a bin's older half, a whole bin), on the
//! owner's slow path, with the shared lock taken once a batch.
//!
//! **The drain protocol.** `release_cached`, `trim` and the drop of a cache
//! must reach the blocks of every thread's slot, idle threads' included. The
//! owner brackets each magazine access with a plain store of `active` and a
//! load of `drain_wanted`, separated by a *light* fence (a compiler fence); a
//! drainer stores `drain_wanted`, runs a *heavy* fence (Linux `membarrier`, which runs a full
//! fence on every thread of the process), then waits for `active` to be
//! clear. Either the owner sees `drain_wanted` and takes the slot's lock (its slow
//! path), or the drainer sees `active` and waits the few nanoseconds until
//! the owner is out; never both missing each other (the asymmetric Dekker
//! pattern of tcmalloc's and liburcu's `membarrier` use). Where `membarrier`
//! is missing (other systems, old kernels, Miri) and under loom, both fences
//! are `SeqCst` fences: correct, and slower for the owner.
//!
//! **Lifetimes.** The thread's table holds its slots by strong count and the
//! cache's registry does too. When a thread exits, its slots are *orphaned*
//! (their blocks stay, counted) and the cache adopts them at its next slow
//! operation, trim, release or drop. When the cache drops, it drains every
//! slot and marks it dead; the thread's table prunes dead slots later. A
//! slot's identity is a cache id that is never reused, so a new cache at a
//! freed cache's address never finds a stale slot.

use core::alloc::Layout;
use core::cell::RefCell;
use core::marker::PhantomData;
use core::mem;
use core::ptr::NonNull;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use allocator_api2::vec::Vec;

use crate::per_cpu::{self, PerCpu};
use crate::policy::Key;
use crate::reentry::{self, Bookkeeping};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, UnsafeCell, asymmetric};

/// A good limit for [`Builder::front_cache_bytes`](crate::Builder::front_cache_bytes):
/// 32 MiB of freed blocks a thread, enough for a few large tensors of a
/// pass, bounded so a thread cannot sit on much more than that.
pub const FRONT_CACHE_BYTES: usize = 32 << 20;

/// Blocks a bin holds: one key's magazine.
pub(crate) const DEPTH: usize = 8;
/// Bins of a slot: `SETS` sets of `WAYS`, a key's bin in the set its hash
/// picks (set-associative, so a pass with a few hundred distinct sizes
/// rarely evicts one key's bin for another's).
pub(crate) const MAGAZINE_BINS: usize = SETS * WAYS;
const SETS: usize = 64;
const WAYS: usize = 4;

/// One key's freed blocks, most recent last: a bin of a front's magazine,
/// or up to one bin of blocks on their way to the shared cache.
#[derive(Clone, Copy)]
pub(crate) struct Bin {
    pub(crate) key: Option<Key>,
    pub(crate) len: usize,
    pub(crate) blocks: [*mut u8; DEPTH],
}

impl Bin {
    pub(crate) const EMPTY: Bin = Bin {
        key: None,
        len: 0,
        blocks: [core::ptr::null_mut(); DEPTH],
    };

    /// The blocks held, with their key.
    pub(crate) fn held(&self) -> impl Iterator<Item = (Key, NonNull<u8>)> + '_ {
        self.blocks[..self.len]
            .iter()
            .filter_map(move |&block| Some((self.key?, NonNull::new(block)?)))
    }
}

/// A set's keys and lengths, in one cache line: a lookup reads this line
/// and then the one line of the bin's blocks.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Tags {
    /// Each way's key, packed (`pack`); 0: no key.
    keys: [u64; WAYS],
    lens: [u8; WAYS],
}

impl Tags {
    const EMPTY: Tags = Tags {
        keys: [0; WAYS],
        lens: [0; WAYS],
    };
}

/// A key in one word: the block size below bit 58, the alignment's log
/// above. `None` for a block too large to pack (no front keeps it).
#[inline]
fn pack(key: Key) -> Option<u64> {
    let size = key.size() as u64;
    (size < 1 << 58).then(|| size | (u64::from(key.block_layout().align().trailing_zeros()) << 58))
}

#[inline]
fn unpack(packed: u64) -> Option<Key> {
    let size = (packed & ((1 << 58) - 1)) as usize;
    let align = 1usize.checked_shl((packed >> 58) as u32)?;
    Key::for_block(Layout::from_size_align(size, align).ok()?)
}

/// The owner's data: bins and the bytes they hold. Touched only by the owner
/// (inside the protocol) or by a drainer holding the slot exclusively.
pub(crate) struct Magazine {
    tags: [Tags; SETS],
    /// Each bin's blocks, most recent last; bin `set * WAYS + way`. On the
    /// heap, made in place: 16 KiB would not fit a small stack on the way.
    blocks: Vec<[*mut u8; DEPTH], Bookkeeping>,
    bytes: usize,
    limit: usize,
    /// The next bin to give back when the magazine is over its limit.
    cursor: usize,
    /// Which way of a full set gives way next.
    turn: usize,
    /// Giving bins back until the front is down to half its limit.
    shrinking: bool,
    /// With a cap or a budget: the bytes this front may hold, granted by
    /// the shared cache in batches (counted there against both). `None`:
    /// no cap, no budget, only `limit`.
    credit: Option<usize>,
}

// SAFETY: the pointers are blocks the cache owns while they sit in a bin;
// moving the magazine moves that ownership (a `Vec<Box<[u8]>>` would be Send).
unsafe impl Send for Magazine {}

/// The set of a packed key.
#[inline]
fn set_of(packed: u64) -> usize {
    (packed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SETS.trailing_zeros())) as usize
}

impl Magazine {
    /// `None` if bookkeeping memory ran out. A limit of 0 makes an inert
    /// magazine (no bins allocated, nothing ever kept): a thread's slot of a
    /// cache whose fronts are per CPU keeps only its counters.
    fn new(limit: usize, credited: bool) -> Option<Self> {
        let mut blocks = Vec::new_in(Bookkeeping);
        if limit > 0 {
            blocks.try_reserve_exact(MAGAZINE_BINS).ok()?;
            blocks.resize(MAGAZINE_BINS, [core::ptr::null_mut(); DEPTH]);
        }
        Some(Self {
            tags: [Tags::EMPTY; SETS],
            blocks,
            bytes: 0,
            limit,
            cursor: 0,
            turn: 0,
            shrinking: false,
            credit: credited.then_some(0),
        })
    }

    /// The most this front may hold now: its limit, or less, its credit.
    #[inline]
    fn room(&self) -> usize {
        match self.credit {
            Some(credit) => credit.min(self.limit),
            None => self.limit,
        }
    }

    /// Takes the most recently freed block of `key`.
    #[inline]
    fn pop(&mut self, key: Key) -> Option<*mut u8> {
        let packed = pack(key)?;
        let set = set_of(packed);
        let tags = &mut self.tags[set];
        let way = (0..WAYS).find(|&way| tags.keys[way] == packed && tags.lens[way] != 0)?;
        tags.lens[way] -= 1;
        self.bytes -= key.size();
        Some(self.blocks[set * WAYS + way][usize::from(tags.lens[way])])
    }

    /// Keeps `block` if its bin has room and the magazine stays within its
    /// limit.
    #[inline]
    fn push(&mut self, key: Key, block: *mut u8) -> bool {
        if self.bytes + key.size() > self.room() {
            return false;
        }
        let Some(packed) = pack(key) else {
            return false;
        };
        let set = set_of(packed);
        let tags = &mut self.tags[set];
        let way = match (0..WAYS).find(|&way| tags.keys[way] == packed) {
            Some(way) => way,
            None => {
                let Some(way) = (0..WAYS).find(|&way| tags.lens[way] == 0) else {
                    return false;
                };
                tags.keys[way] = packed;
                way
            }
        };
        let len = usize::from(tags.lens[way]);
        if len == DEPTH {
            return false;
        }
        self.blocks[set * WAYS + way][len] = block;
        tags.lens[way] += 1;
        self.bytes += key.size();
        true
    }

    /// Whether a block of `key` could ever be kept.
    #[inline]
    pub(crate) fn fits(&self, key: Key) -> bool {
        key.size() <= self.limit && pack(key).is_some()
    }

    /// Moves out what stands in the way of pushing a block of `key`: the
    /// older half of its full bin, another key's blocks in its set (the way
    /// the set's turn points at), or (over the limit) the next non-empty
    /// bin. Empty when nothing does. Short credit is not its business
    /// (blocks take their credit with them): the shared cache grants more.
    fn make_room(&mut self, key: Key) -> Bin {
        let mut out = Bin::EMPTY;
        // Over the limit, give back down to half of it, a bin per call (the
        // caller keeps calling while `shrinking`): a front full of sizes
        // that do not come back then pays one slow path for many frees,
        // not one each.
        if self.bytes + key.size() > self.limit {
            self.shrinking = true;
        }
        if self.shrinking && (self.bytes + key.size() <= self.limit / 2 || self.bytes == 0) {
            self.shrinking = false;
        }
        if self.shrinking {
            for _ in 0..MAGAZINE_BINS {
                let at = self.cursor;
                self.cursor = (self.cursor + 1) % MAGAZINE_BINS;
                let len = usize::from(self.tags[at / WAYS].lens[at % WAYS]);
                if len != 0 {
                    self.take_bin(at, len, &mut out);
                    return out;
                }
            }
            return out;
        }
        let Some(packed) = pack(key) else {
            return out;
        };
        let set = set_of(packed);
        let tags = self.tags[set];
        if let Some(way) = (0..WAYS).find(|&way| tags.keys[way] == packed) {
            if usize::from(tags.lens[way]) == DEPTH {
                self.take_bin(set * WAYS + way, DEPTH / 2, &mut out);
            }
        } else if tags.lens.iter().all(|&len| len != 0) {
            // Every way holds another key: the turn's way goes.
            self.turn = self.turn.wrapping_add(1);
            let way = self.turn % WAYS;
            self.take_bin(set * WAYS + way, usize::from(tags.lens[way]), &mut out);
        }
        out
    }

    /// Moves the `count` oldest blocks of bin `at` into `out`.
    fn take_bin(&mut self, at: usize, count: usize, out: &mut Bin) {
        let tags = &mut self.tags[at / WAYS];
        let way = at % WAYS;
        let len = usize::from(tags.lens[way]);
        let blocks = &mut self.blocks[at];
        out.key = unpack(tags.keys[way]);
        out.len = count;
        out.blocks[..count].copy_from_slice(&blocks[..count]);
        blocks.copy_within(count..len, 0);
        tags.lens[way] -= count as u8;
        if let Some(key) = out.key {
            self.bytes -= key.size() * count;
            // The blocks' credit moves with them to the shared cache.
            if let Some(credit) = &mut self.credit {
                *credit -= key.size() * count;
            }
        }
    }

    /// Adds blocks the shared cache handed over (a refill); returns how many
    /// were kept (the rest stay with the caller).
    fn refill(&mut self, key: Key, blocks: &[*mut u8]) -> usize {
        let mut kept = 0;
        while kept < blocks.len() && self.push(key, blocks[kept]) {
            kept += 1;
        }
        kept
    }

    /// Up to `CHUNK` non-empty bins, with the credit their blocks held;
    /// once the magazine is empty, its remaining credit too. Returns the
    /// bins taken, the credit, and whether the magazine is now empty.
    fn take_chunk(&mut self, out: &mut [Bin; CHUNK]) -> (usize, usize, bool) {
        let mut taken = 0;
        let mut credit = 0;
        for at in 0..MAGAZINE_BINS {
            if taken == CHUNK {
                break;
            }
            let tags = &mut self.tags[at / WAYS];
            let way = at % WAYS;
            let len = usize::from(mem::take(&mut tags.lens[way]));
            if len == 0 {
                continue;
            }
            let Some(key) = unpack(tags.keys[way]) else {
                continue;
            };
            out[taken] = Bin {
                key: Some(key),
                len,
                blocks: self.blocks[at],
            };
            taken += 1;
            self.bytes -= key.size() * len;
            if let Some(held) = &mut self.credit {
                *held -= key.size() * len;
                credit += key.size() * len;
            }
        }
        let empty = self.bytes == 0;
        if empty {
            credit += self.credit.as_mut().map_or(0, mem::take);
        }
        (taken, credit, empty)
    }
}

/// The owner's counters since they were last folded into the shared stats.
/// Written by one thread at a time (the owner, or a drainer holding the slot
/// exclusively) with plain loads and stores; read by `stats()` at any time.
#[derive(Default)]
pub(crate) struct Counters {
    hits: AtomicU64,
    frees: AtomicU64,
    bytes_hit: AtomicU64,
    hit_block_bytes: AtomicU64,
    bytes_freed: AtomicU64,
    freed_block_bytes: AtomicU64,
    /// Bytes and blocks moved out to the shared cache, less those moved in
    /// (wrapping: may go "negative").
    moved_bytes: AtomicU64,
    moved_blocks: AtomicU64,
    /// The highest `bytes_hit - bytes_freed` since the last fold.
    peak_in_use: AtomicU64,
    /// The highest change of the bytes held since the last fold.
    peak_front: AtomicU64,
}

/// A snapshot of [`Counters`], as differences to add to the shared stats.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Deltas {
    pub(crate) hits: u64,
    pub(crate) frees: u64,
    pub(crate) bytes_hit: u64,
    pub(crate) hit_block_bytes: u64,
    pub(crate) bytes_freed: u64,
    pub(crate) freed_block_bytes: u64,
    pub(crate) moved_bytes: u64,
    pub(crate) moved_blocks: u64,
    pub(crate) peak_in_use: i64,
    pub(crate) peak_front: i64,
}

impl Deltas {
    /// Change of `bytes_in_use` (requested bytes).
    pub(crate) fn in_use(&self) -> i64 {
        self.bytes_hit.wrapping_sub(self.bytes_freed) as i64
    }

    /// Change of `blocks_in_use`.
    pub(crate) fn blocks_in_use(&self) -> i64 {
        self.hits.wrapping_sub(self.frees) as i64
    }

    /// Change of the bytes held in front caches.
    pub(crate) fn front_bytes(&self) -> i64 {
        self.freed_block_bytes
            .wrapping_sub(self.hit_block_bytes)
            .wrapping_sub(self.moved_bytes) as i64
    }

    /// Change of the blocks held in front caches.
    pub(crate) fn front_blocks(&self) -> i64 {
        self.frees
            .wrapping_sub(self.hits)
            .wrapping_sub(self.moved_blocks) as i64
    }

    /// Change of `bytes_lost_to_rounding`.
    pub(crate) fn lost(&self) -> i64 {
        let on_hits = self.hit_block_bytes.wrapping_sub(self.bytes_hit);
        let on_frees = self.freed_block_bytes.wrapping_sub(self.bytes_freed);
        on_hits.wrapping_sub(on_frees) as i64
    }
}

/// Adds `by` to a counter; its new value.
#[inline]
fn bump(counter: &AtomicU64, by: u64) -> u64 {
    // One writer at a time: a load and a store, not a read-modify-write.
    let value = counter.load(Relaxed).wrapping_add(by);
    counter.store(value, Relaxed);
    value
}

impl Counters {
    #[inline]
    fn on_hit(&self, requested: usize, block: usize) {
        bump(&self.hits, 1);
        let bytes_hit = bump(&self.bytes_hit, requested as u64);
        bump(&self.hit_block_bytes, block as u64);
        let in_use = bytes_hit.wrapping_sub(self.bytes_freed.load(Relaxed)) as i64;
        if in_use > self.peak_in_use.load(Relaxed) as i64 {
            self.peak_in_use.store(in_use as u64, Relaxed);
        }
    }

    #[inline]
    fn on_free(&self, requested: usize, block: usize) {
        bump(&self.frees, 1);
        bump(&self.bytes_freed, requested as u64);
        let freed = bump(&self.freed_block_bytes, block as u64);
        let held = freed
            .wrapping_sub(self.hit_block_bytes.load(Relaxed))
            .wrapping_sub(self.moved_bytes.load(Relaxed)) as i64;
        if held > self.peak_front.load(Relaxed) as i64 {
            self.peak_front.store(held as u64, Relaxed);
        }
    }

    /// Blocks moved out (`sign` 1) or in (`sign` -1).
    fn on_moved(&self, bytes: usize, blocks: usize, out: bool) {
        let (bytes, blocks) = (bytes as u64, blocks as u64);
        if out {
            bump(&self.moved_bytes, bytes);
            bump(&self.moved_blocks, blocks);
        } else {
            bump(&self.moved_bytes, bytes.wrapping_neg());
            bump(&self.moved_blocks, blocks.wrapping_neg());
        }
    }

    /// What has changed since the last `take`.
    pub(crate) fn read(&self) -> Deltas {
        Deltas {
            hits: self.hits.load(Relaxed),
            frees: self.frees.load(Relaxed),
            bytes_hit: self.bytes_hit.load(Relaxed),
            hit_block_bytes: self.hit_block_bytes.load(Relaxed),
            bytes_freed: self.bytes_freed.load(Relaxed),
            freed_block_bytes: self.freed_block_bytes.load(Relaxed),
            moved_bytes: self.moved_bytes.load(Relaxed),
            moved_blocks: self.moved_blocks.load(Relaxed),
            peak_in_use: self.peak_in_use.load(Relaxed) as i64,
            peak_front: self.peak_front.load(Relaxed) as i64,
        }
    }

    /// Reads and resets (the caller folds the result into the shared stats).
    fn take(&self) -> Deltas {
        let deltas = self.read();
        for counter in [
            &self.hits,
            &self.frees,
            &self.bytes_hit,
            &self.hit_block_bytes,
            &self.bytes_freed,
            &self.freed_block_bytes,
            &self.moved_bytes,
            &self.moved_blocks,
            &self.peak_in_use,
            &self.peak_front,
        ] {
            counter.store(0, Relaxed);
        }
        deltas
    }
}

/// What `ThreadFront::make_room` did and found.
pub(crate) struct Room {
    /// Blocks moved out, on their way to the shared cache (their credit
    /// with them).
    pub(crate) batch: Bin,
    /// The owner's counters to fold.
    pub(crate) deltas: Deltas,
    /// Credit the front still lacks to keep the block (0 without a cap or a
    /// budget).
    pub(crate) short: usize,
    /// Credit the front could still take before its limit.
    pub(crate) headroom: usize,
    /// The front is shrinking to half its limit: call again.
    pub(crate) more: bool,
}

/// A slot's life.
const LIVE: u8 = 0;
/// Its thread exited: blocks wait for the cache to adopt them.
const ORPHANED: u8 = 1;
/// Its cache dropped (or adopted it): empty for good.
const DEAD: u8 = 2;

/// One thread's front cache of one cache.
pub(crate) struct ThreadFront {
    /// Set by the owner around each magazine access (plain stores).
    active: AtomicBool,
    /// Set by a drainer that wants the magazine; the owner then goes through
    /// `lock`.
    drain_wanted: AtomicBool,
    /// The slot's life (`LIVE`, `ORPHANED`, `DEAD`); held by drainers for
    /// their whole access, and by the owner when it finds a drain under way.
    lock: Mutex<u8>,
    magazine: UnsafeCell<Magazine>,
    pub(crate) counters: Counters,
    /// The cache's count of orphaned slots.
    orphans: Arc<AtomicUsize>,
    /// When the owner last took its slow path (a budget's clock): a budget
    /// takes idle fronts' credit back first. Written by the owner only.
    age: AtomicU64,
}

// SAFETY: the magazine is accessed only by the owner inside the protocol or by
// a drainer holding the slot exclusively (see the module docs); the blocks it
// holds are owned by the cache and may move to any thread.
unsafe impl Sync for ThreadFront {}
// SAFETY: as above; nothing in a slot is tied to a thread.
unsafe impl Send for ThreadFront {}

/// Bins a drain takes at a time: a few KiB of stack, not a whole magazine
/// (loom's coroutines, and threads with small stacks, have little).
pub(crate) const CHUNK: usize = 32;

/// What one round of a drain took out of a slot.
pub(crate) struct Drained {
    pub(crate) bins: [Bin; CHUNK],
    pub(crate) len: usize,
    pub(crate) deltas: Deltas,
    /// The credit the taken blocks held (0 without a cap or a budget), and
    /// the front's unused credit once it is empty.
    pub(crate) credit: usize,
    /// Whether the front still holds blocks: drain again.
    pub(crate) more: bool,
}

impl ThreadFront {
    /// `None` if bookkeeping memory ran out.
    pub(crate) fn new(limit: usize, credited: bool, orphans: Arc<AtomicUsize>) -> Option<Self> {
        Some(Self {
            active: AtomicBool::new(false),
            drain_wanted: AtomicBool::new(false),
            lock: Mutex::new(LIVE),
            magazine: UnsafeCell::new(Magazine::new(limit, credited)?),
            counters: Counters::default(),
            orphans,
            age: AtomicU64::new(0),
        })
    }

    /// Takes up to `CHUNK` bins out (call again while `more`), from any
    /// thread, with the owner possibly running: the drainer's side of the
    /// protocol. With `dead`, or for an orphan, the slot is marked dead once
    /// empty (its cache is dropping, or adopted it; the owner's table
    /// prunes it). Returns `None` if it was already dead.
    pub(crate) fn drain(&self, dead: bool) -> Option<Drained> {
        let mut life = self.lock.lock();
        if *life == DEAD {
            return None;
        }
        let orphaned = *life == ORPHANED;
        self.drain_wanted.store(true, Relaxed);
        asymmetric::heavy();
        while self.active.load(Acquire) {
            crate::sync::spin();
        }
        let drained = self.magazine.with_mut(|magazine| {
            // SAFETY: we hold `lock` (no other drainer, and the owner's slow
            // path waits for it), and the owner is out of its lock-free
            // access and will see `drain` before entering again (see the
            // module docs).
            let magazine = unsafe { &mut *magazine };
            let mut bins = [Bin::EMPTY; CHUNK];
            let (len, credit, empty) = magazine.take_chunk(&mut bins);
            Drained {
                bins,
                len,
                deltas: self.counters.take(),
                credit,
                more: !empty,
            }
        });
        self.drain_wanted.store(false, Release);
        if !drained.more && (dead || orphaned) {
            *life = DEAD;
            if orphaned {
                self.orphans.fetch_sub(1, Relaxed);
            }
        }
        drop(life);
        Some(drained)
    }

    /// When the owner was last on its slow path.
    pub(crate) fn age(&self) -> u64 {
        self.age.load(Relaxed)
    }

    /// Whether the slot's owner thread exited and its blocks wait for the
    /// cache.
    pub(crate) fn is_orphaned(&self) -> bool {
        *self.lock.lock() == ORPHANED
    }

    fn is_dead(&self) -> bool {
        *self.lock.lock() == DEAD
    }

    /// The owner thread exits: the blocks stay, for the cache to adopt.
    fn orphan(&self) {
        let mut life = self.lock.lock();
        if *life == LIVE {
            *life = ORPHANED;
            self.orphans.fetch_add(1, Relaxed);
        }
    }
}

/// The calling thread's own slot of a cache: the only way to the lock-free
/// side of its magazine. Made by [`Fronts::slot`] from the thread's own
/// table, and `!Send` and `!Sync`, so it never leaves the thread that owns
/// the slot: that is what makes its plain stores of `active` and its
/// lock-free magazine accesses sound (only the owner may take them; a
/// drainer from another thread goes through [`ThreadFront::drain`]).
pub(crate) struct Owner<'a> {
    slot: &'a ThreadFront,
    /// The cache's per-CPU fronts, if its fronts are per CPU: then the
    /// slot's magazine is inert and only its counters count.
    per_cpu: Option<&'a PerCpu>,
    _owning_thread: PhantomData<*const ()>,
}

impl Owner<'_> {
    /// Runs `f` on the magazine as its owner: without a lock unless a drain
    /// is under way, then after it, under the slot's lock.
    ///
    /// `f` must not call back into the allocator (it runs with `active`
    /// set, and a drainer spins on that); none of this module's closures
    /// do.
    #[inline]
    fn owner<R>(&self, f: impl FnOnce(&mut Magazine, &Counters) -> R) -> R {
        let slot = self.slot;
        slot.active.store(true, Relaxed);
        asymmetric::light();
        if !slot.drain_wanted.load(Acquire) {
            // SAFETY: only the owner (this thread: an `Owner` never leaves
            // the thread whose table holds the slot) sets `active`; a drainer
            // touches the magazine only after it set `drain`, fenced
            // (heavy), and then saw `active` clear; we saw `drain` clear
            // after our own fenced store of `active`, so no drainer is in
            // it, and none enters until we clear `active` (Release, which
            // orders our accesses before its Acquire load).
            let result = slot
                .magazine
                .with_mut(|magazine| f(unsafe { &mut *magazine }, &slot.counters));
            slot.active.store(false, Release);
            return result;
        }
        slot.active.store(false, Release);
        let _locked = slot.lock.lock();
        // SAFETY: drainers hold `lock` for their whole access, so holding it
        // makes us the only one in the magazine.
        slot.magazine
            .with_mut(|magazine| f(unsafe { &mut *magazine }, &slot.counters))
    }

    /// Takes a block of `key` for a request of `requested` bytes.
    #[inline(always)]
    pub(crate) fn pop(&self, key: Key, requested: usize) -> Option<NonNull<u8>> {
        if let Some(per_cpu) = self.per_cpu {
            let block = per_cpu.pop(per_cpu::Class::of(key)?)?;
            // Per CPU, no drainer touches a live slot: the owner alone
            // writes its counters.
            self.slot.counters.on_hit(requested, key.size());
            return Some(block);
        }
        self.pop_magazine(key, requested)
    }

    #[inline]
    fn pop_magazine(&self, key: Key, requested: usize) -> Option<NonNull<u8>> {
        self.owner(|magazine, counters| {
            let block = magazine.pop(key)?;
            counters.on_hit(requested, key.size());
            NonNull::new(block)
        })
    }

    /// Keeps a freed block of `key` (asked for as `requested` bytes); false
    /// if there is no room (the caller then makes room or frees it shared).
    #[inline(always)]
    pub(crate) fn push(&self, key: Key, block: NonNull<u8>, requested: usize) -> bool {
        if let Some(per_cpu) = self.per_cpu {
            let kept = per_cpu::Class::of(key).is_some_and(|slot| per_cpu.push(slot, block));
            if kept {
                self.slot.counters.on_free(requested, key.size());
            }
            return kept;
        }
        self.push_magazine(key, block, requested)
    }

    #[inline]
    fn push_magazine(&self, key: Key, block: NonNull<u8>, requested: usize) -> bool {
        self.owner(|magazine, counters| {
            let kept = magazine.push(key, block.as_ptr());
            if kept {
                counters.on_free(requested, key.size());
            }
            kept
        })
    }

    /// Owner's slow path: what stands in the way of a block of `key`
    /// (see `Magazine::make_room`), and the counters to fold. `None` if a
    /// block of `key` can never be kept here.
    pub(crate) fn make_room(&self, key: Key) -> Option<Room> {
        self.owner(|magazine, counters| {
            if !magazine.fits(key) {
                return None;
            }
            let batch = magazine.make_room(key);
            if let Some(batch_key) = batch.key {
                counters.on_moved(batch_key.size() * batch.len, batch.len, true);
            }
            let short = magazine.credit.map_or(0, |credit| {
                (magazine.bytes + key.size()).saturating_sub(credit)
            });
            let headroom = magazine.limit.saturating_sub(magazine.credit.unwrap_or(0));
            Some(Room {
                batch,
                deltas: counters.take(),
                short,
                headroom,
                more: magazine.shrinking,
            })
        })
    }

    /// Owner's slow path: adds credit the shared cache granted.
    pub(crate) fn grant(&self, bytes: usize) {
        self.owner(|magazine, _| {
            if let Some(credit) = &mut magazine.credit {
                *credit += bytes;
            }
        });
    }

    /// Owner's slow path: the counters to fold, reset.
    pub(crate) fn take_counters(&self) -> Deltas {
        if self.per_cpu.is_some() {
            return self.slot.counters.take();
        }
        self.owner(|_, counters| counters.take())
    }

    /// Counts a hit served by a per-CPU front (`block` bytes for a request
    /// of `requested`).
    #[inline(always)]
    pub(crate) fn count_hit(&self, requested: usize, block: usize) {
        self.slot.counters.on_hit(requested, block);
    }

    /// Counts a free kept in a per-CPU front.
    #[inline(always)]
    pub(crate) fn count_free(&self, requested: usize, block: usize) {
        self.slot.counters.on_free(requested, block);
    }

    /// Owner's slow path: keeps blocks of `key` handed over by the shared
    /// cache; returns how many were kept.
    pub(crate) fn refill(&self, key: Key, blocks: &[*mut u8]) -> usize {
        self.owner(|magazine, counters| {
            let kept = magazine.refill(key, blocks);
            counters.on_moved(key.size() * kept, kept, false);
            kept
        })
    }

    /// Records the time of the owner's slow path.
    pub(crate) fn set_age(&self, age: u64) {
        self.slot.age.store(age, Relaxed);
    }
}

/// A cache's side: its id, and every slot any thread made for it.
pub(crate) struct Fronts {
    /// Set once caching stopped after a failure: frees skip the fronts.
    stopped: AtomicBool,
    id: u64,
    limit: usize,
    /// Whether fronts hold credit (the cache has a cap or a budget).
    credited: bool,
    slots: Mutex<Vec<Arc<ThreadFront>, Bookkeeping>>,
    orphans: Arc<AtomicUsize>,
    /// The per-CPU fronts, where the system has restartable sequences and
    /// the cache asked for them: then threads' slots only count.
    per_cpu: Option<PerCpu>,
}

/// Cache ids: never reused, so a thread's table never mistakes a new cache
/// for a dropped one at the same address (`Fronts::slot`'s safety argument
/// relies on it). A 64-bit count does not wrap: a cache a nanosecond for
/// five centuries is under 2^64.
static NEXT_ID: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

impl Fronts {
    /// Front caches of at most `limit` bytes each; `credited` if the cache
    /// has a cap or a budget. With `per_cpu` (where the system has them),
    /// the fronts are per CPU instead and `limit` is the per-thread
    /// fallback's.
    pub(crate) fn new(limit: usize, credited: bool, per_cpu: Option<PerCpu>) -> Self {
        asymmetric::prepare();
        Self {
            stopped: AtomicBool::new(false),
            id: NEXT_ID.fetch_add(1, Relaxed),
            limit: if per_cpu.is_some() { 0 } else { limit },
            credited,
            slots: Mutex::new(Vec::new_in(Bookkeeping)),
            orphans: Arc::new(AtomicUsize::new(0)),
            per_cpu,
        }
    }

    /// The per-CPU fronts, if the fronts are per CPU.
    pub(crate) fn per_cpu(&self) -> Option<&PerCpu> {
        self.per_cpu.as_ref()
    }

    /// The calling thread's slot, made on first use, as its owner. `None`
    /// when the thread cannot have one (its thread-locals are being torn
    /// down, the table is busy further up this thread's stack, or
    /// bookkeeping memory ran out): the caller then uses the shared cache.
    #[inline]
    pub(crate) fn slot(&self) -> Option<Owner<'_>> {
        let (id, last) = last::get();
        let slot = if id == self.id {
            last
        } else {
            TABLE.try_with(|table| table.find_or_insert(self)).ok()??
        };
        // SAFETY: the table holds a strong count of the slot until the slot
        // is dead, and a slot dies only when its cache drops (or adopted it
        // after the thread exited): `&self` keeps the cache alive, and this
        // thread is running, so the slot outlives the borrow. The slot is
        // this cache's: the table found it under this cache's id, and ids
        // are never reused (`NEXT_ID`), so a cache made at a dropped cache's
        // address never finds the dropped one's slot. It is this thread's:
        // it came from this thread's table.
        let slot = unsafe { &*slot };
        Some(Owner {
            slot,
            per_cpu: self.per_cpu.as_ref(),
            _owning_thread: PhantomData,
        })
    }

    /// Frees skip the fronts from now on (caching stopped).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Relaxed);
    }

    /// Whether caching stopped (a plain load).
    #[inline]
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Relaxed)
    }

    /// Whether some thread exited leaving blocks to adopt.
    #[inline]
    pub(crate) fn has_orphans(&self) -> bool {
        self.orphans.load(Relaxed) != 0
    }

    /// Every slot, by strong count (to drain or read without the registry
    /// lock). With `orphans_only`, the slots of exited threads, which are
    /// also taken out of the registry.
    pub(crate) fn slots(&self, orphans_only: bool) -> Vec<Arc<ThreadFront>, Bookkeeping> {
        let _inside = reentry::inside();
        let mut slots = self.slots.lock();
        if orphans_only {
            let mut taken = Vec::new_in(Bookkeeping);
            slots.retain(|slot| {
                if slot.is_orphaned() && taken.try_reserve(1).is_ok() {
                    taken.push(slot.clone());
                    false
                } else {
                    true
                }
            });
            taken
        } else {
            let mut all = Vec::new_in(Bookkeeping);
            if all.try_reserve(slots.len()).is_ok() {
                all.extend(slots.iter().cloned());
            }
            all
        }
    }

    /// The slot whose owner was on its slow path least recently.
    pub(crate) fn oldest_slot(&self) -> Option<Arc<ThreadFront>> {
        let _inside = reentry::inside();
        let slots = self.slots.lock();
        slots.iter().min_by_key(|slot| slot.age()).cloned()
    }

    /// Forgets the slots that died (orphans a drain adopted).
    pub(crate) fn prune(&self) {
        let _inside = reentry::inside();
        self.slots.lock().retain(|slot| !slot.is_dead());
    }

    /// Takes every slot out of the registry (the cache is dropping).
    pub(crate) fn take_all_slots(&self) -> Vec<Arc<ThreadFront>, Bookkeeping> {
        let _inside = reentry::inside();
        mem::replace(&mut *self.slots.lock(), Vec::new_in(Bookkeeping))
    }

    /// The current counters of every slot, and the bytes and blocks they
    /// hold, as deltas.
    pub(crate) fn read_all(&self) -> Vec<Deltas, Bookkeeping> {
        let _inside = reentry::inside();
        let slots = self.slots.lock();
        let mut all = Vec::new_in(Bookkeeping);
        if all.try_reserve(slots.len()).is_ok() {
            all.extend(slots.iter().map(|slot| slot.counters.read()));
        }
        all
    }
}

/// A thread's slots, one per cache it used.
struct Table {
    slots: RefCell<Vec<(u64, Arc<ThreadFront>), Bookkeeping>>,
}

/// The last slot this thread looked up, `(cache id, slot)` (id 0: none),
/// which the table holds by strong count: the hot path's one thread-local
/// read. Outside the table, in a thread-local with no destructor, so a
/// read is one load (a thread-local with a destructor checks its
/// registration on every access). The table's drop clears it first.
mod last {
    use core::cell::Cell;

    use super::ThreadFront;

    #[cfg(not(loom))]
    std::thread_local! {
        static LAST: Cell<(u64, *const ThreadFront)> = const { Cell::new((0, core::ptr::null())) };
    }

    #[cfg(loom)]
    loom::thread_local! {
        static LAST: Cell<(u64, *const ThreadFront)> = Cell::new((0, core::ptr::null()));
    }

    #[inline]
    pub(super) fn get() -> (u64, *const ThreadFront) {
        LAST.try_with(Cell::get).unwrap_or((0, core::ptr::null()))
    }

    pub(super) fn set(id: u64, slot: *const ThreadFront) {
        let _ = LAST.try_with(|last| last.set((id, slot)));
    }
}

impl Table {
    const fn new() -> Self {
        Self {
            slots: RefCell::new(Vec::new_in(Bookkeeping)),
        }
    }

    #[cold]
    fn find_or_insert(&self, fronts: &Fronts) -> Option<*const ThreadFront> {
        // Busy further up this thread's stack (a free from inside the
        // table's own bookkeeping): no slot this time.
        let mut slots = self.slots.try_borrow_mut().ok()?;
        let _inside = reentry::inside();
        let found = match slots.iter().find(|(id, _)| *id == fronts.id) {
            Some((_, slot)) => Arc::as_ptr(slot),
            None => {
                slots.retain(|(_, slot)| !slot.is_dead());
                let mut registry = fronts.slots.lock();
                registry.try_reserve(1).ok()?;
                slots.try_reserve(1).ok()?;
                let slot = Arc::new(ThreadFront::new(
                    fronts.limit,
                    fronts.credited,
                    fronts.orphans.clone(),
                )?);
                registry.push(slot.clone());
                let pointer = Arc::as_ptr(&slot);
                slots.push((fronts.id, slot));
                pointer
            }
        };
        last::set(fronts.id, found);
        Some(found)
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        last::set(0, core::ptr::null());
        for (_, slot) in self.slots.get_mut().drain(..) {
            slot.orphan();
        }
    }
}

#[cfg(not(loom))]
std::thread_local! {
    static TABLE: Table = const { Table::new() };
}

#[cfg(loom)]
loom::thread_local! {
    static TABLE: Table = Table::new();
}

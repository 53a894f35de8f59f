//! A cache's history of events ([`Builder::record_history`](crate::Builder::record_history)):
//! a ring of the last `max_entries` allocations, frees, segment growths and
//! shrinks, decommits, releases, limit failures, front drains and decays,
//! each with its time, size, address and thread, as PyTorch's
//! `_record_memory_history` keeps for its CUDA allocator.
//!
//! Off by default, and then it costs a branch on a field that is `None`.
//! On, an event is one atomic add to claim a place in the ring and a few
//! plain stores: any thread records without a lock (the front caches' hit
//! paths included), and a reader takes a consistent copy of each entry or
//! skips it (a sequence number written last, checked on both sides of the
//! read, as a seqlock does). The time is the time-stamp counter's where it
//! ticks at a constant rate (as PyTorch's `getApproximateTime`): read in
//! about 16 ns in a VM where `Instant::now` takes about 40.

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::Instant;

use allocator_api2::vec::Vec;

use crate::reentry::Bookkeeping;
use crate::sync::{AtomicU64, AtomicUsize};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Action {
    /// A block was handed out: `size` requested bytes at `address`.
    Alloc,
    /// A block was given back by its user.
    Free,
    /// The cache took `size` more bytes from the system or its backing
    /// allocator (best fit: a reservation's usable part grew, or a fixed
    /// segment was added; the free-list policies: a new block).
    SegmentAlloc,
    /// The cache gave `size` bytes back (a block, a segment).
    SegmentFree,
    /// Best fit's reservation grew in place: `size` bytes at `address`
    /// became usable (PyTorch's expandable segments' `segment_map`).
    SegmentMap,
    /// Best fit gave back the free top of a reservation: `size` bytes at
    /// `address` (`segment_unmap`).
    SegmentUnmap,
    /// Best fit dropped the pages of `size` free bytes at `address` in place.
    Decommit,
    /// A request of `size` bytes was refused by a hard limit.
    LimitFailure,
    /// `size` bytes came back from the front caches to the shared cache.
    FrontDrain,
    /// Decay gave back `size` bytes nobody reused for a whole window.
    Decay,
}

impl Action {
    const ALL: [Action; 10] = [
        Action::Alloc,
        Action::Free,
        Action::SegmentAlloc,
        Action::SegmentFree,
        Action::SegmentMap,
        Action::SegmentUnmap,
        Action::Decommit,
        Action::LimitFailure,
        Action::FrontDrain,
        Action::Decay,
    ];

    fn code(self) -> u64 {
        Self::ALL
            .iter()
            .position(|&action| action == self)
            .unwrap_or(0) as u64
    }

    fn from_code(code: u64) -> Option<Self> {
        Self::ALL.get(code as usize).copied()
    }
}

/// One recorded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Event {
    /// Microseconds since the cache was built.
    pub time_us: u64,
    /// What happened.
    pub action: Action,
    /// Bytes: requested for `Alloc` and `Free`, else what the action moved.
    pub size: usize,
    /// The block's or the range's address (0 where there is none).
    pub address: usize,
    /// A number for the thread that recorded it (1 for the first thread of
    /// the process to record anything, and so on).
    pub thread: u64,
}

/// One place in the ring: a sequence number (its event's number plus one;
/// 0 while being written), then the fields.
struct Entry {
    sequence: AtomicU64,
    /// Ticks of the ring's clock since it started.
    ticks: AtomicU64,
    action_and_thread: AtomicU64,
    size: AtomicU64,
    address: AtomicU64,
}

/// The ring.
pub(crate) struct History {
    entries: Vec<Entry, Bookkeeping>,
    /// Return addresses kept per event (`Builder::record_frames` and room
    /// for the cache's own; 0: none).
    depth: usize,
    /// Each entry's stack, `depth` places an entry, written and read under
    /// its sequence number as the other fields.
    stacks: Vec<AtomicUsize, Bookkeeping>,
    /// Events recorded so far (the next one's number).
    next: AtomicUsize,
    clock: Clock,
}

/// The events' clock: ticks since the ring was made, turned into
/// microseconds when read.
struct Clock {
    start: Instant,
    /// The time-stamp counter at `start`, where it is used.
    counter_start: Option<u64>,
}

impl Clock {
    fn new() -> Self {
        Self {
            counter_start: counter(),
            start: Instant::now(),
        }
    }

    /// Ticks since the start: of the counter, else microseconds.
    #[inline]
    fn ticks(&self) -> u64 {
        match (self.counter_start, counter()) {
            (Some(start), Some(now)) => now.wrapping_sub(start),
            _ => self.start.elapsed().as_micros() as u64,
        }
    }

    /// Counter ticks per microsecond, measured over the clock's life.
    fn ticks_per_us(&self) -> f64 {
        let elapsed_us = self.start.elapsed().as_secs_f64() * 1e6;
        match (self.counter_start, counter()) {
            (Some(start), Some(now)) if elapsed_us >= 1.0 => {
                (now.wrapping_sub(start) as f64 / elapsed_us).max(f64::MIN_POSITIVE)
            }
            // Not a microsecond yet: every event is at 0.
            (Some(_), Some(_)) => f64::INFINITY,
            _ => 1.0,
        }
    }
}

/// The time-stamp counter, where it ticks at a constant rate whatever the
/// core's frequency or sleep state (the invariant TSC, CPUID
/// 8000_0007h EDX bit 8).
#[cfg(all(target_arch = "x86_64", not(miri), not(loom)))]
#[inline]
fn counter() -> Option<u64> {
    use core::arch::x86_64::{__cpuid, _rdtsc};
    use std::sync::OnceLock;
    static INVARIANT: OnceLock<bool> = OnceLock::new();
    // `__cpuid` is a safe function on newer toolchains, unsafe on older.
    #[allow(unused_unsafe)]
    let invariant = *INVARIANT.get_or_init(|| {
        // SAFETY: CPUID exists on every x86_64 CPU; leaf 8000_0000h gives
        // the highest extended leaf, asked before leaf 8000_0007h.
        let highest = unsafe { __cpuid(0x8000_0000) }.eax;
        // SAFETY: as above, and the leaf exists.
        highest >= 0x8000_0007 && unsafe { __cpuid(0x8000_0007) }.edx & (1 << 8) != 0
    });
    // SAFETY: RDTSC exists on every x86_64 CPU and only reads the counter.
    #[allow(unused_unsafe)]
    invariant.then(|| unsafe { _rdtsc() })
}

/// No counter here: `Instant` it is.
#[cfg(not(all(target_arch = "x86_64", not(miri), not(loom))))]
#[inline]
fn counter() -> Option<u64> {
    None
}

impl History {
    /// A ring of `capacity` events (at least one), each with a stack of
    /// `frames` frames below the cache's own (at most
    /// `frames::MAX_FRAMES`): room for `frames::OWN_FRAMES` more is kept,
    /// as which frames are the cache's is known only once resolved.
    pub(crate) fn new(capacity: usize, frames: usize) -> Self {
        let capacity = capacity.max(1);
        let depth = match frames.min(crate::frames::MAX_FRAMES) {
            0 => 0,
            frames => frames + crate::frames::OWN_FRAMES,
        };
        let _inside = crate::reentry::inside();
        let mut entries = Vec::with_capacity_in(capacity, Bookkeeping);
        entries.extend((0..capacity).map(|_| Entry {
            sequence: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            action_and_thread: AtomicU64::new(0),
            size: AtomicU64::new(0),
            address: AtomicU64::new(0),
        }));
        let mut stacks = Vec::with_capacity_in(capacity * depth, Bookkeeping);
        stacks.extend((0..capacity * depth).map(|_| AtomicUsize::new(0)));
        Self {
            entries,
            depth,
            stacks,
            next: AtomicUsize::new(0),
            clock: Clock::new(),
        }
    }

    /// Records an event.
    #[inline]
    pub(crate) fn record(&self, action: Action, size: usize, address: usize) {
        let number = self.next.fetch_add(1, Relaxed);
        let place = number % self.entries.len();
        let entry = &self.entries[place];
        // 0 while the fields are written: a reader skips the entry.
        entry.sequence.store(0, Relaxed);
        core::sync::atomic::fence(Release);
        entry.ticks.store(self.clock.ticks(), Relaxed);
        entry
            .action_and_thread
            .store(action.code() | thread_number() << 8, Relaxed);
        entry.size.store(size as u64, Relaxed);
        entry.address.store(address as u64, Relaxed);
        if self.depth > 0 {
            crate::frames::capture(&self.stacks[place * self.depth..][..self.depth]);
        }
        entry.sequence.store(number as u64 + 1, Release);
    }

    /// The recorded events still in the ring, oldest first, with their
    /// stacks' return addresses (empty without `record_frames`); an entry
    /// being written while this reads is left out.
    pub(crate) fn events(&self) -> (std::vec::Vec<Event>, std::vec::Vec<std::vec::Vec<usize>>) {
        let next = self.next.load(Acquire);
        let first = next.saturating_sub(self.entries.len());
        let mut events = std::vec::Vec::with_capacity(next - first);
        let mut stacks = std::vec::Vec::with_capacity(next - first);
        let ticks_per_us = self.clock.ticks_per_us();
        for number in first..next {
            let place = number % self.entries.len();
            let entry = &self.entries[place];
            let before = entry.sequence.load(Acquire);
            let event = Event {
                time_us: (entry.ticks.load(Relaxed) as f64 / ticks_per_us) as u64,
                action: match Action::from_code(entry.action_and_thread.load(Relaxed) & 0xff) {
                    Some(action) => action,
                    None => continue,
                },
                size: entry.size.load(Relaxed) as usize,
                address: entry.address.load(Relaxed) as usize,
                thread: entry.action_and_thread.load(Relaxed) >> 8,
            };
            let stack: std::vec::Vec<usize> = self.stacks[place * self.depth..][..self.depth]
                .iter()
                .map(|ip| ip.load(Relaxed))
                .take_while(|&ip| ip != 0)
                .collect();
            core::sync::atomic::fence(Acquire);
            if before == number as u64 + 1 && entry.sequence.load(Relaxed) == before {
                events.push(event);
                stacks.push(stack);
            }
        }
        (events, stacks)
    }

    /// Events recorded so far, dropped ones included.
    pub(crate) fn recorded(&self) -> usize {
        self.next.load(Relaxed)
    }
}

/// This thread's number for events: given on its first event.
fn thread_number() -> u64 {
    use core::cell::Cell;
    use core::sync::atomic::AtomicU64 as StdAtomicU64;
    static NEXT: StdAtomicU64 = StdAtomicU64::new(1);
    std::thread_local! {
        static NUMBER: Cell<u64> = const { Cell::new(0) };
    }
    NUMBER
        .try_with(|number| {
            if number.get() == 0 {
                number.set(NEXT.fetch_add(1, Relaxed));
            }
            number.get()
        })
        .unwrap_or(0)
}

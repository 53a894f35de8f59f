//! The replay core: runs a parsed [`Trace`] through one allocator, in this
//! process, and measures it.
//!
//! Each of `threads` threads replays the whole trace on the same allocator
//! (the cache: one shared cache, a handle clone per thread), with its own slot
//! table. Every pass starts on a [`Barrier`]; between two barriers thread 0
//! takes the pass-boundary readings (page faults, cache stats, a memory
//! sample), so they are exact and never timed. A pass's time is the slowest
//! thread's time for it.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashSet;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use allocator_api2::alloc::Allocator;
use caching_allocator::plan::{self, Pass, Planned};
use caching_allocator::{CachingAllocator, Stats};
use serde::{Deserialize, Serialize};

use crate::measure::{self, RssReader};
use crate::trace::{ALIGN, Event, Trace};

/// How each new block is written, as the tensor it stands for would be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Touch {
    /// One byte in every 4 KiB page the block covers.
    #[default]
    Page,
    /// Every byte.
    Full,
    /// Nothing: only the allocator's own cost.
    None,
}

impl Touch {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Touch::Page => "page",
            Touch::Full => "full",
            Touch::None => "none",
        }
    }
}

/// Replay settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Passes to run in total (the file's passes repeat); at least 1.
    pub passes: usize,
    /// How new blocks are written.
    pub touch: Touch,
    /// Sleep between passes (not timed).
    pub gap: Duration,
    /// Threads replaying the trace at once on the one allocator.
    pub threads: usize,
    /// Take a memory sample every this many events of thread 0 (for plots);
    /// `None`: only at pass ends (samples inside passes cost time).
    pub sample_every: Option<usize>,
    /// The front cache limit of the `*-front` rows.
    pub front_bytes: usize,
    /// Threads take turns (one pass at a time), free what they hold after
    /// their last pass, and stay alive for the final readings.
    pub turns: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            passes: 2,
            touch: Touch::Page,
            gap: Duration::ZERO,
            threads: 1,
            sample_every: None,
            front_bytes: caching_allocator::FRONT_CACHE_BYTES,
            turns: false,
        }
    }
}

/// An allocator under test, as the replay calls it. Implemented for
/// [`GlobalAllocRow`] (system, mimalloc, jemalloc) and [`CachingAllocator`].
pub trait ReplayAlloc: Clone + Send {
    /// A block for `layout` (never zero-sized), or null.
    ///
    /// # Safety
    ///
    /// `layout.size() != 0`.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8;

    /// Frees a block.
    ///
    /// # Safety
    ///
    /// `ptr` came from `alloc(layout)` of this allocator (or a clone) and is
    /// not used afterwards.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout);

    /// The cache's counters, for allocators that are caches.
    fn cache_stats(&self) -> Option<Stats> {
        None
    }

    /// Called (untimed) just before pass `pass` starts, on every thread.
    fn begin_pass(&self, _pass: usize) {}
}

/// A `GlobalAlloc` called directly (never installed as the global allocator).
pub struct GlobalAllocRow<G: 'static>(pub &'static G);

impl<G> Clone for GlobalAllocRow<G> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<G> Copy for GlobalAllocRow<G> {}

impl<G: GlobalAlloc + Sync> ReplayAlloc for GlobalAllocRow<G> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded: `layout` is not zero-sized.
        unsafe { self.0.alloc(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

/// The `planned` row: pass 0 is recorded, pass 1 plans it, and every pass
/// from then on runs inside `planned.pass()`.
#[derive(Clone)]
pub struct PlannedRow {
    shared: Arc<PlannedShared>,
}

struct PlannedShared {
    /// Threads replaying at once: each starts its own pass guard.
    threads: usize,
    recorder: plan::Recorder,
    planned: OnceLock<Planned>,
    /// The pass guard of each thread's current pass.
    passes: Mutex<Vec<Pass>>,
    /// Blocks the recorder handed out that are still live: they go back to
    /// it, not to the arena's allocator.
    recorded: Mutex<HashSet<usize>>,
    recorded_live: AtomicUsize,
}

impl ReplayAlloc for PlannedRow {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let shared = &*self.shared;
        let block = match shared.planned.get() {
            Some(planned) => planned.allocate(layout),
            None => {
                let block = shared.recorder.allocate(layout);
                if let Ok(block) = block {
                    let mut recorded = shared.recorded.lock().unwrap_or_else(|e| e.into_inner());
                    recorded.insert(block.cast::<u8>().as_ptr() as usize);
                    shared
                        .recorded_live
                        .store(recorded.len(), Ordering::Relaxed);
                }
                block
            }
        };
        block.map_or(ptr::null_mut(), |block| block.cast::<u8>().as_ptr())
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(block) = NonNull::new(ptr) else {
            return;
        };
        let shared = &*self.shared;
        let recorded = shared.recorded_live.load(Ordering::Relaxed) > 0 && {
            let mut recorded = shared.recorded.lock().unwrap_or_else(|e| e.into_inner());
            let was = recorded.remove(&(ptr as usize));
            shared
                .recorded_live
                .store(recorded.len(), Ordering::Relaxed);
            was
        };
        match shared.planned.get() {
            // SAFETY: forwarded: the block came from `allocate(layout)` of the
            // planned arena (it was not the recorder's).
            Some(planned) if !recorded => unsafe { planned.deallocate(block, layout) },
            // SAFETY: forwarded: the recorder handed it out.
            _ => unsafe { shared.recorder.deallocate(block, layout) },
        }
    }

    fn cache_stats(&self) -> Option<Stats> {
        Some(
            self.shared
                .planned
                .get()
                .map(Planned::stats)
                .unwrap_or_default(),
        )
    }

    fn begin_pass(&self, pass: usize) {
        let shared = &*self.shared;
        if pass == 0 {
            // Set-up allocations are not part of a pass.
            shared.recorder.clear();
            return;
        }
        let planned = shared
            .planned
            .get_or_init(|| Planned::new(&shared.recorder.plan()));
        let mut passes = shared.passes.lock().unwrap_or_else(|e| e.into_inner());
        // Each thread starts a pass; the previous round's guards end.
        if passes.len() >= shared.threads {
            passes.clear();
        }
        passes.push(planned.pass());
    }
}

impl PlannedRow {
    /// A planned row for `threads` replaying threads.
    pub fn new(threads: usize) -> Self {
        Self {
            shared: Arc::new(PlannedShared {
                threads: threads.max(1),
                recorder: plan::Recorder::new(),
                planned: OnceLock::new(),
                passes: Mutex::new(Vec::new()),
                recorded: Mutex::new(HashSet::new()),
                recorded_live: AtomicUsize::new(0),
            }),
        }
    }
}

impl ReplayAlloc for CachingAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.allocate(layout) {
            Ok(block) => block.cast::<u8>().as_ptr(),
            Err(_) => ptr::null_mut(),
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(ptr) = NonNull::new(ptr) {
            // SAFETY: forwarded: the block came from `allocate(layout)` of
            // this cache (through some clone).
            unsafe { self.deallocate(ptr, layout) }
        }
    }

    fn cache_stats(&self) -> Option<Stats> {
        Some(self.stats())
    }
}

/// One memory sample (for plots).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Events replayed so far by thread 0 (set-up included).
    pub event: u64,
    /// Pass being replayed (or just ended).
    pub pass: usize,
    /// Live bytes of the trace, times the number of threads.
    pub live: usize,
    /// The cache's `bytes_cached` (0 for other allocators).
    pub cached: usize,
    /// The cache's `bytes_reserved` (0 for other allocators).
    pub reserved: usize,
    /// Resident bytes of the process minus its baseline.
    pub rss: usize,
}

/// What one replay measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Time of each replayed pass in ns (the slowest thread's).
    pub pass_ns: Vec<u64>,
    /// Minor page faults during pass 0 (set-up excluded).
    pub faults_first: u64,
    /// Minor page faults from the end of pass 0 to the end of the last pass.
    pub faults_steady: u64,
    /// Resident bytes just before the replay started.
    pub baseline_rss: usize,
    /// Peak resident bytes (`VmHWM`), reset just before the replay if the
    /// kernel allows.
    pub peak_rss: usize,
    /// Peak resident bytes over the steady passes (reset after pass 0).
    pub steady_peak_rss: usize,
    /// Whether `peak_rss` was reset before the replay (else it includes
    /// anything the process did before).
    pub peak_rss_reset: bool,
    /// The cache's counters at the end of pass 0.
    pub cache_after_first: Option<Stats>,
    /// The cache's counters after the last pass (before the replayer frees
    /// the blocks still live).
    pub cache_final: Option<Stats>,
    /// The cache's `bytes_in_use` at the end of each pass.
    pub in_use_at_pass_end: Vec<usize>,
    /// Memory samples: one at each pass end, more with `sample_every`.
    pub samples: Vec<Sample>,
}

/// Thread 0's pass-boundary bookkeeping.
struct PassMeter<'a, A> {
    alloc: &'a A,
    trace: &'a Trace,
    threads: usize,
    rss: RssReader,
    baseline_rss: usize,
    faults_start: u64,
    faults_after_first: u64,
    faults_end: u64,
    cache_after_first: Option<Stats>,
    cache_final: Option<Stats>,
    /// `VmHWM` at the end of pass 0, before the steady passes' reset.
    first_pass_peak_rss: usize,
    in_use_at_pass_end: Vec<usize>,
    samples: Vec<Sample>,
    events_done: u64,
}

impl<A: ReplayAlloc> PassMeter<'_, A> {
    /// Readings at the start of pass `pass` (= the end of pass `pass - 1`);
    /// `pass == passes` is the end of the replay.
    fn boundary(&mut self, pass: usize, passes: usize) {
        let stats = self.alloc.cache_stats();
        if pass == 0 {
            self.faults_start = measure::minor_faults();
        } else {
            if let Some(stats) = stats {
                self.in_use_at_pass_end.push(stats.bytes_in_use);
            }
            let live = self.trace.live_at_end_of_pass(pass - 1) * self.threads;
            self.sample(pass - 1, live, stats);
        }
        if pass == 1 {
            self.first_pass_peak_rss = measure::status_bytes("VmHWM").unwrap_or(0);
            self.faults_after_first = measure::minor_faults();
            self.cache_after_first = stats;
            // Steady passes get a peak of their own.
            measure::reset_peak_rss();
        }
        if pass == passes {
            self.faults_end = measure::minor_faults();
            self.cache_final = stats;
        }
    }

    fn sample(&mut self, pass: usize, live: usize, stats: Option<Stats>) {
        let stats = stats.or_else(|| self.alloc.cache_stats());
        self.samples.push(Sample {
            event: self.events_done,
            pass,
            live,
            cached: stats.map_or(0, |stats| stats.bytes_cached),
            reserved: stats.map_or(0, |stats| stats.bytes_reserved),
            rss: self.rss.resident().saturating_sub(self.baseline_rss),
        });
    }
}

/// The slot table of one thread: each live block's pointer (null when the
/// slot is free) and size.
struct Slots(Vec<(*mut u8, usize)>);

// SAFETY: the pointers are blocks owned by the thread that holds the table;
// moving the table to that thread moves their ownership, like a `Vec<Box<_>>`.
unsafe impl Send for Slots {}

/// Replays `trace` through `alloc` as `options` say.
pub fn replay<A: ReplayAlloc>(
    trace: &Trace,
    alloc: &A,
    options: &Options,
) -> Result<Outcome, String> {
    if options.passes == 0 || options.threads == 0 {
        return Err("passes and threads must be at least 1".into());
    }
    let threads = options.threads;
    let barrier = Barrier::new(threads);
    let mut slot_tables: Vec<Slots> = (0..threads)
        .map(|_| Slots(vec![(ptr::null_mut(), 0); trace.slots]))
        .collect();

    let peak_rss_reset = measure::reset_peak_rss();
    let rss = RssReader::new();
    let baseline_rss = rss.resident();
    let mut meter = PassMeter {
        alloc,
        trace,
        threads,
        rss,
        baseline_rss,
        faults_start: 0,
        faults_after_first: 0,
        faults_end: 0,
        cache_after_first: None,
        cache_final: None,
        first_pass_peak_rss: 0,
        in_use_at_pass_end: Vec::with_capacity(options.passes),
        samples: Vec::new(),
        events_done: 0,
    };
    if let Some(every) = options.sample_every {
        let expected = trace.events.len() * options.passes.div_ceil(trace.passes.len());
        meter
            .samples
            .reserve(expected / every.max(1) + options.passes + 1);
    }

    let (first, others) = slot_tables.split_first_mut().expect("threads >= 1");
    let results: Vec<Result<Vec<u64>, String>> = if threads == 1 {
        vec![worker(
            alloc.clone(),
            trace,
            options,
            &barrier,
            first,
            Some(&mut meter),
        )]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = others
                .iter_mut()
                .map(|slots| {
                    let alloc = alloc.clone();
                    let barrier = &barrier;
                    scope.spawn(move || worker(alloc, trace, options, barrier, slots, None))
                })
                .collect();
            let mut results = vec![worker(
                alloc.clone(),
                trace,
                options,
                &barrier,
                first,
                Some(&mut meter),
            )];
            results.extend(handles.into_iter().map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("a replay thread panicked".into()))
            }));
            results
        })
    };
    let mut pass_ns = vec![0u64; options.passes];
    for result in results {
        for (slowest, ns) in pass_ns.iter_mut().zip(result?) {
            *slowest = (*slowest).max(ns);
        }
    }
    // The peak of the steady passes (reset at the end of pass 0), and of the
    // whole replay (the highest of that and pass 0's, read just before).
    let steady_peak_rss = measure::status_bytes("VmHWM").unwrap_or(0);
    let peak_rss = steady_peak_rss.max(meter.first_pass_peak_rss);
    Ok(Outcome {
        pass_ns,
        faults_first: meter.faults_after_first - meter.faults_start,
        faults_steady: meter.faults_end - meter.faults_after_first,
        baseline_rss,
        peak_rss,
        steady_peak_rss,
        peak_rss_reset,
        cache_after_first: meter.cache_after_first,
        cache_final: meter.cache_final,
        in_use_at_pass_end: meter.in_use_at_pass_end,
        samples: meter.samples,
    })
}

/// One thread's replay: set-up, then every pass between barriers. Returns the
/// time of each pass in ns. After an allocation failure the thread keeps
/// meeting the barriers (so the others finish) but replays nothing more.
fn worker<A: ReplayAlloc>(
    alloc: A,
    trace: &Trace,
    options: &Options,
    barrier: &Barrier,
    slots: &mut Slots,
    mut meter: Option<&mut PassMeter<'_, A>>,
) -> Result<Vec<u64>, String> {
    // With `turns`, a thread replays its whole run holding the turn (a
    // request from start to end), frees what it holds, and parks.
    static TURN: Mutex<()> = Mutex::new(());
    let turn = options
        .turns
        .then(|| TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    let meet = |barrier: &Barrier| {
        if turn.is_none() {
            barrier.wait();
        }
    };
    let file_passes = trace.passes.len();
    let mut times = Vec::with_capacity(options.passes);
    let mut failure = run_events(
        &alloc,
        &trace.events[trace.setup.clone()],
        slots,
        options.touch,
    );
    if let Some(meter) = meter.as_deref_mut() {
        meter.events_done += trace.setup.len() as u64;
    }
    for pass in 0..options.passes {
        if pass > 0 && !options.gap.is_zero() {
            std::thread::sleep(options.gap);
        }
        meet(barrier);
        if let Some(meter) = meter.as_deref_mut() {
            meter.boundary(pass, options.passes);
        }
        meet(barrier);
        if pass > 0 && pass % file_passes == 0 && failure.is_ok() {
            // The file's passes start again: back to the state after set-up
            // (untimed; after the boundary readings, which see the end of
            // the file's last pass).
            failure = run_events(&alloc, &trace.wrap, slots, options.touch);
        }
        alloc.begin_pass(pass);
        let events = trace.pass_events(pass);
        let start = Instant::now();
        if failure.is_ok() {
            failure = match (options.sample_every, meter.as_deref_mut()) {
                (Some(every), Some(meter)) => {
                    run_sampled(&alloc, events, slots, options.touch, every, pass, meter)
                }
                _ => run_events(&alloc, events, slots, options.touch),
            };
        }
        times.push(start.elapsed().as_nanos() as u64);
        if let Some(meter) = meter.as_deref_mut()
            && options.sample_every.is_none()
        {
            meter.events_done += events.len() as u64;
        }
    }
    if turn.is_some() {
        // The request is over: its blocks go before the thread parks.
        free_live(&alloc, slots);
        drop(turn);
    }
    barrier.wait();
    if let Some(meter) = meter {
        meter.boundary(options.passes, options.passes);
    }
    barrier.wait();
    free_live(&alloc, slots);
    failure.map(|()| times)
}

/// Frees whatever is still live (outputs, caches, set-up blocks).
fn free_live<A: ReplayAlloc>(alloc: &A, slots: &mut Slots) {
    for (block, size) in slots.0.iter_mut() {
        if !block.is_null() {
            // SAFETY: a non-null slot holds a live block allocated with this
            // size and ALIGN (validated by the parser).
            unsafe {
                alloc.dealloc(*block, Layout::from_size_align_unchecked(*size, ALIGN));
            }
            *block = ptr::null_mut();
        }
    }
}

/// Replays `events` in chunks of `every`, sampling memory after each chunk.
fn run_sampled<A: ReplayAlloc>(
    alloc: &A,
    events: &[Event],
    slots: &mut Slots,
    touch: Touch,
    every: usize,
    pass: usize,
    meter: &mut PassMeter<'_, A>,
) -> Result<(), String> {
    let mut live = live_bytes(slots);
    for chunk in events.chunks(every.max(1)) {
        run_events(alloc, chunk, slots, touch)?;
        meter.events_done += chunk.len() as u64;
        for event in chunk {
            match *event {
                Event::Alloc { size, .. } => live += size,
                Event::Free { size, .. } => live -= size,
            }
        }
        meter.sample(pass, live * meter.threads, None);
    }
    Ok(())
}

fn live_bytes(slots: &Slots) -> usize {
    slots
        .0
        .iter()
        .filter(|(block, _)| !block.is_null())
        .map(|(_, size)| size)
        .sum()
}

/// The hot loop.
#[inline]
fn run_events<A: ReplayAlloc>(
    alloc: &A,
    events: &[Event],
    slots: &mut Slots,
    touch: Touch,
) -> Result<(), String> {
    for event in events {
        match *event {
            Event::Alloc { slot, size } => {
                // SAFETY: the parser checked that `size` is non-zero and fits
                // a layout aligned to ALIGN.
                let layout = unsafe { Layout::from_size_align_unchecked(size, ALIGN) };
                // SAFETY: the size is not zero.
                let block = unsafe { alloc.alloc(layout) };
                if block.is_null() {
                    return Err(format!("allocation of {size} bytes failed"));
                }
                // SAFETY: `block` holds `size` writable bytes.
                unsafe { write_block(block, size, touch) };
                slots.0[slot as usize] = (block, size);
            }
            Event::Free { slot, size } => {
                let entry = &mut slots.0[slot as usize];
                // SAFETY: the parser guarantees the slot holds the live block
                // of this size; it is not used again.
                unsafe {
                    alloc.dealloc(entry.0, Layout::from_size_align_unchecked(size, ALIGN));
                }
                entry.0 = ptr::null_mut();
            }
        }
    }
    Ok(())
}

const TOUCH_PAGE: usize = 4096;

/// Writes a new block as `touch` says.
///
/// # Safety
///
/// `block` holds `size` writable bytes.
#[inline]
unsafe fn write_block(block: *mut u8, size: usize, touch: Touch) {
    match touch {
        Touch::None => {}
        Touch::Full => {
            // SAFETY: `size` writable bytes.
            unsafe { ptr::write_bytes(block, 0x5a, size) };
        }
        Touch::Page => {
            // One byte in every page the block covers: its first byte, then
            // the first byte of each following page.
            let start = block as usize;
            let end = start + size;
            // SAFETY: `size > 0` bytes are writable, so the first is.
            unsafe { block.write_volatile(1) };
            let mut page = (start & !(TOUCH_PAGE - 1)) + TOUCH_PAGE;
            while page < end {
                // SAFETY: `start < page < end`: inside the block.
                unsafe { block.add(page - start).write_volatile(1) };
                page += TOUCH_PAGE;
            }
        }
    }
}

//! [`Recorder`]: an allocator that forwards every request and records each
//! block's layout and lifetime, to plan from.

use core::alloc::Layout;
use core::fmt;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global};
use allocator_api2::vec::Vec;
use foldhash::fast::FixedState;
use hashbrown::HashMap;

use super::planner::{self, Lifetime};
use super::{Plan, Slot};
use crate::alloc::{RawAllocator, allocator_impls, dangling};
use crate::reentry::{self, Bookkeeping};
use crate::sync::{Arc, Mutex};

/// Records the allocations of a pass: every request is forwarded to the
/// backing allocator (`Global` by default) and its layout and lifetime are
/// logged in order, so that [`plan`](Self::plan) can lay the pass out in one
/// arena.
///
/// A cheaply clonable handle (clones share one log). Zero-sized requests are
/// neither forwarded nor recorded; `grow` and `shrink` are recorded as an
/// allocation and a free, as they happen.
///
/// # Examples
///
/// ```
/// use allocator_api2::vec::Vec;
/// use caching_allocator::plan::Recorder;
///
/// let recorder = Recorder::new();
/// let input: Vec<f32, _> = Vec::with_capacity_in(1024, recorder.clone());
/// let hidden: Vec<f32, _> = Vec::with_capacity_in(4096, recorder.clone());
/// drop(input);
/// let output: Vec<f32, _> = Vec::with_capacity_in(1024, recorder.clone());
/// drop((hidden, output));
///
/// let plan = recorder.plan();
/// // `output` reuses `input`'s memory: the arena holds the peak, not the sum.
/// assert_eq!(plan.arena_bytes(), (4096 + 1024) * 4);
/// assert_eq!(plan.peak_live_bytes(), (4096 + 1024) * 4);
/// ```
pub struct Recorder<A: Allocator = Global> {
    pub(crate) inner: Arc<Inner<A>>,
}

pub(crate) struct Inner<A: Allocator> {
    log: Mutex<Log>,
    backing: A,
}

struct Log {
    /// One tick per recorded allocation and free.
    clock: u64,
    records: Vec<Record, Bookkeeping>,
    /// Live recorded blocks: address -> index in `records`.
    live: HashMap<usize, usize, FixedState, Bookkeeping>,
}

#[derive(Clone, Copy)]
struct Record {
    layout: Layout,
    start: u64,
    /// `None` while the block is live.
    end: Option<u64>,
}

impl Recorder {
    /// A recorder over the global allocator.
    pub fn new() -> Self {
        Self::new_in(Global)
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Allocator> Recorder<A> {
    /// A recorder over `backing`.
    pub fn new_in(backing: A) -> Self {
        Self {
            inner: Arc::new(Inner {
                log: Mutex::new(Log {
                    clock: 0,
                    records: Vec::new_in(Bookkeeping),
                    live: HashMap::with_hasher_in(FixedState::default(), Bookkeeping),
                }),
                backing,
            }),
        }
    }

    /// How many allocations were recorded.
    pub fn allocations(&self) -> usize {
        self.inner.log.lock().records.len()
    }

    /// Forgets what was recorded, to record a new pass. Blocks live now are
    /// still freed to the backing allocator, but are not part of any plan.
    pub fn clear(&self) {
        let mut log = self.inner.log.lock();
        let _inside = reentry::inside();
        log.records.clear();
        log.live.clear();
    }

    /// Plans what was recorded: every block freed by now gets an offset in
    /// one arena, largest first, each at the lowest 64-aligned offset free for
    /// its whole lifetime. Blocks still live are left out (they are not part
    /// of a pass) but keep their place in the allocation order.
    pub fn plan(&self) -> Plan {
        // Planning allocates (the log is copied out under its lock): from the
        // inner allocator, never from this recorder's own scope, which would
        // take the same lock, or record the planner's scratch as the pass's.
        let _inside = reentry::inside();
        let log = self.inner.log.lock();
        let mut indices = std::vec::Vec::with_capacity(log.records.len());
        let mut lifetimes = std::vec::Vec::with_capacity(log.records.len());
        let mut settled = std::vec::Vec::with_capacity(log.records.len());
        // Planned blocks by index; the top is the latest still live (dead
        // ones below it are dropped when they surface: the clock only runs
        // forward).
        let mut live: std::vec::Vec<(usize, u64)> = std::vec::Vec::with_capacity(log.records.len());
        for (index, record) in log.records.iter().enumerate() {
            while live.last().is_some_and(|&(_, end)| end < record.start) {
                live.pop();
            }
            settled.push(live.last().map_or(0, |&(latest, _)| latest + 1));
            if let Some(end) = record.end
                && let Some(lifetime) = Lifetime::new(record.layout, record.start, end)
            {
                indices.push(index);
                lifetimes.push(lifetime);
                live.push((index, end));
            }
        }
        let allocations = log.records.len();
        drop(log);
        let mut slots = vec![None; allocations];
        let Some(placement) = planner::place(&lifetimes) else {
            // Offsets overflow: nothing can be planned.
            return Plan::unplanned(allocations);
        };
        for ((&index, lifetime), &offset) in indices.iter().zip(&lifetimes).zip(&placement.offsets)
        {
            slots[index] = Some(Slot {
                offset,
                size: lifetime.size,
                align: lifetime.align,
            });
        }
        Plan::new(
            slots,
            settled,
            placement.arena_bytes,
            planner::peak_live_bytes(&lifetimes),
        )
    }

    /// The allocator requests are forwarded to.
    pub fn backing(&self) -> &A {
        &self.inner.backing
    }
}

#[cfg(not(loom))]
impl<A: Allocator + Send + Sync + 'static> Recorder<A> {
    /// Makes this recorder the current thread's scope (see
    /// [`CachingAllocator::enter`](crate::CachingAllocator::enter)): with
    /// [`ScopedGlobal`](crate::ScopedGlobal) installed, the thread's
    /// allocations of at least its minimum size are recorded, so a model
    /// written with plain `Vec`s can be planned.
    pub fn enter(&self) -> crate::Scope {
        crate::scope::enter(self.inner.clone())
    }
}

// SAFETY: every block comes from the backing allocator (valid, disjoint) and
// goes back to it with its layout; the log only observes. `resize` is the
// default: allocate, copy, deallocate, each recorded as it happens.
unsafe impl<A: Allocator> RawAllocator for Inner<A> {
    fn allocate(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        // Room in the log first: a request is either recorded or refused, so
        // allocation indices stay aligned with the recording.
        {
            let mut log = self.log.lock();
            let _inside = reentry::inside();
            if log.records.try_reserve(1).is_err() || log.live.try_reserve(1).is_err() {
                return Err(AllocError);
            }
        }
        let block = reentry::allocate_from(&self.backing, layout, zeroed)?;
        let mut log = self.log.lock();
        let _inside = reentry::inside();
        let start = log.clock;
        log.clock += 1;
        let index = log.records.len();
        log.records.push(Record {
            layout,
            start,
            end: None,
        });
        log.live.insert(block.cast::<u8>().as_ptr() as usize, index);
        Ok(block)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        {
            let mut log = self.log.lock();
            let _inside = reentry::inside();
            let end = log.clock;
            log.clock += 1;
            if let Some(index) = log.live.remove(&(ptr.as_ptr() as usize))
                && let Some(record) = log.records.get_mut(index)
            {
                record.end = Some(end);
            }
        }
        let _inside = reentry::inside();
        // SAFETY: the caller's contract: `allocate` took it from the backing
        // allocator with `layout`.
        unsafe { self.backing.deallocate(ptr, layout) };
    }
}

allocator_impls!(Recorder, inner);

impl<A: Allocator> Clone for Recorder<A> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<A: Allocator> fmt::Debug for Recorder<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("allocations", &self.allocations())
            .finish_non_exhaustive()
    }
}

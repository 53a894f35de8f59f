//! Shared by the plan tests (`tests/all/plan*.rs`): a reference planner written
//! from the documented rule, a recording script, and `Watch`, an allocator
//! wrapper that checks every block it sees.
//!
//! - [`reference_plan`] places blocks as `plan` documents it (largest first,
//!   ties in allocation order, each at the lowest offset aligned to
//!   `max(align, 64)` that no block alive at the same time covers), by brute
//!   force over candidate offsets, so a plan can be compared slot by slot.
//! - [`Watch`] forwards to any allocator and asserts, for every block handed
//!   out, that it is aligned and overlaps no live block it handed out before;
//!   it also logs the allocations and frees, to compute the peak live bytes
//!   independently of the library.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use allocator_api2::alloc::{AllocError, Allocator, Layout};
use caching_allocator::MIN_ALIGN;
use caching_allocator::plan::{Plan, Planned, Slot};

use crate::fixture::{Counting, pattern};

/// The arena's granularity: slot sizes are rounded up to it, slot alignments
/// are at least it.
pub const GRANULE: usize = 64;

pub fn round64(size: usize) -> usize {
    size.div_ceil(GRANULE) * GRANULE
}

pub use crate::fixture::layout;

/// The arena of `plan` as `backing` holds it, checked: the backing's only
/// block, of the plan's arena size, aligned (its layout and its address) for
/// the widest slot. Returns its range.
pub fn arena_range(backing: &Counting, plan: &Plan) -> (usize, usize) {
    let live = backing.live_layouts();
    assert_eq!(
        live.len(),
        1,
        "the arena should be the only block: {live:?}"
    );
    let (base, arena) = live[0];
    assert_eq!(arena.size(), plan.arena_bytes());
    let widest = (0..plan.allocations())
        .filter_map(|i| plan.slot(i))
        .map(|s| s.align)
        .max()
        .unwrap_or(MIN_ALIGN);
    assert!(
        arena.align() >= widest,
        "arena {arena:?}, slots need {widest}"
    );
    assert_eq!(base % widest, 0, "arena not aligned for its slots");
    (base, base + arena.size())
}

/// `plan` over a new ledger backing (watched), the backing, and the range of
/// its arena.
pub fn planned_over(plan: &Plan) -> (Watch<Planned<Counting>>, Counting, (usize, usize)) {
    let backing = Counting::new();
    let planned = Watch::new(Planned::new_in(plan, backing.clone()));
    let range = arena_range(&backing, plan);
    (planned, backing, range)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One step of a recorded pass: allocate `(size, align)` (the next block
/// index), or free the block of that index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Alloc(usize, usize),
    Free(usize),
}

/// A recorded block as the test sees it: its layout and lifetime
/// `[start, end)` on the recording clock (one tick per op); `end` is `None`
/// if it was still live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Life {
    pub layout: Layout,
    pub start: u64,
    pub end: Option<u64>,
}

/// The lifetimes of a script of ops, by allocation index (every op one tick).
pub fn lifetimes(ops: &[Op]) -> Vec<Life> {
    let mut lives: Vec<Life> = Vec::new();
    for (tick, op) in ops.iter().enumerate() {
        match *op {
            Op::Alloc(size, align) => lives.push(Life {
                layout: layout(size, align),
                start: tick as u64,
                end: None,
            }),
            Op::Free(index) => {
                assert!(lives[index].end.is_none(), "script frees {index} twice");
                lives[index].end = Some(tick as u64);
            }
        }
    }
    lives
}

/// What a plan of `lives` must be, computed from the documented rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub slots: Vec<Option<Slot>>,
    pub arena_bytes: usize,
    pub peak_live_bytes: usize,
}

/// Places the blocks of `lives` that were freed: largest rounded size first,
/// ties in allocation order, each at the lowest offset (a multiple of its
/// alignment, at least 64) where it overlaps no placed block alive at the
/// same time. The lowest such offset is 0 or the end of a placed block
/// rounded up to the alignment, so only those are tried.
pub fn reference_plan(lives: &[Life]) -> Reference {
    let mut slots: Vec<Option<Slot>> = vec![None; lives.len()];
    let mut order: Vec<usize> = (0..lives.len())
        .filter(|&i| lives[i].end.is_some())
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(round64(lives[i].layout.size())), i));
    let together = |a: &Life, b: &Life| a.start < b.end.unwrap() && b.start < a.end.unwrap();
    let mut arena_bytes = 0;
    for &i in &order {
        let size = round64(lives[i].layout.size());
        let align = lives[i].layout.align().max(GRANULE);
        let conflicts: Vec<(usize, usize)> = (0..lives.len())
            .filter(|&j| slots[j].is_some() && together(&lives[i], &lives[j]))
            .map(|j| {
                let slot = slots[j].unwrap();
                (slot.offset, slot.offset + slot.size)
            })
            .collect();
        let mut candidates: Vec<usize> = conflicts
            .iter()
            .map(|&(_, end)| end.next_multiple_of(align))
            .collect();
        candidates.push(0);
        candidates.sort_unstable();
        let offset = candidates
            .into_iter()
            .find(|&c| {
                conflicts
                    .iter()
                    .all(|&(start, end)| c + size <= start || end <= c)
            })
            .unwrap();
        arena_bytes = arena_bytes.max(offset + size);
        slots[i] = Some(Slot {
            offset,
            size,
            align,
        });
    }
    // The peak: at every tick, the rounded sizes of the planned blocks alive.
    let last = lives.iter().filter_map(|life| life.end).max().unwrap_or(0);
    let peak_live_bytes = (0..=last)
        .map(|tick| {
            lives
                .iter()
                .filter(|life| life.end.is_some_and(|end| life.start <= tick && tick < end))
                .map(|life| round64(life.layout.size()))
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0);
    Reference {
        slots,
        arena_bytes,
        peak_live_bytes,
    }
}

/// Asserts that `plan` is exactly the reference plan of `lives`, and checks
/// the invariants the reference gives by construction (so a failure names
/// what broke): slots inside the arena, aligned, rounded, disjoint while
/// alive together.
#[track_caller]
pub fn assert_plan_matches(plan: &Plan, lives: &[Life]) {
    let reference = reference_plan(lives);
    assert_eq!(plan.allocations(), lives.len(), "{plan:?}");
    let planned = lives.iter().filter(|life| life.end.is_some()).count();
    assert_eq!(plan.planned_blocks(), planned, "{plan:?}");
    for (i, life) in lives.iter().enumerate() {
        match (plan.slot(i), life.end) {
            (None, None) => {}
            (Some(slot), Some(_)) => {
                assert_eq!(slot.size, round64(life.layout.size()), "slot {i}");
                assert_eq!(slot.align, life.layout.align().max(GRANULE), "slot {i}");
                assert_eq!(slot.offset % slot.align, 0, "slot {i} misaligned");
                assert!(
                    slot.offset + slot.size <= plan.arena_bytes(),
                    "slot {i} past the arena"
                );
            }
            (slot, end) => panic!("block {i} (end {end:?}) has slot {slot:?}"),
        }
    }
    for (i, a) in lives.iter().enumerate() {
        for (j, b) in lives.iter().enumerate().skip(i + 1) {
            let (Some(sa), Some(sb)) = (plan.slot(i), plan.slot(j)) else {
                continue;
            };
            if a.start < b.end.unwrap() && b.start < a.end.unwrap() {
                assert!(
                    sa.offset + sa.size <= sb.offset || sb.offset + sb.size <= sa.offset,
                    "blocks {i} {sa:?} and {j} {sb:?} are alive together and share memory"
                );
            }
        }
    }
    assert!(plan.slot(lives.len()).is_none());
    assert_eq!(plan.peak_live_bytes(), reference.peak_live_bytes, "peak");
    assert!(plan.arena_bytes() >= plan.peak_live_bytes());
    let slots: Vec<Option<Slot>> = (0..lives.len()).map(|i| plan.slot(i)).collect();
    assert_eq!(slots, reference.slots, "slots differ from the reference");
    assert_eq!(plan.arena_bytes(), reference.arena_bytes, "arena bytes");
}

/// A raw block taken for a test, stamped with a pattern of `tag`.
#[derive(Debug)]
pub struct Block {
    pub ptr: NonNull<u8>,
    pub layout: Layout,
    pub tag: u8,
}

// SAFETY: a block is plain memory owned by whoever holds it.
unsafe impl Send for Block {}

impl Block {
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub fn end(&self) -> usize {
        self.addr() + self.layout.size()
    }

    /// Byte `i` of the block's pattern.
    fn byte(&self, i: usize) -> u8 {
        self.tag ^ (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8)
    }

    /// Row `r` of the block's pattern (its bytes `256 r ..`). Row `s` of the
    /// fixture's pattern is `k * 31 ^ s` for `k` in `0..256`, so XOR-ing the
    /// tag into `byte` only reorders the fixture's rows: the block's row `r`
    /// is the fixture's row `r ^ tag`. Written and compared a row at a time
    /// (`copy_from_slice`, `==`), not byte by byte: under Miri the byte loops
    /// were most of the plan tests' time.
    fn row(&self, r: usize) -> &'static [u8] {
        let from = ROW * usize::from(r as u8 ^ self.tag);
        &pattern(0, ROW * 256)[from..from + ROW]
    }

    /// Writes the block's pattern over all its bytes.
    pub fn fill(&self) {
        // SAFETY: the block is live and holds `layout.size()` bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) };
        for (r, chunk) in bytes.chunks_mut(ROW).enumerate() {
            chunk.copy_from_slice(&self.row(r)[..chunk.len()]);
        }
    }

    /// Asserts the block still holds its pattern.
    #[track_caller]
    pub fn check(&self) {
        // SAFETY: as for `fill`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) };
        let intact = bytes
            .chunks(ROW)
            .enumerate()
            .all(|(r, chunk)| chunk == &self.row(r)[..chunk.len()]);
        if intact {
            return;
        }
        let i = (0..bytes.len())
            .find(|&i| bytes[i] != self.byte(i))
            .expect("a row differs, so a byte does");
        panic!(
            "block {:#x} ({:?}, tag {}) overwritten at byte {i}",
            self.addr(),
            self.layout,
            self.tag
        );
    }
}

/// A row of the pattern: `byte(i)` is `k * 31` XOR the row's number for
/// `i = 256 * row + k`.
const ROW: usize = 256;

/// Allocates `(size, align)` from `alloc` and stamps it.
#[track_caller]
pub fn take<A: Allocator>(alloc: &A, size: usize, align: usize, tag: u8) -> Block {
    let layout = layout(size, align);
    let ptr = alloc.allocate(layout).expect("allocation failed").cast();
    assert_eq!(ptr.as_ptr() as usize % align, 0, "misaligned block");
    let block = Block { ptr, layout, tag };
    block.fill();
    block
}

/// Checks the stamp of `block` and frees it to `alloc`.
#[track_caller]
pub fn give<A: Allocator>(alloc: &A, block: Block) {
    block.check();
    // SAFETY: `take` allocated it from `alloc` with this layout; it is
    // consumed here.
    unsafe { alloc.deallocate(block.ptr, block.layout) };
}

#[derive(Default)]
struct WatchState {
    /// Live blocks: address -> layout.
    live: BTreeMap<usize, Layout>,
    /// Every allocation (`true`) and free (`false`), in order.
    log: Vec<(bool, Layout)>,
}

/// Forwards to `inner` and checks every block: aligned, and overlapping no
/// live block handed out through this `Watch` (or its clones). Clones share
/// the ledger.
pub struct Watch<A> {
    inner: A,
    state: Arc<Mutex<WatchState>>,
}

impl<A: Clone> Clone for Watch<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            state: Arc::clone(&self.state),
        }
    }
}

impl<A> Watch<A> {
    pub fn new(inner: A) -> Self {
        Self {
            inner,
            state: Arc::default(),
        }
    }

    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The live blocks as `(address, layout)`, by address.
    pub fn live(&self) -> Vec<(usize, Layout)> {
        lock(&self.state)
            .live
            .iter()
            .map(|(&a, &l)| (a, l))
            .collect()
    }

    /// Allocations seen so far.
    pub fn allocations(&self) -> usize {
        lock(&self.state).log.iter().filter(|e| e.0).count()
    }

    /// The most bytes live at once, each block's size rounded up to 64, over
    /// everything logged.
    pub fn peak_rounded_bytes(&self) -> usize {
        let (mut live, mut peak) = (0usize, 0usize);
        for &(alloc, layout) in &lock(&self.state).log {
            if alloc {
                live += round64(layout.size());
                peak = peak.max(live);
            } else {
                live -= round64(layout.size());
            }
        }
        peak
    }

    fn insert(&self, block: NonNull<[u8]>, layout: Layout) {
        let addr = block.cast::<u8>().as_ptr() as usize;
        assert!(block.len() >= layout.size(), "short block");
        assert_eq!(
            addr % layout.align(),
            0,
            "block {addr:#x} misaligned for {layout:?}"
        );
        let mut state = lock(&self.state);
        if let Some((&before, &l)) = state.live.range(..=addr).next_back() {
            assert!(
                before + l.size() <= addr,
                "new block {addr:#x} ({layout:?}) overlaps live block {before:#x} ({l:?})"
            );
        }
        if let Some((&after, &l)) = state.live.range(addr..).next() {
            assert!(
                addr + layout.size() <= after,
                "new block {addr:#x} ({layout:?}) overlaps live block {after:#x} ({l:?})"
            );
        }
        state.live.insert(addr, layout);
        state.log.push((true, layout));
    }

    fn remove(&self, ptr: NonNull<u8>, layout: Layout) {
        let addr = ptr.as_ptr() as usize;
        let mut state = lock(&self.state);
        assert_eq!(
            state.live.remove(&addr),
            Some(layout),
            "free of {addr:#x} that is not live with {layout:?}"
        );
        state.log.push((false, layout));
    }
}

// SAFETY: forwards every call to `inner` unchanged; the ledger only observes.
// `grow`/`shrink` are the trait defaults (allocate, copy, deallocate through
// these methods).
unsafe impl<A: Allocator> Allocator for Watch<A> {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let block = self.inner.allocate(layout)?;
        self.insert(block, layout);
        Ok(block)
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let block = self.inner.allocate_zeroed(layout)?;
        self.insert(block, layout);
        Ok(block)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        self.remove(ptr, layout);
        // SAFETY: the caller's contract; `inner` handed the block out.
        unsafe { self.inner.deallocate(ptr, layout) }
    }
}

/// `fill`'s rows are `byte`'s pattern (the pattern `check` names a
/// mismatch by), over more than one period of the fixture's rows.
#[test]
fn a_blocks_rows_are_its_byte_pattern() {
    let alloc = allocator_api2::alloc::Global;
    for tag in [0, 1, 0x5a, 255] {
        let block = take(&alloc, 70_001, 64, tag);
        // SAFETY: live, `layout.size()` bytes, filled by `take`.
        let bytes = unsafe { std::slice::from_raw_parts(block.ptr.as_ptr(), block.layout.size()) };
        for (i, &b) in bytes.iter().enumerate() {
            assert_eq!(b, block.byte(i), "tag {tag}, byte {i}");
        }
        give(&alloc, block);
    }
}

//! What the fuzz targets share: a checking backing allocator, byte patterns,
//! and a table of the live blocks a target holds.
//!
//! - [`Backing`] hands out blocks from the global allocator and keeps a
//!   ledger (address -> layout, owner); it panics on a double free, a free
//!   with another layout, a free of an unknown pointer, a free by another
//!   owner, or a zero-sized request. It can fail allocations on a schedule
//!   taken from the fuzz input.
//! - [`fill`] / [`check`] write and verify a pattern derived from a block's
//!   id, so a block that two owners share, or that the allocator scribbles
//!   on, shows up at the next check.
//! - [`Blocks`] holds the live blocks and checks that they are disjoint and
//!   aligned.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};

/// The byte fresh (non-zeroed) backing blocks are filled with, so a zeroed
/// request that is not zeroed shows up.
pub const FRESH_BYTE: u8 = 0xA5;
/// The byte returned backing blocks are filled with before they go back.
pub const RETURNED_BYTE: u8 = 0xDD;

#[derive(Default)]
struct Ledger {
    /// Live backing blocks: address -> (layout, owner).
    live: BTreeMap<usize, (Layout, usize)>,
    /// Bytes live per owner (index = owner id).
    bytes: Vec<usize>,
    /// Blocks live per owner.
    blocks: Vec<usize>,
    /// Allocation calls so far (failed ones included): the schedule's clock.
    calls: usize,
    /// Bit `n` set: the `n`-th allocation call fails. Past its end, none do.
    schedule: Vec<u8>,
    failed: u64,
}

/// The ledger all [`Backing`] handles of one run share.
#[derive(Clone, Default)]
pub struct Ledgers {
    ledger: Arc<Mutex<Ledger>>,
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Ledgers {
    /// A ledger whose allocation calls fail where `schedule`'s bits are set.
    pub fn new(schedule: Vec<u8>) -> Self {
        let ledgers = Self::default();
        lock(&ledgers.ledger).schedule = schedule;
        ledgers
    }

    /// A backing allocator for owner `owner` on this ledger.
    pub fn backing(&self, owner: usize) -> Backing {
        Backing {
            ledger: Arc::clone(&self.ledger),
            owner,
        }
    }

    /// Whether any allocation call may fail.
    pub fn may_fail(&self) -> bool {
        lock(&self.ledger).schedule.iter().any(|&b| b != 0)
    }

    /// Turns failures off (or back on with a new schedule).
    pub fn set_schedule(&self, schedule: Vec<u8>) {
        let mut ledger = lock(&self.ledger);
        ledger.schedule = schedule;
        ledger.calls = 0;
    }

    /// Allocations refused so far.
    pub fn failed(&self) -> u64 {
        lock(&self.ledger).failed
    }

    /// Bytes `owner` holds.
    pub fn live_bytes(&self, owner: usize) -> usize {
        lock(&self.ledger).bytes.get(owner).copied().unwrap_or(0)
    }

    /// Blocks `owner` holds.
    pub fn live_blocks(&self, owner: usize) -> usize {
        lock(&self.ledger).blocks.get(owner).copied().unwrap_or(0)
    }

    /// Blocks held by anyone.
    pub fn total_live_blocks(&self) -> usize {
        lock(&self.ledger).live.len()
    }

    /// The live backing blocks of `owner`, by address.
    pub fn blocks_of(&self, owner: usize) -> Vec<(usize, Layout)> {
        lock(&self.ledger)
            .live
            .iter()
            .filter(|(_, (_, o))| *o == owner)
            .map(|(&a, &(l, _))| (a, l))
            .collect()
    }

    /// The backing block containing `[addr, addr + size)`, if one does:
    /// (its address, layout, owner).
    pub fn containing(&self, addr: usize, size: usize) -> Option<(usize, Layout, usize)> {
        let ledger = lock(&self.ledger);
        let (&start, &(layout, owner)) = ledger.live.range(..=addr).next_back()?;
        (addr + size <= start + layout.size()).then_some((start, layout, owner))
    }
}

/// A backing allocator that checks every call against the shared ledger.
/// Clones share the ledger and the owner.
#[derive(Clone)]
pub struct Backing {
    ledger: Arc<Mutex<Ledger>>,
    owner: usize,
}

impl Backing {
    /// The owner id blocks are filed under.
    pub fn owner(&self) -> usize {
        self.owner
    }

    fn take(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        assert!(
            layout.size() > 0,
            "zero-sized request reached the backing allocator"
        );
        let mut ledger = lock(&self.ledger);
        let call = ledger.calls;
        ledger.calls += 1;
        let fails = ledger
            .schedule
            .get(call / 8)
            .is_some_and(|byte| byte >> (call % 8) & 1 == 1);
        if fails {
            ledger.failed += 1;
            return Err(AllocError);
        }
        let block = if zeroed {
            Global.allocate_zeroed(layout)?
        } else {
            let block = Global.allocate(layout)?;
            // SAFETY: a fresh block of `layout.size()` bytes.
            unsafe {
                block
                    .cast::<u8>()
                    .as_ptr()
                    .write_bytes(FRESH_BYTE, layout.size())
            };
            block
        };
        let addr = block.cast::<u8>().as_ptr() as usize;
        assert_eq!(
            addr % layout.align(),
            0,
            "Global returned a misaligned block"
        );
        if let Some((&prev, &(prev_layout, _))) = ledger.live.range(..addr).next_back() {
            assert!(
                prev + prev_layout.size() <= addr,
                "Global returned an overlapping block"
            );
        }
        let previous = ledger.live.insert(addr, (layout, self.owner));
        assert!(previous.is_none(), "Global handed out {addr:#x} twice");
        if ledger.bytes.len() <= self.owner {
            ledger.bytes.resize(self.owner + 1, 0);
            ledger.blocks.resize(self.owner + 1, 0);
        }
        ledger.bytes[self.owner] += layout.size();
        ledger.blocks[self.owner] += 1;
        Ok(NonNull::slice_from_raw_parts(block.cast(), layout.size()))
    }
}

// SAFETY: blocks come from `Global` and go back to it with the layout they
// were taken with (checked against the ledger).
unsafe impl Allocator for Backing {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.take(layout, false)
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.take(layout, true)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        let addr = ptr.as_ptr() as usize;
        {
            let mut ledger = lock(&self.ledger);
            let Some((recorded, owner)) = ledger.live.remove(&addr) else {
                panic!("backing: free of unknown or already freed block {addr:#x} ({layout:?})");
            };
            assert_eq!(
                recorded, layout,
                "backing: block {addr:#x} freed with another layout"
            );
            assert_eq!(
                owner, self.owner,
                "backing: block {addr:#x} of owner {owner} freed by owner {}",
                self.owner
            );
            ledger.bytes[owner] -= layout.size();
            ledger.blocks[owner] -= 1;
        }
        // SAFETY: the ledger says this block is ours, taken with `layout`.
        unsafe {
            ptr.as_ptr().write_bytes(RETURNED_BYTE, layout.size());
            Global.deallocate(ptr, layout);
        }
    }
}

/// The pattern byte at offset `i` of the block with id `id`.
#[inline]
pub fn pattern(id: u64, i: usize) -> u8 {
    let seed = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 | 1;
    (i as u8).wrapping_mul(seed) ^ (i >> 8) as u8 ^ (id as u8)
}

/// Writes block `id`'s pattern over `range` of the block at `ptr`.
///
/// # Safety
///
/// `ptr .. ptr + range.end` is writable and ours.
pub unsafe fn fill(ptr: *mut u8, id: u64, range: std::ops::Range<usize>) {
    for i in range {
        // SAFETY: the caller's contract.
        unsafe { ptr.add(i).write(pattern(id, i)) };
    }
}

/// Checks block `id`'s pattern over `range` of the block at `ptr`.
///
/// # Safety
///
/// `ptr .. ptr + range.end` is readable.
pub unsafe fn check(ptr: *const u8, id: u64, range: std::ops::Range<usize>, what: &str) {
    for i in range {
        // SAFETY: the caller's contract.
        let byte = unsafe { ptr.add(i).read() };
        if byte != pattern(id, i) {
            panic!(
                "{what}: block {id} at {ptr:p} byte {i} is {byte:#04x}, expected {:#04x}",
                pattern(id, i)
            );
        }
    }
}

/// Checks that `range` of the block at `ptr` reads zero.
///
/// # Safety
///
/// `ptr .. ptr + range.end` is readable.
pub unsafe fn check_zero(ptr: *const u8, range: std::ops::Range<usize>, what: &str) {
    for i in range {
        // SAFETY: the caller's contract.
        let byte = unsafe { ptr.add(i).read() };
        assert_eq!(
            byte, 0,
            "{what}: byte {i} of a zeroed block at {ptr:p} is {byte:#04x}"
        );
    }
}

/// Checks that no two of `blocks` (address, size) share a byte; zero-sized
/// blocks are skipped.
pub fn assert_disjoint(blocks: impl IntoIterator<Item = (usize, usize)>, what: &str) {
    let mut spans: Vec<(usize, usize)> = blocks.into_iter().filter(|&(_, s)| s > 0).collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((a, a_size), (b, _)) = (pair[0], pair[1]);
        assert!(
            a + a_size <= b,
            "{what}: live blocks overlap: [{a:#x}, +{a_size}) and [{b:#x}, ..)"
        );
    }
}

/// Sizes: mostly small or from a palette, so that blocks get reused.
#[derive(Clone, Copy, Debug, arbitrary::Arbitrary)]
pub enum Size {
    /// One of the input's palette sizes.
    Palette(u8),
    /// 0..=255 bytes.
    Small(u8),
    /// 0..4096 bytes.
    Medium(u16),
    /// 0..65536 bytes.
    Large(u16),
}

impl Size {
    /// The size in bytes, below 64 KiB.
    pub fn bytes(self, palette: &[u16]) -> usize {
        match self {
            Size::Palette(i) if !palette.is_empty() => palette[i as usize % palette.len()] as usize,
            Size::Palette(i) => i as usize,
            Size::Small(s) => s as usize,
            Size::Medium(s) => s as usize % 4096,
            Size::Large(s) => s as usize,
        }
    }
}

/// An alignment from a log2 (up to 4096).
pub fn align_from(log2: u8) -> usize {
    1 << (log2 % 13)
}

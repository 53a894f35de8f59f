//! [`Snapshot`]: what a cache holds, block by block, at one instant
//! ([`CachingAllocator::snapshot`](crate::CachingAllocator::snapshot)), with
//! its `Stats` and (if it records one) its history of events. PyTorch's
//! `torch.cuda.memory._snapshot()` is the model: [`Snapshot::write_pytorch`]
//! writes its pickle, which pytorch.org/memory_viz and
//! `python -m torch.cuda._memory_viz` read, and [`Snapshot::write_html`]
//! draws a page of its own.
//!
//! **What it knows.** Best fit knows every free byte of its segments (free
//! ranges, quick lists, decommitted pages) and, from the per-CPU fronts,
//! every block they keep; the rest of a segment is in use. A block in use is
//! told apart from its neighbours, with its requested size, only if the
//! history still holds its allocation; otherwise a run of blocks in use is
//! one `InUse` piece of unknown requested size. The free-list policies hold
//! no segments: their cached blocks are listed by address and size, and
//! (from the history) their blocks in use.
//!
//! **What it costs.** The cache's lock is held while its books are copied
//! (the free pieces, not the blocks in use); the history and the sorting
//! are read after it is released. A whole snapshot of a best-fit cache
//! holding 100,000 blocks in use and 50,000 free pieces takes about 2 ms
//! (docs/history.md, `scripts/measure_history.py`). Everything it allocates comes from the
//! global allocator with the thread marked inside the allocator, never from
//! the cache it describes (a `ScopedGlobal` scope sends it to the inner
//! allocator).

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::frames::Frame;
use crate::history::{Action, Event};
use crate::stats::Stats;

/// What a piece of a segment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum BlockState {
    /// Handed out to a user.
    InUse,
    /// Free in the arena's free ranges.
    Free,
    /// Free, waiting on a quick list (an exact length, reused first).
    QuickList,
    /// Kept in the front cache of a CPU (its number), or of a thread
    /// (`None`).
    Front(Option<usize>),
    /// Free, its pages given back to the system (they read as zero when
    /// used again).
    Decommitted,
    /// Free, but no release can give it back while its neighbours live
    /// (`Stats::bytes_pinned`): counted in `Free` pieces' totals.
    Pinned,
}

/// A piece of a segment: a block in use, a free range, a block in a front.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Block {
    /// Its address.
    pub address: usize,
    /// Its length.
    pub size: usize,
    /// The bytes its user asked for, where known (the history holds its
    /// allocation).
    pub requested: Option<usize>,
    /// What it is.
    pub state: BlockState,
}

/// Where a segment's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum SegmentKind {
    /// The usable part of an address range the cache reserved (it grows in
    /// place).
    Reserved,
    /// A block of the backing allocator, given back only whole.
    Fixed,
    /// One block of a free-list policy, as the backing allocator handed it
    /// out.
    Block,
    /// The arena of a [`Planned`](crate::plan::Planned) allocator: its
    /// blocks are the plan's slots in use.
    Plan,
}

/// A segment and its pieces, by address, covering it exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Segment {
    /// Its start.
    pub address: usize,
    /// Its length (what it holds, decommitted pages included).
    pub size: usize,
    /// Where it comes from.
    pub kind: SegmentKind,
    /// Its pieces, by address, covering `[address, address + size)`.
    pub blocks: Vec<Block>,
}

/// A cache at one instant. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Snapshot {
    /// The counters, taken with the books.
    pub stats: Stats,
    /// The segments, by address.
    pub segments: Vec<Segment>,
    /// The history's events still in its ring, oldest first (empty without
    /// [`Builder::record_history`](crate::Builder::record_history)).
    pub history: Vec<Event>,
    /// The stack of each event of `history`, innermost frame first, from
    /// the code that called into the cache (empty lists unless the
    /// `backtrace` feature is on and
    /// [`Builder::record_frames`](crate::Builder::record_frames) set).
    pub frames: Vec<Vec<Frame>>,
    /// Events the history recorded in all, the ones the ring dropped
    /// included.
    pub recorded: usize,
}

/// A free or front piece of the books, before the segments are cut.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub(crate) address: usize,
    pub(crate) size: usize,
    pub(crate) state: BlockState,
}

impl Snapshot {
    /// Cuts `segments` (start, length, kind) into pieces: `pieces` where the
    /// books say, blocks in use (told apart by the history's live
    /// allocations) in between.
    ///
    /// `extra`: bytes a block in use holds beyond its request rounded to 64
    /// (best fit's longer blocks), by address.
    pub(crate) fn assemble(
        stats: Stats,
        segments: Vec<(usize, usize, SegmentKind)>,
        mut pieces: Vec<Piece>,
        extra: &BTreeMap<usize, usize>,
        history: Vec<Event>,
        frames: Vec<Vec<Frame>>,
        recorded: usize,
    ) -> Self {
        pieces.sort_unstable_by_key(|piece| piece.address);
        let live: BTreeMap<usize, (usize, usize)> = live_blocks(&history)
            .into_iter()
            .map(|(address, requested)| {
                let len = requested.next_multiple_of(crate::policy::MIN_ALIGN)
                    + extra.get(&address).copied().unwrap_or(0);
                (address, (requested, len))
            })
            .collect();
        let segments = segments
            .into_iter()
            .map(|(address, size, kind)| {
                let end = address + size;
                let from = pieces.partition_point(|piece| piece.address < address);
                let mut blocks = Vec::new();
                let mut at = address;
                for piece in pieces[from..]
                    .iter()
                    .take_while(|piece| piece.address < end)
                {
                    if piece.address > at {
                        in_use(&live, at, piece.address, &mut blocks);
                    }
                    let start = piece.address.max(at);
                    let stop = (piece.address + piece.size).min(end);
                    if stop > start {
                        blocks.push(Block {
                            address: start,
                            size: stop - start,
                            requested: None,
                            state: piece.state,
                        });
                        at = stop;
                    }
                }
                if at < end {
                    in_use(&live, at, end, &mut blocks);
                }
                Segment {
                    address,
                    size,
                    kind,
                    blocks,
                }
            })
            .collect();
        Self {
            stats,
            segments,
            history,
            frames,
            recorded,
        }
    }

    /// Writes the snapshot as the pickle `torch.cuda.memory._snapshot()`
    /// returns (protocol 2): `segments` with their `blocks`, and
    /// `device_traces` from the history, so pytorch.org/memory_viz and
    /// `python -m torch.cuda._memory_viz` read it. A block in a front or a
    /// free one is `"inactive"`, one in use `"active_allocated"`; decommitted
    /// pages are `"inactive"` too.
    pub fn write_pytorch(&self, out: &mut impl Write) -> io::Result<()> {
        crate::pickle::write_snapshot(self, out)
    }

    /// Writes a self-contained HTML page (no network at view time): the
    /// active memory over the history's events, the segments with their
    /// blocks coloured by state, and the memory held over the memory in
    /// use.
    pub fn write_html(&self, title: &str, out: &mut impl Write) -> io::Result<()> {
        crate::page::write(self, title, out)
    }

    /// Bytes in pieces of `state` over all segments.
    pub fn bytes_in(&self, state: BlockState) -> usize {
        self.segments
            .iter()
            .flat_map(|segment| &segment.blocks)
            .filter(|block| block.state == state)
            .map(|block| block.size)
            .sum()
    }
}

/// The blocks the history shows in use at its end: address -> requested
/// bytes (an allocation with no free after it).
pub(crate) fn live_blocks(history: &[Event]) -> BTreeMap<usize, usize> {
    let mut live = BTreeMap::new();
    for event in history {
        match event.action {
            Action::Alloc => {
                live.insert(event.address, event.size);
            }
            Action::Free => {
                live.remove(&event.address);
            }
            _ => {}
        }
    }
    live
}

/// Pieces in use over `[from, to)`: the history's blocks where it knows
/// them (`address -> (requested, length)`), one unknown piece for each run
/// it does not.
fn in_use(live: &BTreeMap<usize, (usize, usize)>, from: usize, to: usize, blocks: &mut Vec<Block>) {
    let mut at = from;
    for (&address, &(requested, len)) in live.range(from..to) {
        let end = (address + len).min(to);
        if address > at {
            blocks.push(Block {
                address: at,
                size: address - at,
                requested: None,
                state: BlockState::InUse,
            });
        }
        if end > address.max(at) {
            blocks.push(Block {
                address: address.max(at),
                size: end - address.max(at),
                requested: Some(requested),
                state: BlockState::InUse,
            });
            at = end;
        }
    }
    if to > at {
        blocks.push(Block {
            address: at,
            size: to - at,
            requested: None,
            state: BlockState::InUse,
        });
    }
}

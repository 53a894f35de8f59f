//! Records a random pass through `plan::Recorder`, plans it, checks the plan,
//! then runs passes through `plan::Planned` with random deviations (bigger
//! or more aligned requests, extra allocations, late frees, allocations
//! outside a pass, restarted passes). Every block holds a pattern, checked
//! before it is freed or resized and after a resize; live blocks never
//! overlap; an undeviated pass is served entirely from the arena; at the end
//! the backing holds nothing.
#![no_main]

use std::alloc::Layout;
use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;
use arbitrary::Arbitrary;
use caching_allocator::plan::{Planned, Recorder};
use fuzz_support::{Ledgers, Size, align_from, assert_disjoint, check, check_zero, fill};
use libfuzzer_sys::fuzz_target;

#[derive(Clone, Copy, Debug, Arbitrary)]
enum RecOp {
    Alloc {
        size: Size,
        align_log2: u8,
        zeroed: bool,
    },
    Free {
        index: u8,
    },
    Grow {
        index: u8,
        by: Size,
    },
    Shrink {
        index: u8,
        to: Size,
    },
}

#[derive(Clone, Copy, Debug, Arbitrary)]
enum Deviation {
    None,
    /// This allocation (or resize target) asks for more bytes.
    Bigger(u16),
    /// This allocation asks for a larger alignment.
    MoreAligned(u8),
    /// An extra allocation before this event, freed at the end of the pass
    /// or in the next one.
    Extra {
        size: Size,
        late: bool,
    },
    /// This free happens only in the next pass (or at the end).
    LateFree,
    /// Skips this event: a skipped free leaves the block live until the end
    /// of the pass; a skipped allocation shifts the pass's indices.
    Skip,
    /// Starts another pass on top of this one (the allocation index restarts).
    RestartPass,
    /// Frees a random live block now (an early free).
    EarlyFree(u8),
}

#[derive(Debug, Arbitrary)]
struct PassSpec {
    /// Allocations made before the pass starts (outside a pass).
    outside_before: Vec<Size>,
    /// Deviation of each script event; past its end, none.
    deviations: Vec<Deviation>,
    /// Allocations made after the pass guard drops, freed in the next pass.
    outside_after: Vec<Size>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    palette: [u16; 4],
    recording: Vec<RecOp>,
    /// Leave the blocks live at the end of the recording live (they are
    /// then not planned).
    leave_live: bool,
    /// The arena's allocation fails: everything comes from the backing.
    arena_fails: bool,
    passes: Vec<PassSpec>,
}

/// One event of the recorded script, by script block number.
#[derive(Clone, Copy, Debug)]
enum Event {
    Alloc {
        block: usize,
        layout: Layout,
        zeroed: bool,
    },
    Free {
        block: usize,
    },
    Resize {
        block: usize,
        layout: Layout,
    },
}

#[derive(Clone, Copy)]
struct Live {
    ptr: NonNull<u8>,
    layout: Layout,
    id: u64,
}

/// Live blocks of one allocator, with checks.
struct Blocks {
    live: Vec<Live>,
    next_id: u64,
}

impl Blocks {
    fn new() -> Self {
        Self {
            live: Vec::new(),
            next_id: 1,
        }
    }

    fn allocate<A: Allocator>(&mut self, alloc: &A, layout: Layout, zeroed: bool) -> Live {
        let block = if zeroed {
            alloc.allocate_zeroed(layout)
        } else {
            alloc.allocate(layout)
        }
        .expect("no backing failure is scheduled here");
        assert!(block.len() >= layout.size());
        let ptr = block.cast::<u8>();
        assert_eq!(
            ptr.as_ptr() as usize % layout.align(),
            0,
            "misaligned block"
        );
        let id = self.next_id;
        self.next_id += 1;
        // SAFETY: a fresh block of `layout.size()` bytes, ours.
        unsafe {
            if zeroed {
                check_zero(ptr.as_ptr(), 0..layout.size(), "allocate_zeroed");
            }
            fill(ptr.as_ptr(), id, 0..layout.size());
        }
        let live = Live { ptr, layout, id };
        self.live.push(live);
        self.check_disjoint();
        live
    }

    fn free<A: Allocator>(&mut self, alloc: &A, block: Live) {
        let position = self
            .live
            .iter()
            .position(|l| l.id == block.id)
            .expect("live");
        let block = self.live.swap_remove(position);
        // SAFETY: a live block of this allocator, with its layout.
        unsafe {
            check(
                block.ptr.as_ptr(),
                block.id,
                0..block.layout.size(),
                "before free",
            );
            alloc.deallocate(block.ptr, block.layout);
        }
    }

    fn resize<A: Allocator>(&mut self, alloc: &A, block: Live, new: Layout) -> Live {
        let position = self
            .live
            .iter()
            .position(|l| l.id == block.id)
            .expect("live");
        let old = self.live[position];
        // SAFETY: a live block of this allocator allocated for `old.layout`.
        let moved = unsafe {
            check(
                old.ptr.as_ptr(),
                old.id,
                0..old.layout.size(),
                "before resize",
            );
            if new.size() >= old.layout.size() {
                alloc.grow(old.ptr, old.layout, new)
            } else {
                alloc.shrink(old.ptr, old.layout, new)
            }
        }
        .expect("no backing failure is scheduled here");
        assert!(moved.len() >= new.size());
        let ptr = moved.cast::<u8>();
        assert_eq!(ptr.as_ptr() as usize % new.align(), 0, "misaligned resize");
        let kept = old.layout.size().min(new.size());
        // SAFETY: the resized block, `new.size()` bytes, ours.
        unsafe {
            check(ptr.as_ptr(), old.id, 0..kept, "after resize");
            fill(ptr.as_ptr(), old.id, kept..new.size());
        }
        self.live[position] = Live {
            ptr,
            layout: new,
            id: old.id,
        };
        self.check_disjoint();
        self.live[position]
    }

    fn check_disjoint(&self) {
        assert_disjoint(
            self.live
                .iter()
                .map(|l| (l.ptr.as_ptr() as usize, l.layout.size())),
            "plan_ops",
        );
    }
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

fuzz_target!(|input: Input| {
    let ledgers = Ledgers::new(Vec::new());
    let palette = &input.palette;

    // Record.
    let recorder = Recorder::new_in(ledgers.backing(0));
    let mut blocks = Blocks::new();
    let mut script: Vec<Event> = Vec::new();
    // Script block number -> live block; and each recorded allocation's
    // lifetime on the recorder's clock (start, end), by recording index.
    let mut script_live: Vec<(usize, Live)> = Vec::new();
    let mut script_blocks = 0;
    let mut clock = 0u64;
    let mut lifetimes: Vec<(Layout, u64, Option<u64>)> = Vec::new();
    let mut recording_index: Vec<(usize, Option<usize>)> = Vec::new(); // script block -> index
    let tick_alloc =
        |layout: Layout, clock: &mut u64, lifetimes: &mut Vec<(Layout, u64, Option<u64>)>| {
            if layout.size() == 0 {
                return None;
            }
            lifetimes.push((layout, *clock, None));
            *clock += 1;
            Some(lifetimes.len() - 1)
        };
    for op in input.recording.iter().take(128) {
        match *op {
            RecOp::Alloc {
                size,
                align_log2,
                zeroed,
            } => {
                let l = layout(size.bytes(palette), align_from(align_log2));
                let live = blocks.allocate(&recorder, l, zeroed);
                let index = tick_alloc(l, &mut clock, &mut lifetimes);
                recording_index.push((script_blocks, index));
                script.push(Event::Alloc {
                    block: script_blocks,
                    layout: l,
                    zeroed,
                });
                script_live.push((script_blocks, live));
                script_blocks += 1;
            }
            RecOp::Free { index } if !script_live.is_empty() => {
                let (block, live) = script_live.swap_remove(index as usize % script_live.len());
                blocks.free(&recorder, live);
                if live.layout.size() > 0 {
                    let i = recording_index
                        .iter()
                        .rev()
                        .find(|(b, _)| *b == block)
                        .unwrap()
                        .1
                        .unwrap();
                    lifetimes[i].2 = Some(clock);
                    clock += 1;
                }
                script.push(Event::Free { block });
            }
            RecOp::Grow { index, by } | RecOp::Shrink { index, to: by }
                if !script_live.is_empty() =>
            {
                let at = index as usize % script_live.len();
                let (block, live) = script_live[at];
                let old = live.layout;
                let new_size = match op {
                    RecOp::Grow { .. } => (old.size() + by.bytes(palette))
                        .min(u16::MAX as usize)
                        .max(old.size()),
                    _ => by.bytes(palette) % (old.size() + 1),
                };
                let new = layout(new_size, old.align());
                let moved = blocks.resize(&recorder, live, new);
                // The default resize: a new block, then a free of the old.
                let new_index = tick_alloc(new, &mut clock, &mut lifetimes);
                if old.size() > 0 {
                    let i = recording_index
                        .iter()
                        .rev()
                        .find(|(b, _)| *b == block)
                        .unwrap()
                        .1
                        .unwrap();
                    lifetimes[i].2 = Some(clock);
                    clock += 1;
                }
                recording_index.push((block, new_index));
                script_live[at] = (block, moved);
                script.push(Event::Resize { block, layout: new });
            }
            _ => {}
        }
        assert_eq!(
            ledgers.live_bytes(0),
            blocks.live.iter().map(|l| l.layout.size()).sum::<usize>(),
            "the recorder forwards every block, and only those"
        );
    }
    let mut kept_live = Vec::new();
    if input.leave_live {
        kept_live = std::mem::take(&mut script_live);
    } else {
        for (block, live) in script_live.drain(..) {
            blocks.free(&recorder, live);
            if live.layout.size() > 0 {
                let i = recording_index
                    .iter()
                    .rev()
                    .find(|(b, _)| *b == block)
                    .unwrap()
                    .1
                    .unwrap();
                lifetimes[i].2 = Some(clock);
                clock += 1;
            }
            script.push(Event::Free { block });
        }
    }

    // Plan, and check the plan against the lifetimes seen.
    let plan = recorder.plan();
    assert_eq!(plan.allocations(), lifetimes.len());
    assert_eq!(recorder.allocations(), lifetimes.len());
    let mut peak = 0usize;
    let mut planned = 0;
    for (i, &(l, start, end)) in lifetimes.iter().enumerate() {
        let slot = plan.slot(i);
        assert_eq!(
            slot.is_some(),
            end.is_some(),
            "slot {i}: planned iff freed in the recording"
        );
        let Some(slot) = slot else { continue };
        planned += 1;
        assert_eq!(slot.offset % slot.align, 0);
        assert!(slot.align >= l.align().max(64));
        assert!(slot.size >= l.size());
        assert!(slot.offset + slot.size <= plan.arena_bytes());
        let end = end.unwrap();
        let live_at_start: usize = lifetimes
            .iter()
            .enumerate()
            .filter(|&(j, &(_, s, e))| plan.slot(j).is_some() && s <= start && e.unwrap() > start)
            .map(|(j, _)| plan.slot(j).unwrap().size)
            .sum();
        peak = peak.max(live_at_start);
        for (j, &(_, s2, e2)) in lifetimes.iter().enumerate().skip(i + 1) {
            let (Some(other), Some(e2)) = (plan.slot(j), e2) else {
                continue;
            };
            if start < e2 && s2 < end {
                assert!(
                    slot.offset + slot.size <= other.offset
                        || other.offset + other.size <= slot.offset,
                    "slots {i} and {j} live together and overlap: {slot:?} {other:?}"
                );
            }
        }
    }
    assert_eq!(plan.planned_blocks(), planned);
    assert_eq!(plan.peak_live_bytes(), peak);
    assert!(plan.arena_bytes() >= plan.peak_live_bytes());
    for (_, live) in kept_live {
        blocks.free(&recorder, live);
    }
    assert!(blocks.live.is_empty());
    drop(recorder);
    assert_eq!(
        ledgers.total_live_blocks(),
        0,
        "the recorder's backing still holds blocks"
    );

    // Serve passes.
    if input.arena_fails {
        ledgers.set_schedule(vec![1]);
    }
    let planned = Planned::new_in(&plan, ledgers.backing(1));
    ledgers.set_schedule(Vec::new());
    let arena = ledgers.blocks_of(1).first().copied();
    let has_arena = arena.is_some();
    assert_eq!(has_arena, plan.arena_bytes() > 0 && !input.arena_fails);
    if let Some((_, l)) = arena {
        assert_eq!(l.size(), plan.arena_bytes());
    }
    let in_arena = |live: &Live| {
        arena.is_some_and(|(a, l)| {
            let p = live.ptr.as_ptr() as usize;
            live.layout.size() > 0 && p >= a && p < a + l.size()
        })
    };
    let mut blocks = Blocks::new();
    // Blocks carried over into the next pass (late frees, outside blocks).
    let mut carried: Vec<Live> = Vec::new();
    let check_stats = |blocks: &Blocks| {
        let s = planned.stats();
        assert_eq!(
            ledgers.live_bytes(1),
            s.bytes_reserved,
            "backing != bytes_reserved: {s:?}"
        );
        assert_eq!(
            s.blocks_in_use,
            blocks.live.iter().filter(|l| l.layout.size() > 0).count()
        );
        assert_eq!(
            s.bytes_in_use,
            blocks.live.iter().map(|l| l.layout.size()).sum::<usize>()
        );
    };
    for spec in input.passes.iter().take(6) {
        let mut outside = Vec::new();
        for size in spec.outside_before.iter().take(4) {
            let live = blocks.allocate(&planned, layout(size.bytes(palette), 64), false);
            assert!(
                !in_arena(&live),
                "an allocation outside a pass came from the arena"
            );
            outside.push(live);
        }
        let undeviated = spec.deviations.iter().all(|d| matches!(d, Deviation::None))
            && !blocks.live.iter().any(in_arena);
        let before = planned.stats();
        let mut guards = vec![planned.pass()];
        let mut live: Vec<(usize, Live)> = Vec::new();
        let mut end_of_pass: Vec<Live> = Vec::new();
        let mut next_pass: Vec<Live> = Vec::new();
        for (step, event) in script.iter().enumerate() {
            let deviation = spec
                .deviations
                .get(step)
                .copied()
                .unwrap_or(Deviation::None);
            match deviation {
                Deviation::Extra { size, late } => {
                    let extra = blocks.allocate(&planned, layout(size.bytes(palette), 64), false);
                    if late {
                        next_pass.push(extra)
                    } else {
                        end_of_pass.push(extra)
                    }
                }
                Deviation::RestartPass => guards.push(planned.pass()),
                Deviation::EarlyFree(i) if !live.is_empty() => {
                    let (_, block) = live.swap_remove(i as usize % live.len());
                    blocks.free(&planned, block);
                }
                _ => {}
            }
            match *event {
                Event::Alloc {
                    block,
                    layout: l,
                    zeroed,
                } => {
                    let l = match deviation {
                        Deviation::Skip => continue,
                        Deviation::Bigger(by) => layout(l.size() + by as usize, l.align()),
                        Deviation::MoreAligned(log2) => {
                            layout(l.size(), l.align().max(align_from(log2)))
                        }
                        _ => l,
                    };
                    let new = blocks.allocate(&planned, l, zeroed);
                    live.push((block, new));
                }
                Event::Free { block } => {
                    let Some(at) = live.iter().position(|(b, _)| *b == block) else {
                        continue;
                    };
                    let (_, old) = live.swap_remove(at);
                    match deviation {
                        Deviation::LateFree => next_pass.push(old),
                        Deviation::Skip => end_of_pass.push(old),
                        _ => blocks.free(&planned, old),
                    }
                }
                Event::Resize { block, layout: l } => {
                    let Some(at) = live.iter().position(|(b, _)| *b == block) else {
                        continue;
                    };
                    let old = live[at].1;
                    let size = match deviation {
                        Deviation::Bigger(by) => l.size() + by as usize,
                        _ => l.size(),
                    };
                    let moved = blocks.resize(&planned, old, layout(size, old.layout.align()));
                    live[at].1 = moved;
                }
            }
            check_stats(&blocks);
        }
        if undeviated && has_arena {
            let after = planned.stats();
            assert_eq!(
                after.hits - before.hits,
                plan.planned_blocks() as u64,
                "an undeviated pass must be served from the arena: {after:?}"
            );
            assert_eq!(
                after.misses - before.misses,
                (plan.allocations() - plan.planned_blocks()) as u64,
            );
        }
        // Blocks left by the script (not freed in the recording), extras.
        for (_, block) in live.drain(..) {
            blocks.free(&planned, block);
        }
        for block in end_of_pass.drain(..) {
            blocks.free(&planned, block);
        }
        for block in carried.drain(..) {
            blocks.free(&planned, block);
        }
        drop(guards);
        for size in spec.outside_after.iter().take(4) {
            let block = blocks.allocate(&planned, layout(size.bytes(palette), 64), false);
            assert!(
                !in_arena(&block),
                "an allocation after a pass came from the arena"
            );
            next_pass.push(block);
        }
        for block in outside {
            blocks.free(&planned, block);
        }
        carried = next_pass;
        check_stats(&blocks);
    }
    for block in carried {
        blocks.free(&planned, block);
    }
    assert!(blocks.live.is_empty());
    check_stats(&blocks);
    drop(planned);
    assert_eq!(
        ledgers.total_live_blocks(),
        0,
        "the backing still holds blocks"
    );
});

//! Property tests of `caching_allocator::plan`: a random pass (allocations of
//! 1..20000 bytes aligned to 1, 8, 64, 128 or 4096, freed in random order) is
//! recorded through a `Recorder`, its plan is compared slot by slot with a
//! reference planner, and passes are replayed through a `Planned` arena, each
//! with random deviations: bigger requests, other alignments, zeroed
//! requests, extra allocations, frees moved past the pass's end or into the
//! next pass, allocations outside any pass.
//!
//! A model tracks the pass index and the live arena ranges on its own and so
//! predicts, for every allocation, whether it gets its slot (its address,
//! then) or comes from the backing, and every counter. After every step: the
//! counters equal the model's, the backing holds the arena and exactly the
//! live misses, no two live blocks overlap (`Watch`), every block is aligned.
//! Every block is stamped with a pattern when allocated and checked when
//! freed (all live blocks at every pass's end). A last pass without
//! deviations, once nothing is live, must be served entirely from the arena.
//! At the end, and after the handles are dropped, the backings hold nothing.
//!
//! `PROPTEST_CASES` sets the number of cases.

use std::collections::BTreeMap;

use crate::fixture::{Counting, assert_ledger_agrees, assert_stats_eq, proptest_config};
use crate::plan_support::{
    Block, Life, Op, Watch, assert_plan_matches, give, layout, lifetimes, planned_over, take,
};
use allocator_api2::alloc::Allocator;
use caching_allocator::Stats;
use caching_allocator::plan::{Pass, Plan, Planned, Recorder};
use proptest::prelude::*;

const ALIGNS: [usize; 5] = [1, 8, 64, 128, 4096];

/// A random choice among `len` things (shrinks towards the first).
type Pick = u16;

fn pick(choice: Pick, len: usize) -> usize {
    usize::from(choice) % len
}

/// A recorded pass: random allocations and frees, everything freed by the
/// end (the rest in allocation order).
fn recording() -> impl Strategy<Value = Vec<Op>> {
    let size = prop_oneof![1..200usize, 1..20_000usize];
    prop::collection::vec((any::<bool>(), size, 0..ALIGNS.len(), any::<Pick>()), 1..32).prop_map(
        |steps| {
            let mut ops = Vec::new();
            let mut live = Vec::new();
            let mut allocated = 0;
            for (free, size, align, which) in steps {
                if free && !live.is_empty() {
                    ops.push(Op::Free(live.remove(pick(which, live.len()))));
                } else {
                    ops.push(Op::Alloc(size, ALIGNS[align]));
                    live.push(allocated);
                    allocated += 1;
                }
            }
            ops.extend(live.into_iter().map(Op::Free));
            ops
        },
    )
}

/// One change to a replayed pass.
#[derive(Clone, Debug)]
enum Deviation {
    /// The `at`-th allocation asks for `extra` more bytes.
    Bigger { at: Pick, extra: usize },
    /// The `at`-th allocation asks for another alignment.
    Align { at: Pick, align: usize },
    /// The `at`-th allocation asks for zeroed memory.
    Zeroed { at: Pick },
    /// An extra allocation before the `at`-th step, freed `lasts` steps
    /// later (or after the pass, if that is past its end).
    Extra {
        at: Pick,
        size: usize,
        align: usize,
        lasts: usize,
    },
    /// The free of the `at`-th allocation moves after the pass's end, or
    /// into the next pass (at its `into`-th step).
    Late {
        at: Pick,
        next_pass: bool,
        into: Pick,
    },
    /// An allocation before the pass starts, freed in the pass (at its
    /// `free_at`-th step) or after it.
    Outside {
        size: usize,
        align: usize,
        in_pass: bool,
        free_at: Pick,
    },
}

fn deviation() -> impl Strategy<Value = Deviation> {
    let align = 0..ALIGNS.len();
    prop_oneof![
        (any::<Pick>(), prop_oneof![1..64usize, 1..5000usize])
            .prop_map(|(at, extra)| Deviation::Bigger { at, extra }),
        (any::<Pick>(), align.clone()).prop_map(|(at, a)| Deviation::Align {
            at,
            align: ALIGNS[a]
        }),
        any::<Pick>().prop_map(|at| Deviation::Zeroed { at }),
        (any::<Pick>(), 1..20_000usize, align.clone(), 0..12usize).prop_map(
            |(at, size, a, lasts)| Deviation::Extra {
                at,
                size,
                align: ALIGNS[a],
                lasts
            }
        ),
        (any::<Pick>(), any::<bool>(), any::<Pick>()).prop_map(|(at, next_pass, into)| {
            Deviation::Late {
                at,
                next_pass,
                into,
            }
        }),
        (1..20_000usize, align, any::<bool>(), any::<Pick>()).prop_map(
            |(size, a, in_pass, free_at)| Deviation::Outside {
                size,
                align: ALIGNS[a],
                in_pass,
                free_at
            }
        ),
    ]
}

/// A step of a replay. Keys name blocks across the whole replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Alloc {
        key: usize,
        size: usize,
        align: usize,
        zeroed: bool,
    },
    Free {
        key: usize,
    },
    Begin,
    End,
}

/// Builds the replay: each pass is the recording with its deviations
/// applied, then one pass without any.
fn replay_actions(ops: &[Op], passes: &[Vec<Deviation>]) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut next_key = 0;
    let mut carried: Vec<(usize, Pick)> = Vec::new();
    let clean = Vec::new();
    for (number, deviations) in passes.iter().chain([&clean]).enumerate() {
        // The pass as recorded.
        let base = next_key;
        let mut body: Vec<Action> = Vec::new();
        let mut allocs = 0;
        for op in ops {
            body.push(match *op {
                Op::Alloc(size, align) => {
                    allocs += 1;
                    Action::Alloc {
                        key: base + allocs - 1,
                        size,
                        align,
                        zeroed: false,
                    }
                }
                Op::Free(index) => Action::Free { key: base + index },
            });
        }
        next_key += allocs;
        let mut before = Vec::new();
        // Frees carried over from the last pass, at random steps (before
        // the clean pass, which must start with nothing live).
        let is_clean = number == passes.len();
        for (key, into) in carried.drain(..) {
            if is_clean {
                before.push(Action::Free { key });
            } else {
                let at = pick(into, body.len() + 1);
                body.insert(at, Action::Free { key });
            }
        }
        let mut after = Vec::new();
        for deviation in deviations {
            let alloc_positions: Vec<usize> = (0..body.len())
                .filter(|&i| matches!(body[i], Action::Alloc { .. }))
                .collect();
            match *deviation {
                Deviation::Bigger { at, extra } => {
                    if let Action::Alloc { size, .. } =
                        &mut body[alloc_positions[pick(at, alloc_positions.len())]]
                    {
                        *size += extra;
                    }
                }
                Deviation::Align { at, align: new } => {
                    if let Action::Alloc { align, .. } =
                        &mut body[alloc_positions[pick(at, alloc_positions.len())]]
                    {
                        *align = new;
                    }
                }
                Deviation::Zeroed { at } => {
                    if let Action::Alloc { zeroed, .. } =
                        &mut body[alloc_positions[pick(at, alloc_positions.len())]]
                    {
                        *zeroed = true;
                    }
                }
                Deviation::Extra {
                    at,
                    size,
                    align,
                    lasts,
                } => {
                    let key = next_key;
                    next_key += 1;
                    let at = pick(at, body.len() + 1);
                    body.insert(
                        at,
                        Action::Alloc {
                            key,
                            size,
                            align,
                            zeroed: false,
                        },
                    );
                    let free = Action::Free { key };
                    if at + 1 + lasts <= body.len() {
                        body.insert(at + 1 + lasts, free);
                    } else {
                        after.push(free);
                    }
                }
                Deviation::Late {
                    at,
                    next_pass,
                    into,
                } => {
                    let position = alloc_positions[pick(at, alloc_positions.len())];
                    let Action::Alloc { key, .. } = body[position] else {
                        unreachable!()
                    };
                    // Only a free still in the body can move (it may have
                    // moved already).
                    if let Some(free) = body.iter().position(|a| *a == Action::Free { key }) {
                        body.remove(free);
                        if next_pass {
                            carried.push((key, into));
                        } else {
                            after.push(Action::Free { key });
                        }
                    }
                }
                Deviation::Outside {
                    size,
                    align,
                    in_pass,
                    free_at,
                } => {
                    let key = next_key;
                    next_key += 1;
                    before.push(Action::Alloc {
                        key,
                        size,
                        align,
                        zeroed: false,
                    });
                    if in_pass {
                        body.insert(pick(free_at, body.len() + 1), Action::Free { key });
                    } else {
                        after.push(Action::Free { key });
                    }
                }
            }
        }
        actions.extend(before);
        actions.push(Action::Begin);
        actions.extend(body);
        actions.push(Action::End);
        actions.extend(after);
    }
    assert!(carried.is_empty());
    actions
}

/// A live block of the replay and where the model expects it.
struct Live {
    block: Block,
    /// Arena offset if it got its slot.
    offset: Option<usize>,
}

/// The replay and its model.
struct Harness {
    plan: Plan,
    /// The recording's blocks, by allocation index.
    lives: Vec<Life>,
    backing: Counting,
    planned: Watch<Planned<Counting>>,
    base: usize,
    pass: Option<Pass<Counting>>,
    // The model.
    in_pass: bool,
    next: usize,
    /// Slots used this pass, and the per-size cursors of the re-sync.
    used: std::collections::BTreeSet<usize>,
    cursors: BTreeMap<usize, usize>,
    /// Where the sequence goes on if the next request confirms the last
    /// re-synchronisation that was refused.
    resume: Option<usize>,
    /// The slot size of the last re-synchronisation, until a request in
    /// order of another size confirms it.
    unconfirmed: Option<usize>,
    live: BTreeMap<usize, Live>,
    expected: Stats,
}

impl Harness {
    fn new(plan: Plan, lives: Vec<Life>) -> Self {
        let (planned, backing, (base, _)) = planned_over(&plan);
        let arena = plan.arena_bytes();
        // The counters the model predicts (every other one stays 0: nothing
        // is cached, released, evicted or retried, nothing lost to rounding).
        let mut expected = Stats::default();
        expected.bytes_reserved = arena;
        expected.peak_bytes_reserved = arena;
        expected.backing_allocs = 1;
        let harness = Self {
            plan,
            lives,
            backing,
            planned,
            base,
            pass: None,
            in_pass: false,
            next: 0,
            used: Default::default(),
            cursors: BTreeMap::new(),
            resume: None,
            unconfirmed: None,
            live: BTreeMap::new(),
            expected,
        };
        harness.check();
        harness
    }

    fn in_arena(&self, addr: usize) -> bool {
        addr >= self.base && addr < self.base + self.plan.arena_bytes()
    }

    /// Whether no slot of an allocation recorded after `index` shares
    /// memory with `index`'s.
    fn alone(&self, index: usize) -> bool {
        let Some(slot) = self.plan.slot(index) else {
            return false;
        };
        (index + 1..self.plan.allocations())
            .filter_map(|later| self.plan.slot(later))
            .all(|other| {
                other.offset + other.size <= slot.offset || slot.offset + slot.size <= other.offset
            })
    }

    /// Whether every block recorded from `next` up to `index` was freed
    /// before `index` was allocated.
    fn skips_only_finished_blocks(&self, next: usize, index: usize) -> bool {
        let start = self.lives[index].start;
        self.lives[next..index]
            .iter()
            .all(|life| life.end.is_some_and(|end| end < start))
    }

    /// The model: the slot offset this request gets, if it gets one.
    fn predict(&mut self, size: usize, align: usize) -> Option<usize> {
        if !self.in_pass {
            return None;
        }
        let len = size.next_multiple_of(64);
        let usable = |this: &Self, index: usize, exact: bool| {
            let slot = this.plan.slot(index)?;
            let (start, end) = (slot.offset, slot.offset + size);
            let fits = if exact {
                slot.size == len
            } else {
                size <= slot.size && slot.size / 2 <= len
            };
            let free = this.live.values().all(|live| {
                live.offset
                    .is_none_or(|o| o + live.block.layout.size() <= start || end <= o)
            });
            (fits && align <= slot.align && !this.used.contains(&index) && free).then_some(index)
        };
        let take = |this: &mut Self, index: usize| {
            this.used.insert(index);
            this.plan.slot(index).map(|slot| slot.offset)
        };
        let next = self.next;
        // A recorded allocation with no slot: this one takes its place.
        if next < self.plan.allocations() && self.plan.slot(next).is_none() {
            self.next += 1;
            return None;
        }
        // In order: `unconfirmed` stays only if this slot is of its size.
        if let Some(index) = usable(self, next, true) {
            let size = self.plan.slot(index).unwrap().size;
            self.unconfirmed = self.unconfirmed.filter(|&s| s == size);
            self.resume = None;
            self.next = index + 1;
            return take(self, index);
        }
        // Where a refused re-synchronisation said the sequence would go on.
        if let Some(index) = self.resume.and_then(|resume| usable(self, resume, true)) {
            self.unconfirmed = Some(len);
            self.resume = None;
            self.next = index + 1;
            return take(self, index);
        }
        // The next slot if the request fits it and is at least half of it.
        if let Some(index) = usable(self, next, false) {
            self.resume = None;
            self.next = index + 1;
            return take(self, index);
        }
        // The first slots of this size from the size's cursor (8 tried):
        // the first of them unused at or after `next` is taken if it is
        // usable, the request is not `next`'s (whose slot is covered) and
        // the recording's blocks from `next` to it were all freed by then or
        // the last re-synchronisation is unconfirmed; else the first usable
        // one no later slot shares memory with, without moving on.
        let same: Vec<usize> = (0..self.plan.allocations())
            .filter(|&i| self.plan.slot(i).is_some_and(|slot| slot.size == len))
            .collect();
        let mut cursor = self.cursors.get(&len).copied().unwrap_or(0);
        while cursor < same.len() && self.used.contains(&same[cursor]) {
            cursor += 1;
        }
        self.cursors.insert(len, cursor);
        let tried = &same[cursor.min(same.len())..same.len().min(cursor + 8)];
        let ahead = tried
            .iter()
            .copied()
            .find(|&i| i >= next && !self.used.contains(&i));
        let alone = tried
            .iter()
            .copied()
            .find(|&i| self.alone(i) && usable(self, i, true).is_some());
        let owns_next = self
            .plan
            .slot(next)
            .is_some_and(|slot| slot.size == len && align <= slot.align);
        if let Some(index) = ahead
            && !owns_next
            && (self.unconfirmed.is_some() || self.skips_only_finished_blocks(next, index))
            && usable(self, index, true).is_some()
        {
            self.unconfirmed = Some(len);
            self.resume = None;
            self.next = index + 1;
            return take(self, index);
        }
        if !owns_next && let Some(index) = ahead {
            self.resume = Some(index + 1);
        }
        if self
            .plan
            .slot(next)
            .is_none_or(|slot| slot.size / 2 <= len && len <= slot.size * 2)
        {
            self.next = next + 1;
        }
        take(self, alone?)
    }

    fn step(&mut self, action: Action) {
        match action {
            Action::Begin => {
                self.pass = Some(self.planned.inner().pass());
                self.in_pass = true;
                self.next = 0;
                self.used.clear();
                self.cursors.clear();
                self.resume = None;
                self.unconfirmed = None;
            }
            Action::End => {
                self.pass = None;
                self.in_pass = false;
                for live in self.live.values() {
                    live.block.check();
                }
            }
            Action::Alloc {
                key,
                size,
                align,
                zeroed,
            } => self.allocate(key, size, align, zeroed),
            Action::Free { key } => self.free(key),
        }
        self.check();
    }

    fn allocate(&mut self, key: usize, size: usize, align: usize, zeroed: bool) {
        let expected = self.predict(size, align);
        let layout = layout(size, align);
        let block = if zeroed {
            let ptr = self.planned.allocate_zeroed(layout).unwrap().cast::<u8>();
            // SAFETY: a live block of `size` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), size) };
            assert!(bytes.iter().all(|&b| b == 0), "a zeroed block is not");
            let block = Block {
                ptr,
                layout,
                tag: key as u8,
            };
            block.fill();
            block
        } else {
            take(&self.planned, size, align, key as u8)
        };
        let addr = block.addr();
        assert_eq!(addr % align, 0);
        let in_arena = self.in_arena(addr);
        let e = &mut self.expected;
        match expected {
            Some(offset) => {
                assert_eq!(
                    addr,
                    self.base + offset,
                    "block {key} ({layout:?}) should have its slot"
                );
                e.hits += 1;
                e.bytes_hit += size as u64;
            }
            None => {
                assert!(
                    !in_arena,
                    "block {key} ({layout:?}) should come from the backing"
                );
                assert_eq!(self.backing.layout_of(addr), Some(layout));
                e.misses += 1;
                e.bytes_missed += size as u64;
                e.backing_allocs += 1;
                e.bytes_reserved += size;
                e.peak_bytes_reserved = e.peak_bytes_reserved.max(e.bytes_reserved);
            }
        }
        e.bytes_in_use += size;
        e.blocks_in_use += 1;
        e.peak_bytes_in_use = e.peak_bytes_in_use.max(e.bytes_in_use);
        let previous = self.live.insert(
            key,
            Live {
                block,
                offset: expected,
            },
        );
        assert!(previous.is_none());
    }

    fn free(&mut self, key: usize) {
        let live = self.live.remove(&key).unwrap();
        let size = live.block.layout.size();
        give(&self.planned, live.block);
        let e = &mut self.expected;
        e.frees += 1;
        e.bytes_in_use -= size;
        e.blocks_in_use -= 1;
        if live.offset.is_none() {
            e.backing_frees += 1;
            e.bytes_reserved -= size;
        }
    }

    fn check(&self) {
        let stats = self.planned.inner().stats();
        assert_stats_eq(&stats, &self.expected);
        // The backing holds the arena and the live misses, nothing else.
        let misses = self.live.values().filter(|l| l.offset.is_none()).count();
        assert_eq!(self.backing.live_blocks(), 1 + misses);
        assert_ledger_agrees(&stats, &self.backing);
        assert_eq!(self.planned.live().len(), self.live.len());
    }
}

/// Records `ops`, checks the plan, replays `passes` (and a clean one).
fn run(ops: &[Op], passes: &[Vec<Deviation>]) {
    let recording_backing = Counting::new();
    let recorder = Watch::new(Recorder::new_in(recording_backing.clone()));
    let mut blocks: Vec<Option<Block>> = Vec::new();
    for op in ops {
        match *op {
            Op::Alloc(size, align) => {
                blocks.push(Some(take(&recorder, size, align, blocks.len() as u8)));
            }
            Op::Free(index) => give(&recorder, blocks[index].take().unwrap()),
        }
    }
    let plan = recorder.inner().plan();
    assert_plan_matches(&plan, &lifetimes(ops));
    assert_eq!(plan.peak_live_bytes(), recorder.peak_rounded_bytes());
    assert_eq!(plan.planned_blocks(), plan.allocations());
    drop(recorder);
    assert_eq!(recording_backing.live_blocks(), 0);

    let actions = replay_actions(ops, passes);
    let mut harness = Harness::new(plan, lifetimes(ops));
    let clean = actions.iter().rposition(|a| *a == Action::Begin).unwrap();
    for (i, &action) in actions.iter().enumerate() {
        if i == clean {
            // Nothing is live before the clean pass...
            assert!(harness.live.is_empty());
            let before = harness.planned.inner().stats();
            for &action in &actions[i..] {
                harness.step(action);
            }
            // ...so it goes exactly as recorded.
            let after = harness.planned.inner().stats();
            assert_eq!(after.hits - before.hits, harness.plan.allocations() as u64);
            assert_eq!(after.misses, before.misses);
            break;
        }
        harness.step(action);
    }
    assert!(harness.live.is_empty());
    let Harness {
        backing, planned, ..
    } = harness;
    let stats = planned.inner().stats();
    assert_eq!((stats.bytes_in_use, stats.blocks_in_use), (0, 0));
    assert_eq!(backing.live_blocks(), 1);
    drop(planned);
    backing.assert_all_returned();
}

proptest! {
    #![proptest_config(proptest_config("proptest-regressions/plan_properties.txt", 512))]

    #[test]
    fn planned_passes_match_the_model(
        ops in recording(),
        passes in prop::collection::vec(prop::collection::vec(deviation(), 0..5), 1..4),
    ) {
        run(&ops, &passes);
    }

    #[test]
    fn passes_as_recorded_are_all_hits(ops in recording(), passes in 1..4usize) {
        run(&ops, &vec![Vec::new(); passes]);
    }
}

#[test]
fn a_known_deviating_replay() {
    // Two blocks alive together, then one reusing the first's memory.
    let ops = [
        Op::Alloc(5000, 8),
        Op::Alloc(300, 4096),
        Op::Free(0),
        Op::Alloc(4000, 64),
        Op::Free(1),
        Op::Free(2),
    ];
    run(
        &ops,
        &[
            vec![
                Deviation::Late {
                    at: 0,
                    next_pass: true,
                    into: 2,
                },
                Deviation::Bigger { at: 2, extra: 100 },
            ],
            vec![Deviation::Outside {
                size: 10,
                align: 8,
                in_pass: true,
                free_at: 0,
            }],
        ],
    );
}

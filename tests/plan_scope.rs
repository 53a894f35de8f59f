//! `Recorder::enter` and `Planned::enter` under `ScopedGlobal`: a model
//! written with plain `Vec`s is recorded inside a recorder's scope, planned,
//! and its passes served from the arena inside the planned scope. This test
//! binary installs the global allocator.
//!
//! Tests run on parallel threads; scopes are per thread and every test has
//! its own recorder and arena, so their counters do not mix.

#[path = "all/fixture/mod.rs"]
mod fixture;

use caching_allocator::ScopedGlobal;
use caching_allocator::plan::{Plan, Planned, Recorder};
use fixture::Counting;

#[global_allocator]
static GLOBAL: ScopedGlobal = ScopedGlobal::new();

// 80 KB of f32: far above the 4 KiB minimum. Under Miri 4,000 (16 KB): every
// buffer of `forward` still above the minimum, `grown` still grows past its
// capacity and `shrunk` still shrinks (a deviating pass took 44 s of Miri's
// clock at 20,000).
const N: usize = if cfg!(miri) { 4_000 } else { 20_000 };

/// The address range of a slice.
fn span<T>(values: &[T]) -> (usize, usize) {
    let start = values.as_ptr() as usize;
    (start, start + std::mem::size_of_val(values))
}

/// One pass of a model written with plain `Vec`s: activations computed from
/// each other, a zeroed buffer (`vec![0; n]`), a `Vec` that grows (realloc)
/// and one that shrinks. Pushes the ranges of the big buffers alive at the
/// widest point onto `spans` (a small `Vec`, below the scope's minimum).
fn forward(input: &[f32], spans: &mut Vec<(usize, usize)>) -> f32 {
    let hidden: Vec<f32> = input.iter().map(|x| x * 2.0 + 1.0).collect();
    let mut gates = vec![0u8; 5000];
    assert!(gates.iter().all(|&g| g == 0), "a zeroed buffer is not");
    for (gate, h) in gates.iter_mut().zip(&hidden) {
        *gate = (*h as u32 % 251) as u8;
    }
    let mut grown: Vec<f32> = Vec::with_capacity(1024);
    grown.extend(hidden.iter().take(3000).map(|h| h - 1.0));
    spans.extend([span(&hidden), span(&gates), span(&grown)]);
    drop(hidden);
    let activated: Vec<f32> = grown
        .iter()
        .zip(gates.iter().cycle())
        .map(|(x, &g)| x.max(0.0) * f32::from(g))
        .collect();
    let mut shrunk = activated.clone();
    shrunk.truncate(1500);
    shrunk.shrink_to_fit();
    spans.extend([span(&activated), span(&shrunk), span(&gates), span(&grown)]);
    activated.iter().sum::<f32>() + shrunk.iter().sum::<f32>()
}

fn input() -> Vec<f32> {
    (0..N).map(|i| (i % 97) as f32 - 40.0).collect()
}

/// Asserts that the ranges pushed by one `forward` are disjoint (those alive
/// together: the first three, and the last four) and inside `arena`.
#[track_caller]
fn assert_spans(spans: &[(usize, usize)], arena: (usize, usize)) {
    assert_eq!(spans.len(), 7);
    for group in [&spans[..3], &spans[3..]] {
        for (i, a) in group.iter().enumerate() {
            assert!(
                a.0 >= arena.0 && a.1 <= arena.1,
                "{a:x?} outside the arena {arena:x?}"
            );
            for b in &group[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} and {b:x?} overlap");
            }
        }
    }
}

/// Records `forward` inside a recorder's scope.
fn record() -> (Plan, f32) {
    let input = input();
    let recorder = Recorder::new();
    let result = {
        let _scope = recorder.enter();
        forward(&input, &mut Vec::new())
    };
    (recorder.plan(), result)
}

/// A `Planned` over a `Counting` backing, and the arena's address range.
fn planned(plan: &Plan) -> (Planned<Counting>, Counting, (usize, usize)) {
    let backing = Counting::new();
    let planned = Planned::new_in(plan, backing.clone());
    let live = backing.live_layouts();
    assert_eq!(live.len(), 1);
    let (base, layout) = live[0];
    assert_eq!(layout.size(), plan.arena_bytes());
    (planned, backing, (base, base + layout.size()))
}

#[test]
fn plain_vecs_are_recorded_and_served_from_the_arena() {
    let (plan, recorded) = record();
    let expected = forward(&input(), &mut Vec::new());
    assert_eq!(recorded, expected);
    // hidden, gates, grown (and its move), activated, shrunk (and its move).
    assert_eq!(plan.allocations(), 7, "{plan:?}");
    assert_eq!(plan.planned_blocks(), plan.allocations());
    assert!(
        plan.arena_bytes() as f64 <= 1.02 * plan.peak_live_bytes() as f64,
        "{plan:?}"
    );

    let (planned, backing, arena) = planned(&plan);
    let input = input();
    const PASSES: u64 = 4;
    {
        let _scope = planned.enter();
        for _ in 0..PASSES {
            let _pass = planned.pass();
            let mut spans = Vec::new();
            assert_eq!(forward(&input, &mut spans), expected);
            assert_spans(&spans, arena);
        }
    }
    let stats = planned.stats();
    assert_eq!(stats.hits, PASSES * plan.allocations() as u64, "{stats:?}");
    assert_eq!(stats.misses, 0, "{stats:?}");
    assert_eq!((stats.bytes_in_use, stats.blocks_in_use), (0, 0));
    assert_eq!(stats.frees, stats.hits);
    assert_eq!(backing.allocs(), 1);
    drop(planned);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn a_pass_alone_skips_the_arena_and_the_scope_alone_is_enough() {
    let (plan, expected) = record();
    let (planned, backing, _) = planned(&plan);
    let input = input();
    // A pass without the scope: plain Vecs go to the system allocator.
    {
        let _pass = planned.pass();
        assert_eq!(forward(&input, &mut Vec::new()), expected);
    }
    assert_eq!(planned.stats().hits + planned.stats().misses, 0);
    // The scope alone: one guard starts a pass too, so every big buffer
    // comes from the plan.
    {
        let _scope = planned.enter();
        assert_eq!(forward(&input, &mut Vec::new()), expected);
        // Small allocations stay with the system allocator.
        let small: Vec<u8> = (0..100).collect();
        assert_eq!(small[99], 99);
    }
    let stats = planned.stats();
    assert_eq!(
        (stats.hits, stats.misses),
        (plan.allocations() as u64, 0),
        "{stats:?}"
    );
    let report = planned.last_pass();
    assert_eq!((report.deviations, report.first_deviation), (0, None));
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(backing.live_blocks(), 1, "the arena");
    assert_eq!(backing.allocs(), 1);
}

#[test]
fn frees_after_the_scope_go_to_the_owner() {
    // Recorded: a buffer allocated in the scope and freed after it; the
    // recorder still sees the free, so the block is planned.
    let recorder = Recorder::new();
    let kept = {
        let _scope = recorder.enter();
        vec![1u8; 10_000]
    };
    assert_eq!(recorder.plan().planned_blocks(), 0);
    drop(kept);
    let plan = recorder.plan();
    assert_eq!((plan.allocations(), plan.planned_blocks()), (1, 1));

    let (planned, backing, arena) = planned(&plan);
    let (kept, bigger) = {
        let _scope = planned.enter();
        let _pass = planned.pass();
        let kept = vec![2u8; 10_000];
        // An extra, bigger allocation: no slot, from the backing.
        let bigger = vec![3u8; 20_000];
        (kept, bigger)
    };
    assert_eq!(span(&kept).0, arena.0);
    assert!(backing.layout_of(bigger.as_ptr() as usize).is_some());
    let stats = planned.stats();
    assert_eq!((stats.hits, stats.misses, stats.blocks_in_use), (1, 1, 2));
    // Freed after the scope, on another thread: back to the arena's owner.
    std::thread::spawn(move || {
        assert!(bigger.iter().all(|&b| b == 3));
        drop(bigger);
    })
    .join()
    .unwrap();
    assert_eq!(backing.live_blocks(), 1);
    assert_eq!(planned.stats().backing_frees, 1);
    // The last handle goes while `kept` lives: the arena stays until it is
    // freed.
    drop(planned);
    assert_eq!(backing.live_blocks(), 1);
    assert!(kept.iter().all(|&b| b == 2));
    drop(kept);
    backing.assert_all_returned();
}

#[test]
fn a_deviating_pass_in_a_scope_never_overlaps() {
    let (plan, expected) = record();
    let (planned, backing, arena) = planned(&plan);
    let input = input();
    let _scope = planned.enter();
    // The first pass's output outlives the pass, covering its slot.
    let held = {
        let _pass = planned.pass();
        let held: Vec<f32> = input.iter().map(|x| x * 3.0).collect();
        assert_eq!(span(&held).0, arena.0 + plan.slot(0).unwrap().offset);
        held
    };
    {
        let _pass = planned.pass();
        let mut spans = Vec::new();
        assert_eq!(forward(&input, &mut spans), expected);
        let held = span(&held);
        for s in spans {
            assert!(s.1 <= held.0 || held.1 <= s.0, "{s:x?} overlaps {held:x?}");
        }
    }
    assert!(held.iter().zip(&input).all(|(h, x)| *h == x * 3.0));
    let stats = planned.stats();
    assert!(stats.misses >= 1, "{stats:?}");
    assert_eq!(stats.hits + stats.misses, 1 + plan.allocations() as u64);
    drop(held);
    let stats = planned.stats();
    assert_eq!((stats.bytes_in_use, stats.blocks_in_use), (0, 0));
    assert_eq!(backing.live_blocks(), 1);
    // With nothing held, the next pass is all hits again.
    {
        let _pass = planned.pass();
        assert_eq!(forward(&input, &mut Vec::new()), expected);
    }
    let after = planned.stats();
    assert_eq!(after.misses, stats.misses);
    assert_eq!(after.hits - stats.hits, plan.allocations() as u64);
}

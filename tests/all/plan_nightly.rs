//! `plan::Recorder` and `plan::Planned` with std's own collections
//! (`core::alloc::Allocator`, nightly), next to allocator-api2's in the same
//! pass.

use std::alloc::Global;

use crate::fixture::Counting;
use caching_allocator::plan::{Planned, Recorder};

/// A pass over std's `Vec` (with growth, a clone and a boxed slice) and
/// `Box`; its allocations depend only on sizes, its result on every byte.
fn model<A: core::alloc::Allocator + Clone>(alloc: &A, seed: u64) -> u64 {
    let mut input: Vec<u64, A> = Vec::with_capacity_in(500, alloc.clone());
    input.extend((0..500).map(|i| i ^ seed));
    let weights = Box::new_in([seed.wrapping_mul(3); 300], alloc.clone());
    let mut grown: Vec<u64, A> = Vec::new_in(alloc.clone());
    for &x in &input {
        grown.push(x.wrapping_add(weights[(x % 300) as usize]));
    }
    drop(input);
    let copy: Box<[u64], A> = grown.clone().into_boxed_slice();
    drop(weights);
    grown.truncate(10);
    grown.shrink_to_fit();
    copy.iter()
        .chain(grown.iter())
        .fold(0u64, |acc, &x| acc.wrapping_mul(31).wrapping_add(x))
}

#[test]
fn std_collections_are_recorded_and_served_from_the_arena() {
    let recording_backing = Counting::new();
    let recorder = Recorder::new_in(recording_backing.clone());
    let expected = model(&Global, 1);
    assert_eq!(model(&recorder, 1), expected);
    let plan = recorder.plan();
    assert!(plan.allocations() >= 8, "{plan:?}");
    assert_eq!(plan.planned_blocks(), plan.allocations());
    assert!(plan.arena_bytes() as f64 <= 1.02 * plan.peak_live_bytes() as f64);
    drop(recorder);
    assert_eq!(recording_backing.live_blocks(), 0);

    let backing = Counting::new();
    let planned = Planned::new_in(&plan, backing.clone());
    for seed in 10..14 {
        let _pass = planned.pass();
        assert_eq!(model(&planned, seed), model(&Global, seed));
    }
    let stats = planned.stats();
    assert_eq!(
        (stats.hits, stats.misses),
        (4 * plan.allocations() as u64, 0)
    );
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(backing.allocs(), 1);
    drop(planned);
    assert_eq!(backing.live_blocks(), 0);
}

/// A std `Vec`, an allocator-api2 `Vec` and a std `Box` over one allocator,
/// which implements both traits.
type Three<A> = (Vec<u32, A>, allocator_api2::vec::Vec<u32, A>, Box<u64, A>);

fn three<A>(alloc: &A) -> Three<A>
where
    A: core::alloc::Allocator + allocator_api2::alloc::Allocator + Clone,
{
    let mut std_vec: Vec<u32, A> = Vec::with_capacity_in(1000, alloc.clone());
    std_vec.extend(0..1000);
    let mut api2 = allocator_api2::vec::Vec::with_capacity_in(1000, alloc.clone());
    api2.extend(1000..2000);
    let std_box = Box::new_in(7u64, alloc.clone());
    (std_vec, api2, std_box)
}

#[test]
fn std_and_allocator_api2_collections_share_one_pass() {
    let recorder = Recorder::new();
    drop(three(&recorder));
    let plan = recorder.plan();
    assert_eq!(plan.allocations(), 3);
    let backing = Counting::new();
    let planned = Planned::new_in(&plan, backing.clone());
    let (base, _) = backing.live_layouts()[0];
    for _ in 0..2 {
        let _pass = planned.pass();
        let (std_vec, api2, std_box) = three(&planned);
        let addrs = [
            std_vec.as_ptr() as usize,
            api2.as_ptr() as usize,
            &*std_box as *const u64 as usize,
        ];
        for (i, addr) in addrs.into_iter().enumerate() {
            assert_eq!(addr, base + plan.slot(i).unwrap().offset);
        }
        assert!(std_vec.iter().copied().eq(0..1000));
        assert!(api2.iter().copied().eq(1000..2000));
        assert_eq!(*std_box, 7);
    }
    assert_eq!((planned.stats().hits, planned.stats().misses), (6, 0));

    // A deviating pass: the std Vec grows past its slot; the move goes to
    // the backing and shifts the rest, and nothing is overwritten.
    {
        let _pass = planned.pass();
        let (mut std_vec, api2, std_box) = three(&planned);
        std_vec.extend(1000..5000);
        assert!(std_vec.iter().copied().eq(0..5000));
        assert!(api2.iter().copied().eq(1000..2000));
        assert_eq!(*std_box, 7);
        assert!(backing.layout_of(std_vec.as_ptr() as usize).is_some());
    }
    let stats = planned.stats();
    assert_eq!((stats.hits, stats.misses), (9, 1));
    assert_eq!(stats.bytes_in_use, 0);
    drop(planned);
    assert_eq!(backing.live_blocks(), 0);
}

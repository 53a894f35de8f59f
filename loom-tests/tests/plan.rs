//! Loom models of one `plan::Planned` arena shared by threads running passes
//! at once. The arena's lock and `Arc` are loom's under `--cfg loom`, so
//! every interleaving of its critical sections is explored (up to
//! `LOOM_MAX_PREEMPTIONS`, default 2).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`.
#![cfg(loom)]

use caching_allocator::plan::{Plan, Planned, Recorder};
use std::collections::BTreeMap;
use std::ptr::NonNull;

use caching_allocator::{Allocator, Stats};
use core::alloc::Layout;
use loom::sync::{Arc, Mutex};
use loom::thread;
use loom_tests::{Counting, Hooked, model};

const SIZE: usize = 64;

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 8).unwrap()
}

/// The tiny plan: a chain of three 64-byte blocks (0 and 1 alive together,
/// then 1 and 2): slots at 0, 64 and 0; a 128-byte arena.
fn chain_plan() -> Plan {
    let recorder = Recorder::new();
    let a = recorder.allocate(layout()).unwrap().cast::<u8>();
    let b = recorder.allocate(layout()).unwrap().cast::<u8>();
    // SAFETY: allocated above with `layout()`.
    unsafe { recorder.deallocate(a, layout()) };
    let c = recorder.allocate(layout()).unwrap().cast::<u8>();
    // SAFETY: as above.
    unsafe {
        recorder.deallocate(b, layout());
        recorder.deallocate(c, layout());
    }
    let plan = recorder.plan();
    let offsets: Vec<usize> = (0..3).map(|i| plan.slot(i).unwrap().offset).collect();
    assert_eq!(offsets, [0, 64, 0]);
    assert_eq!(plan.arena_bytes(), 128);
    plan
}

/// Live blocks: address -> owner thread, to catch two owners of one byte.
type Owners = Arc<Mutex<BTreeMap<usize, u8>>>;

/// Takes a block, stamps it with `owner`, and registers it (asserting no
/// live block overlaps it).
fn take(planned: &Planned<Counting>, owners: &Owners, owner: u8) -> NonNull<u8> {
    let block = planned.allocate(layout()).unwrap().cast::<u8>();
    let addr = block.as_ptr() as usize;
    {
        let mut owners = owners.lock().unwrap();
        if let Some((&before, &other)) = owners.range(..=addr).next_back() {
            assert!(
                before + SIZE <= addr,
                "{addr:#x} overlaps {other}'s {before:#x}"
            );
        }
        if let Some((&after, &other)) = owners.range(addr..).next() {
            assert!(
                addr + SIZE <= after,
                "{addr:#x} overlaps {other}'s {after:#x}"
            );
        }
        owners.insert(addr, owner);
    }
    // SAFETY: a live block of SIZE bytes that this thread owns.
    unsafe { block.as_ptr().write_bytes(owner, SIZE) };
    block
}

/// Checks the stamp of a block and frees it.
fn give(planned: &Planned<Counting>, owners: &Owners, block: NonNull<u8>, owner: u8) {
    // SAFETY: a live block of SIZE bytes owned by this thread.
    let bytes = unsafe { std::slice::from_raw_parts(block.as_ptr(), SIZE) };
    assert!(
        bytes.iter().all(|&b| b == owner),
        "someone else wrote into {:#x}",
        block.as_ptr() as usize
    );
    let addr = block.as_ptr() as usize;
    assert_eq!(owners.lock().unwrap().remove(&addr), Some(owner));
    // SAFETY: allocated by `take` with `layout()`, not used again.
    unsafe { planned.deallocate(block, layout()) };
}

/// Relations every snapshot must satisfy, whatever is in flight.
fn assert_consistent(stats: &Stats, arena: usize) {
    assert_eq!(stats.bytes_in_use, stats.blocks_in_use * SIZE, "{stats:?}");
    assert_eq!(
        stats.hits + stats.misses - stats.frees,
        stats.blocks_in_use as u64,
        "{stats:?}"
    );
    // The arena and the misses not yet given back.
    let live_misses = stats.backing_allocs - 1 - stats.backing_frees;
    assert_eq!(stats.backing_allocs, stats.misses + 1, "{stats:?}");
    assert_eq!(
        stats.bytes_reserved,
        arena + live_misses as usize * SIZE,
        "{stats:?}"
    );
    assert!(live_misses <= stats.blocks_in_use as u64, "{stats:?}");
    assert!(stats.peak_bytes_in_use >= stats.bytes_in_use, "{stats:?}");
    assert_eq!(stats.failures, 0, "{stats:?}");
}

/// One pass of the recorded chain on this thread.
fn chain_pass(planned: &Planned<Counting>, owners: &Owners, owner: u8) {
    let _pass = planned.pass();
    let a = take(planned, owners, owner);
    let b = take(planned, owners, owner);
    give(planned, owners, a, owner);
    let c = take(planned, owners, owner);
    give(planned, owners, b, owner);
    give(planned, owners, c, owner);
}

/// Two threads run the recorded chain at once, and this one a third pass
/// too if `third` (else it reads the stats meanwhile): no block has two
/// owners, and at the end every block is back and only the arena is held.
fn passes_at_once(third: bool) {
    model(move || {
        let plan = chain_plan();
        let backing = Counting::default();
        let planned = Planned::new_in(&plan, backing.clone());
        let owners: Owners = Arc::default();
        let threads: Vec<_> = (1..=2u8)
            .map(|owner| {
                let (planned, owners) = (planned.clone(), owners.clone());
                thread::spawn(move || chain_pass(&planned, &owners, owner))
            })
            .collect();
        if third {
            chain_pass(&planned, &owners, 3);
        } else {
            assert_consistent(&planned.stats(), plan.arena_bytes());
        }
        for thread in threads {
            thread.join().unwrap();
        }
        let stats = planned.stats();
        assert_consistent(&stats, plan.arena_bytes());
        let blocks = 3 * (2 + u64::from(third));
        assert_eq!(
            (stats.hits + stats.misses, stats.frees),
            (blocks, blocks),
            "{stats:?}"
        );
        assert!(stats.hits >= 1, "{stats:?}");
        assert_eq!(stats.bytes_in_use, 0);
        assert_eq!(stats.bytes_reserved, plan.arena_bytes());
        assert!(owners.lock().unwrap().is_empty());
        assert_eq!(backing.live_blocks(), 1);
        assert_eq!(backing.allocs(), stats.backing_allocs);
        drop(planned);
        assert_eq!(backing.live_blocks(), 0);
    });
}

#[test]
fn concurrent_passes_never_share_a_block() {
    passes_at_once(false);
}

#[test]
fn three_passes_at_once_never_share_a_block() {
    passes_at_once(true);
}

#[test]
fn the_arena_goes_with_the_last_handle_on_either_thread() {
    model(|| {
        let plan = chain_plan();
        let backing = Counting::default();
        let planned = Planned::new_in(&plan, backing.clone());
        let owners: Owners = Arc::default();
        let worker = {
            let (planned, owners) = (planned.clone(), owners.clone());
            thread::spawn(move || {
                let _pass = planned.pass();
                let block = take(&planned, &owners, 1);
                give(&planned, &owners, block, 1);
            })
        };
        // The main thread's pass races with the worker's, then its handle
        // goes: whichever thread drops last frees the arena, once.
        chain_pass(&planned, &owners, 2);
        drop(planned);
        worker.join().unwrap();
        assert_eq!(backing.live_blocks(), 0);
        assert!(owners.lock().unwrap().is_empty());
    });
}

/// The backing reads its owner's state (the recorder's, then the arena's)
/// from inside every call: loom reports a deadlock if the owner called it
/// with its lock held.
#[test]
fn the_backing_is_called_without_the_lock() {
    model(|| {
        let backing = Hooked::default();
        let recorder = Recorder::new_in(backing.clone());
        let peeked = recorder.clone();
        backing.set_hook(move || {
            let _ = peeked.allocations();
        });
        let a = recorder.allocate(layout()).unwrap();
        // SAFETY: allocated above with `layout()`.
        unsafe { recorder.deallocate(a.cast(), layout()) };
        let plan = recorder.plan();
        backing.clear_hook();
        drop(recorder);

        let planned = Planned::new_in(&plan, backing.clone());
        let peeked = planned.clone();
        backing.set_hook(move || {
            let stats = peeked.stats();
            assert_eq!(stats.backing_allocs, stats.misses + 1, "{stats:?}");
        });
        let worker = {
            let planned = planned.clone();
            thread::spawn(move || {
                let _pass = planned.pass();
                let block = planned.allocate(layout()).unwrap();
                // SAFETY: allocated above with `layout()`.
                unsafe { planned.deallocate(block.cast(), layout()) };
            })
        };
        // Before, during or after the worker's pass (passes are shared):
        // whichever of the two allocations is not index 0 of a pass misses.
        let block = planned.allocate(layout()).unwrap();
        // SAFETY: as above.
        unsafe { planned.deallocate(block.cast(), layout()) };
        worker.join().unwrap();
        let stats = planned.stats();
        assert_eq!(
            (stats.hits + stats.misses, stats.frees),
            (2, 2),
            "{stats:?}"
        );
        assert!(stats.misses >= 1, "{stats:?}");
        // Break the cycle so the arena can drop.
        backing.clear_hook();
        drop(planned);
        assert_eq!(backing.counting.live_blocks(), 0);
    });
}

//! Under AddressSanitizer, a stale pointer into a cached block or a freed
//! arena slot is reported, not silently written into the next owner's data.
//!
//! Only built with `-Zsanitizer=address` (the crate's build script sets
//! `cfg(asan)`); `.ci/run`'s sanitizer step runs it. Each case runs in a child
//! process (this test binary, re-run with an environment variable) that must
//! die with ASan's report. A module of `tests/all`; its tests are named
//! `asan_poison::CASE` there.

use std::alloc::Layout;
use std::process::Command;

use allocator_api2::vec::Vec;
use caching_allocator::plan::{Planned, Recorder};
use caching_allocator::{Allocator, CachingAllocator};

const CHILD: &str = "CACHING_ALLOCATOR_ASAN_CHILD";

/// Runs `case` in a child process and returns its stderr, asserting it died.
fn child_report(case: &str) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &format!("asan_poison::{case}"),
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, case)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "the child survived:\n{stderr}");
    stderr
}

fn is_child(case: &str) -> bool {
    std::env::var(CHILD).is_ok_and(|value| value == case)
}

#[test]
fn a_write_into_a_cached_block_is_reported() {
    const CASE: &str = "a_write_into_a_cached_block_is_reported";
    if is_child(CASE) {
        let cache = CachingAllocator::new();
        let layout = Layout::from_size_align(4096, 8).unwrap();
        let block = cache.allocate(layout).unwrap().cast::<u8>();
        // SAFETY: allocated just above with `layout`.
        unsafe { cache.deallocate(block, layout) };
        // The bug under test: a stale pointer writes into the cached block.
        // SAFETY: none; ASan must stop the process here.
        unsafe { block.as_ptr().add(100).write_volatile(1) };
        unreachable!("ASan did not report the write");
    }
    let report = child_report(CASE);
    assert!(report.contains("use-after-poison"), "{report}");
    assert!(report.contains("WRITE of size 1"), "{report}");
}

#[test]
fn a_reused_cached_block_is_addressable_again() {
    // The other side of poisoning: a hit unpoisons the whole block.
    let cache = CachingAllocator::new();
    drop(Vec::<u8, _>::with_capacity_in(4096, cache.clone()));
    let mut again: Vec<u8, _> = Vec::with_capacity_in(4096, cache.clone());
    again.resize(4096, 7);
    assert_eq!(cache.stats().hits, 1);
    assert!(again.iter().all(|&b| b == 7));
}

#[test]
fn a_write_into_a_freed_arena_slot_is_reported() {
    const CASE: &str = "a_write_into_a_freed_arena_slot_is_reported";
    if is_child(CASE) {
        let recorder = Recorder::new();
        drop(Vec::<u8, _>::with_capacity_in(4096, recorder.clone()));
        let planned = Planned::new(&recorder.plan());
        let _pass = planned.pass();
        let layout = Layout::from_size_align(4096, 8).unwrap();
        let block = planned.allocate(layout).unwrap().cast::<u8>();
        assert_eq!(planned.stats().hits, 1, "served from the arena");
        // SAFETY: allocated just above with `layout`.
        unsafe { planned.deallocate(block, layout) };
        // SAFETY: none; ASan must stop the process here.
        unsafe { block.as_ptr().write_volatile(1) };
        unreachable!("ASan did not report the write");
    }
    let report = child_report(CASE);
    assert!(report.contains("use-after-poison"), "{report}");
}

#[test]
fn a_write_into_a_free_best_fit_range_is_reported() {
    const CASE: &str = "a_write_into_a_free_best_fit_range_is_reported";
    if is_child(CASE) {
        let cache = CachingAllocator::builder()
            .size_policy(caching_allocator::SizePolicy::BestFit)
            .build();
        // Above the quick lists' limit, so the free merges into a range; a
        // neighbour keeps the range from being the whole segment.
        let layout = Layout::from_size_align(64 << 10, 8).unwrap();
        let block = cache.allocate(layout).unwrap().cast::<u8>();
        let _neighbour = cache.allocate(layout).unwrap();
        // SAFETY: allocated just above with `layout`.
        unsafe { cache.deallocate(block, layout) };
        // SAFETY: none; ASan must stop the process here.
        unsafe { block.as_ptr().add(5000).write_volatile(1) };
        unreachable!("ASan did not report the write");
    }
    let report = child_report(CASE);
    assert!(report.contains("use-after-poison"), "{report}");
}

#[test]
fn a_carved_best_fit_block_is_addressable() {
    // Carving unpoisons exactly the block: a whole reused range is writable.
    let cache = CachingAllocator::builder()
        .size_policy(caching_allocator::SizePolicy::BestFit)
        .build();
    drop(Vec::<u8, _>::with_capacity_in(64 << 10, cache.clone()));
    let mut again: Vec<u8, _> = Vec::with_capacity_in(100 << 10, cache.clone());
    again.resize(100 << 10, 7);
    assert!(again.iter().all(|&b| b == 7));
    cache.trim(0);
    drop(again);
    cache.release_cached();
    assert_eq!(cache.stats().bytes_reserved, 0);
}

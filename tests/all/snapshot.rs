//! Snapshots (`CachingAllocator::snapshot`), the history of events
//! (`Builder::record_history`), PyTorch's pickle and the HTML page.

use allocator_api2::vec::Vec;
use caching_allocator::history::Action;
use caching_allocator::snapshot::{BlockState, SegmentKind};
use caching_allocator::{CachingAllocator, SizePolicy, Snapshot};

use crate::fixture::{Held, give, l, take};

/// Every segment is covered by its blocks exactly, in address order.
fn assert_tiled(snapshot: &Snapshot) {
    for segment in &snapshot.segments {
        let mut at = segment.address;
        for block in &segment.blocks {
            assert_eq!(block.address, at, "a gap or an overlap in {segment:?}");
            assert!(block.size > 0);
            at += block.size;
        }
        assert_eq!(at, segment.address + segment.size, "{segment:?}");
    }
}

fn best_fit(history: usize) -> caching_allocator::Builder {
    CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .record_history(history)
}

#[test]
fn a_best_fit_snapshot_accounts_for_every_byte() {
    for builder in [best_fit(10_000), best_fit(10_000).front_cache_bytes(0)] {
        let cache = builder.build();
        let held: std::vec::Vec<Held> = [100, 5000, 70_000, 300_000, 1000, 64]
            .iter()
            .cycle()
            .take(30)
            .map(|&size| take(&cache, l(size)))
            .collect();
        let (kept, freed): (std::vec::Vec<_>, std::vec::Vec<_>) =
            held.into_iter().enumerate().partition(|(i, _)| i % 3 == 0);
        freed.into_iter().for_each(|(_, held)| give(&cache, held));
        cache.trim(100_000); // some pages decommitted
        let snapshot = cache.snapshot();
        assert_tiled(&snapshot);
        let stats = snapshot.stats;
        let free = snapshot.bytes_in(BlockState::Free)
            + snapshot.bytes_in(BlockState::QuickList)
            + snapshot
                .segments
                .iter()
                .flat_map(|segment| &segment.blocks)
                .filter(|block| matches!(block.state, BlockState::Front(_)))
                .map(|block| block.size)
                .sum::<usize>();
        assert_eq!(free, stats.bytes_cached, "{stats:?}");
        assert_eq!(
            snapshot.bytes_in(BlockState::Decommitted),
            stats.bytes_decommitted
        );
        let total: usize = snapshot.segments.iter().map(|segment| segment.size).sum();
        assert_eq!(total, stats.bytes_reserved + stats.bytes_decommitted);
        // The history tells the kept blocks apart, with what was asked.
        let in_use: std::vec::Vec<_> = snapshot
            .segments
            .iter()
            .flat_map(|segment| &segment.blocks)
            .filter(|block| block.state == BlockState::InUse)
            .collect();
        assert_eq!(in_use.len(), kept.len(), "{in_use:?}");
        let asked: usize = in_use.iter().map(|block| block.requested.unwrap()).sum();
        assert_eq!(asked, stats.bytes_in_use);
        for (_, held) in &kept {
            assert!(in_use.iter().any(|block| block.address == held.addr()));
        }
        kept.into_iter().for_each(|(_, held)| give(&cache, held));
    }
}

#[test]
fn without_a_history_blocks_in_use_are_runs() {
    let cache = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .build();
    let a = take(&cache, l(100_000));
    let b = take(&cache, l(100_000));
    let snapshot = cache.snapshot();
    assert_tiled(&snapshot);
    assert!(snapshot.history.is_empty());
    assert_eq!(snapshot.bytes_in(BlockState::InUse), 2 * 100_032);
    let runs: std::vec::Vec<_> = snapshot
        .segments
        .iter()
        .flat_map(|segment| &segment.blocks)
        .filter(|block| block.state == BlockState::InUse)
        .collect();
    assert_eq!(runs.len(), 1, "two neighbours in use are one run: {runs:?}");
    assert_eq!(runs[0].requested, None);
    give(&cache, a);
    give(&cache, b);
}

#[test]
fn a_free_list_snapshot_lists_cached_blocks_and_the_historys_live_ones() {
    let cache = CachingAllocator::builder().record_history(100).build();
    let kept = take(&cache, l(4096));
    give(&cache, take(&cache, l(8192)));
    let snapshot = cache.snapshot();
    assert_tiled(&snapshot);
    assert!(
        snapshot
            .segments
            .iter()
            .all(|segment| segment.kind == SegmentKind::Block)
    );
    assert_eq!(snapshot.bytes_in(BlockState::Free), 8192);
    assert_eq!(snapshot.bytes_in(BlockState::InUse), 4096);
    give(&cache, kept);
}

#[test]
fn the_history_records_every_kind_of_event_and_keeps_the_last() {
    let cache = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .max_bytes(4 << 20)
        .front_cache_bytes(0)
        .record_history(64)
        .build();
    let mut big: Vec<u8, _> = Vec::new_in(cache.clone());
    assert!(big.try_reserve_exact(3 << 20).is_ok());
    let mut more: Vec<u8, _> = Vec::new_in(cache.clone());
    assert!(more.try_reserve_exact(3 << 20).is_err());
    drop(big);
    cache.release_cached();
    let events = cache.snapshot().history;
    let actions: std::vec::Vec<Action> = events.iter().map(|event| event.action).collect();
    for action in [
        Action::Alloc,
        Action::Free,
        Action::SegmentMap,
        Action::SegmentUnmap,
        Action::LimitFailure,
    ] {
        assert!(
            actions.contains(&action),
            "{action:?} missing from {events:?}"
        );
    }
    // Best fit's reservation grows and shrinks in place: the mapped and
    // unmapped ranges are where the block was, as PyTorch's expandable
    // segments record them.
    let mapped = events
        .iter()
        .find(|event| event.action == Action::SegmentMap)
        .unwrap();
    let alloc = events
        .iter()
        .find(|event| event.action == Action::Alloc)
        .unwrap();
    assert!(mapped.address <= alloc.address);
    assert!(alloc.address + alloc.size <= mapped.address + mapped.size);
    let unmapped = events
        .iter()
        .find(|event| event.action == Action::SegmentUnmap)
        .unwrap();
    assert_eq!(
        (unmapped.address, unmapped.size),
        (mapped.address, mapped.size)
    );
    // A free-list cache takes and gives back whole segments.
    let lists = CachingAllocator::builder()
        .size_policy(SizePolicy::Exact)
        .record_history(16)
        .build();
    drop(Vec::<u8, _>::with_capacity_in(1 << 20, lists.clone()));
    lists.release_cached();
    let events = lists.snapshot().history;
    let segment_alloc = events
        .iter()
        .find(|event| event.action == Action::SegmentAlloc)
        .unwrap_or_else(|| panic!("no segment_alloc in {events:?}"));
    let segment_free = events
        .iter()
        .find(|event| event.action == Action::SegmentFree)
        .unwrap_or_else(|| panic!("no segment_free in {events:?}"));
    assert_eq!(
        (segment_alloc.address, segment_alloc.size),
        (segment_free.address, segment_free.size)
    );
    assert!(
        events
            .windows(2)
            .all(|pair| pair[0].time_us <= pair[1].time_us)
    );
    // The ring keeps the last 64.
    for _ in 0..100 {
        drop(Vec::<u8, _>::with_capacity_in(128, cache.clone()));
    }
    let snapshot = cache.snapshot();
    assert_eq!(snapshot.history.len(), 64);
    assert!(snapshot.recorded > 200);
}

/// The pickle loads with Python's `pickle` and has the schema of
/// `torch.cuda.memory._snapshot()` that PyTorch's viewer reads.
#[test]
fn the_pytorch_pickle_loads_in_python_with_its_schema() {
    if cfg!(miri)
        || std::process::Command::new("python3")
            .arg("-c")
            .arg("1")
            .output()
            .is_err()
    {
        return;
    }
    let cache = best_fit(1000).build();
    let kept = take(&cache, l(300_000));
    give(&cache, take(&cache, l(100_000)));
    give(&cache, take(&cache, l(1000)));
    let snapshot = cache.snapshot();
    let path =
        std::env::temp_dir().join(format!("caching-allocator-{}.pickle", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    snapshot.write_pytorch(&mut file).unwrap();
    drop(file);
    let check = r#"
import pickle, sys
s = pickle.load(open(sys.argv[1], "rb"))
assert set(s) >= {"segments", "device_traces"}, s.keys()
for seg in s["segments"]:
    for key in ("address", "total_size", "allocated_size", "active_size", "stream", "segment_type", "blocks", "frames"):
        assert key in seg, key
    assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"]
    for b in seg["blocks"]:
        assert b["state"] in ("active_allocated", "inactive"), b
        assert set(b) >= {"address", "size", "requested_size", "state", "frames"}
trace = s["device_traces"][0]
actions = {e["action"] for e in trace}
assert {"alloc", "free_requested", "free_completed", "segment_map"} <= actions, actions
for e in trace:
    assert set(e) >= {"action", "addr", "size", "stream", "time_us", "frames"}, e
# Nothing was unmapped: every mapped range lies inside a segment of the
# snapshot, which PyTorch's viewer needs to draw the segment's growth.
for e in trace:
    if e["action"] == "segment_map":
        assert any(seg["address"] <= e["addr"] and e["addr"] + e["size"] <= seg["address"] + seg["total_size"]
                   for seg in s["segments"]), (e, [(seg["address"], seg["total_size"]) for seg in s["segments"]])
print(len(s["segments"]), len(trace), sum(b["size"] for seg in s["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"))
"#;
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    let allocated: usize = printed.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(allocated, snapshot.bytes_in(BlockState::InUse));
    give(&cache, kept);
}

#[test]
fn the_page_shows_the_ratio_and_every_segment() {
    let cache = best_fit(1000).build();
    let kept = take(&cache, l(300_000));
    give(&cache, take(&cache, l(100_000)));
    let snapshot = cache.snapshot();
    let mut page = std::vec::Vec::new();
    snapshot.write_html("a <test> cache", &mut page).unwrap();
    let page = String::from_utf8(page).unwrap();
    assert!(page.starts_with("<!doctype html>"));
    assert!(page.contains("a &lt;test&gt; cache"));
    let ratio = snapshot.stats.bytes_reserved as f64 / snapshot.stats.bytes_in_use as f64;
    assert!(page.contains(&format!("{ratio:.2}x")), "{page}");
    assert_eq!(
        page.matches("<polyline").count(),
        2,
        "in use and held over time"
    );
    let blocks: usize = snapshot
        .segments
        .iter()
        .map(|segment| segment.blocks.len())
        .sum();
    assert_eq!(page.matches("<rect").count(), blocks);
    assert!(!page.contains("http"), "nothing fetched at view time");
    give(&cache, kept);
}

/// With the `serde` feature, a server exports its stats and snapshots as
/// JSON (and reads them back).
#[cfg(feature = "serde")]
#[test]
fn stats_and_snapshots_round_trip_through_json() {
    let cache = best_fit(100).build();
    let kept = take(&cache, l(10_000));
    let stats = cache.stats();
    let json = serde_json::to_string(&stats).unwrap();
    assert!(json.contains("\"bytes_in_use\":10000"), "{json}");
    assert_eq!(
        serde_json::from_str::<caching_allocator::Stats>(&json).unwrap(),
        stats
    );
    let snapshot = cache.snapshot();
    let json = serde_json::to_string(&snapshot).unwrap();
    assert!(
        json.contains("\"state\":\"in_use\"") && json.contains("\"action\":\"alloc\""),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), snapshot);
    give(&cache, kept);
}

/// Events' times are microseconds since the cache was built, whatever
/// clock recorded them (the time-stamp counter where it is invariant).
#[test]
fn event_times_are_microseconds() {
    let cache = CachingAllocator::builder().record_history(8).build();
    let started = std::time::Instant::now();
    drop(Vec::<u8, _>::with_capacity_in(64, cache.clone()));
    std::thread::sleep(std::time::Duration::from_millis(if cfg!(miri) {
        2
    } else {
        30
    }));
    drop(Vec::<u8, _>::with_capacity_in(64, cache.clone()));
    let elapsed_us = started.elapsed().as_micros() as u64;
    let events = cache.snapshot().history;
    let (first, last) = (events.first().unwrap(), events.last().unwrap());
    let gap = last.time_us - first.time_us;
    let slept = if cfg!(miri) { 2_000 } else { 30_000 };
    assert!(
        (slept..=elapsed_us + 1_000).contains(&gap),
        "{gap} µs between events {slept} µs apart (the test took {elapsed_us} µs)"
    );
    assert!(last.time_us <= elapsed_us + 1_000);
}

/// A planned arena's snapshot: one segment, its live slots with their
/// requested sizes at the addresses handed out, free gaps between.
#[test]
fn a_planned_arena_snapshot_shows_its_live_slots() {
    use crate::plan_support::{give, take};
    use caching_allocator::plan::{Planned, Recorder};
    let recorder = Recorder::new();
    let sizes = [4096, 1000, 64 * 1024, 300];
    {
        let blocks: std::vec::Vec<_> = sizes.iter().map(|&n| take(&recorder, n, 64, 1)).collect();
        for block in blocks {
            give(&recorder, block);
        }
    }
    let plan = recorder.plan();
    let planned = Planned::new(&plan);
    let pass = planned.pass();
    let blocks: std::vec::Vec<_> = sizes.iter().map(|&n| take(&planned, n, 64, 2)).collect();
    // An unplanned one: from the backing allocator, not in the arena. (Under
    // Miri 10,000 bytes: every slot is live then, so any size goes to the
    // backing, and the byte-by-byte pattern of 100,000 took most of this
    // test's 94 s there.)
    let unplanned_size = if cfg!(miri) { 10_000 } else { 100_000 };
    let unplanned = take(&planned, unplanned_size, 64, 3);
    let (kept, given): (std::vec::Vec<_>, std::vec::Vec<_>) = blocks
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    for (_, block) in given {
        give(&planned, block);
    }
    let snapshot = planned.snapshot();
    assert_tiled(&snapshot);
    assert_eq!(snapshot.segments.len(), 1);
    let segment = &snapshot.segments[0];
    assert_eq!(segment.kind, SegmentKind::Plan);
    assert_eq!(segment.size, plan.arena_bytes());
    let in_use: std::vec::Vec<_> = segment
        .blocks
        .iter()
        .filter(|block| block.state == BlockState::InUse)
        .map(|block| (block.address, block.requested))
        .collect();
    let mut expected: std::vec::Vec<_> = kept
        .iter()
        .map(|(i, block)| (block.ptr.as_ptr().addr(), Some(sizes[*i])))
        .collect();
    expected.sort_unstable();
    assert_eq!(in_use, expected);
    assert_eq!(
        snapshot.bytes_in(BlockState::InUse),
        sizes[0] + sizes[2],
        "the unplanned block is not in the arena"
    );
    assert_eq!(
        snapshot.stats.bytes_in_use,
        sizes[0] + sizes[2] + unplanned_size
    );
    let mut pickle = std::vec::Vec::new();
    snapshot.write_pytorch(&mut pickle).unwrap();
    for (_, block) in kept {
        give(&planned, block);
    }
    give(&planned, unplanned);
    drop(pass);
    assert_eq!(planned.snapshot().bytes_in(BlockState::InUse), 0);
}

#[inline(never)]
fn allocate_the_kv_cache(cache: &CachingAllocator) -> Held {
    take(cache, l(200_000))
}

/// With `record_frames` (the `backtrace` feature) each event keeps the
/// stack that led to it, from the caller's frame: the pickle gives a block
/// in use its allocation's frames, as PyTorch's viewer shows them.
#[cfg(feature = "backtrace")]
#[test]
fn events_keep_their_stacks_with_record_frames() {
    let cache = best_fit(100).record_frames(32).build();
    let kv = allocate_the_kv_cache(&cache);
    give(&cache, take(&cache, l(1000)));
    let snapshot = cache.snapshot();
    assert_eq!(snapshot.frames.len(), snapshot.history.len());
    let alloc = snapshot
        .history
        .iter()
        .position(|event| event.action == Action::Alloc && event.address == kv.addr())
        .unwrap();
    let stack = &snapshot.frames[alloc];
    assert!(
        !stack[0].name.contains("caching_allocator::"),
        "the cache's own frames are left out: {stack:#?}"
    );
    assert!(
        stack
            .iter()
            .any(|frame| frame.name.ends_with("allocate_the_kv_cache")
                && frame.filename.ends_with("snapshot.rs")
                && frame.line > 0),
        "{stack:#?}"
    );
    let mut pickle = std::vec::Vec::new();
    snapshot.write_pytorch(&mut pickle).unwrap();
    let text = String::from_utf8_lossy(&pickle);
    assert!(text.contains("allocate_the_kv_cache"));
    give(&cache, kv);
    // A shallow depth still reaches past the cache's own frames, even for
    // an event recorded deep inside it (the reservation's growth).
    let shallow = best_fit(100).record_frames(3).build();
    let kv = allocate_the_kv_cache(&shallow);
    let snapshot = shallow.snapshot();
    for (event, stack) in snapshot.history.iter().zip(&snapshot.frames) {
        assert!((1..=3).contains(&stack.len()), "{event:?}: {stack:#?}");
        assert!(!stack[0].name.contains("caching_allocator::"), "{stack:#?}");
    }
    assert!(
        snapshot
            .history
            .iter()
            .any(|event| event.action == Action::SegmentMap)
    );
    give(&shallow, kv);
}

/// Without `record_frames` every event's stack is empty, and there is one.
#[test]
fn without_record_frames_every_stack_is_empty() {
    let cache = best_fit(100).build();
    let kv = allocate_the_kv_cache(&cache);
    let snapshot = cache.snapshot();
    assert_eq!(snapshot.frames.len(), snapshot.history.len());
    assert!(!snapshot.history.is_empty());
    assert!(snapshot.frames.iter().all(|stack| stack.is_empty()));
    give(&cache, kv);
}

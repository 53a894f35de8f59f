//! The replay core, through the cache's own counters.

use std::path::Path;

use caching_allocator::CachingAllocator;
use replay::engine::GlobalAllocRow;
use replay::trace::{HEADER, Trace};
use replay::{AllocatorKind, Options, Touch};

/// A trace with set-up, a set-up block freed in a pass, blocks living across
/// passes and at the end, and a size-0 block: everything the wrap handles.
fn tricky_trace() -> Trace {
    let text = format!(
        "{HEADER}\n\
         a 1 4096\n\
         a 2 100\n\
         p 0\n\
         a 3 70000\n\
         a 4 0\n\
         a 5 300\n\
         f 3\n\
         p 1\n\
         a 6 70000\n\
         f 5\n\
         f 2\n\
         f 4\n\
         p 2\n\
         a 7 300\n\
         f 6\n\
         a 8 5000\n"
    );
    Trace::parse(&text, "tricky.trace", "tricky.trace".into()).unwrap()
}

#[track_caller]
fn check_in_use(trace: &Trace, options: &Options) {
    let cache = CachingAllocator::new();
    let outcome = replay::replay(trace, &cache, options).unwrap();
    assert_eq!(outcome.pass_ns.len(), options.passes);
    assert_eq!(outcome.in_use_at_pass_end.len(), options.passes);
    for (pass, &in_use) in outcome.in_use_at_pass_end.iter().enumerate() {
        assert_eq!(
            in_use,
            trace.live_at_end_of_pass(pass) * options.threads,
            "pass {pass} of {}",
            trace.name
        );
    }
    // Everything went back to the cache at the end.
    let stats = cache.stats();
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(stats.blocks_in_use, 0);
    assert_eq!(stats.failures, 0);
    let first = outcome.cache_after_first.unwrap();
    let last = outcome.cache_final.unwrap();
    assert!(last.hits >= first.hits && last.misses >= first.misses);
}

#[test]
fn cache_in_use_follows_the_trace_at_every_pass_end() {
    let trace = tricky_trace();
    assert_eq!(
        trace.live_at_pass_end,
        vec![4096 + 100 + 300, 4096 + 70000, 4096 + 300 + 5000]
    );
    for passes in [1, 3, 7, 10] {
        for touch in [Touch::Page, Touch::Full, Touch::None] {
            let options = Options {
                passes,
                touch,
                ..Options::default()
            };
            check_in_use(&trace, &options);
        }
    }
}

#[test]
fn cache_in_use_follows_the_trace_with_threads() {
    let trace = tricky_trace();
    let options = Options {
        passes: 8,
        threads: 3,
        sample_every: Some(2),
        ..Options::default()
    };
    check_in_use(&trace, &options);
}

#[test]
fn resnet18_steady_passes_hit_the_cache() {
    let trace =
        Trace::from_path(&Path::new(replay::BUNDLED_TRACES).join("resnet18.trace")).unwrap();
    // 12 passes: the file's 10, then 2 more after the wrap.
    let options = Options {
        passes: 12,
        touch: Touch::None,
        ..Options::default()
    };
    check_in_use(&trace, &options);
    let cache = CachingAllocator::new();
    let outcome = replay::replay(&trace, &cache, &options).unwrap();
    let (first, last) = (
        outcome.cache_after_first.unwrap(),
        outcome.cache_final.unwrap(),
    );
    let allocations: u64 = trace.allocs_per_pass[1..].iter().sum::<usize>() as u64
        + trace.allocs_per_pass[..2].iter().sum::<usize>() as u64;
    assert_eq!(
        last.hits - first.hits + last.misses - first.misses,
        allocations
    );
    // Static shapes: every allocation after pass 0 but one is a hit.
    assert!(last.misses - first.misses <= 1, "{last:?}");
}

#[test]
fn samples_cover_the_replay() {
    let trace = tricky_trace();
    let options = Options {
        passes: 4,
        sample_every: Some(1),
        ..Options::default()
    };
    let outcome = replay::replay(&trace, &CachingAllocator::new(), &options).unwrap();
    // One sample per event of each pass, plus one at each pass end.
    let events: usize = (0..4).map(|pass| trace.pass_events(pass).len()).sum();
    assert_eq!(outcome.samples.len(), events + 4);
    let peak_live = outcome.samples.iter().map(|s| s.live).max().unwrap();
    assert_eq!(peak_live, trace.peak_live_bytes);
    assert!(outcome.samples.iter().any(|s| s.cached > 0));
}

#[test]
fn every_allocator_row_replays() {
    let trace = tricky_trace();
    let options = Options {
        passes: 5,
        threads: 2,
        ..Options::default()
    };
    for &kind in AllocatorKind::ALL {
        let outcome = kind.replay(&trace, &options).unwrap();
        assert_eq!(outcome.pass_ns.len(), 5, "{kind:?}");
        assert_eq!(outcome.cache_final.is_some(), kind.has_stats(), "{kind:?}");
    }
    let outcome = replay::replay(&trace, &GlobalAllocRow(&std::alloc::System), &options).unwrap();
    assert!(outcome.in_use_at_pass_end.is_empty());
}

#[test]
fn default_passes_are_whole_repetitions() {
    assert_eq!(replay::default_passes(10), 200);
    assert_eq!(replay::default_passes(20), 200);
    assert_eq!(replay::default_passes(65), 260);
    assert_eq!(replay::default_passes(300), 300);
}

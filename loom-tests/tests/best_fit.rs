//! Loom models of a `SizePolicy::BestFit` cache over fixed segments (built
//! with `build_in` the loom fixture's backing): frees that coalesce with
//! their neighbours, carves that take a new segment (the lock is released
//! across the backing call), and trims and releases that give whole free
//! segments back, racing each other. Every interleaving is explored up to
//! the preemption bound (`LOOM_MAX_PREEMPTIONS`, default 2).
//!
//! After the threads join: the stats add up (`bytes_in_use +
//! bytes_lost_to_rounding + bytes_cached == bytes_reserved`) and agree with
//! the backing's ledger, the live blocks are disjoint and hold what their
//! owners wrote; after a final release every segment has gone back to the
//! backing exactly once (the ledger panics on a second return).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release --test best_fit`.
#![cfg(loom)]

use std::collections::BTreeSet;

use caching_allocator::{Allocator, CachingAllocator, SizePolicy, Stats};
use core::alloc::Layout;
use loom::thread;
use loom_tests::{Block, Counting, model, model_outcomes};

/// A block: above the split threshold (512), so carving splits a range, and
/// above the quick lists' limit (4 KiB), so freeing merges ranges at once.
const SIZE: usize = 8 << 10;

/// The size of a fixed segment best fit takes for a small block.
const SEGMENT: usize = 256 << 10;

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 64).unwrap()
}

type Cache = CachingAllocator<Counting>;

/// A best-fit cache without front caches: these models follow the arena
/// itself (the fronts' are in `front.rs`).
fn best_fit() -> (Cache, Counting) {
    let backing = Counting::default();
    let cache = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .front_cache_bytes(0)
        .build_in(backing.clone());
    (cache, backing)
}

/// Takes a block and fills it with `stamp`.
fn take(cache: &Cache, stamp: u8) -> Block {
    let block = cache.allocate(layout()).unwrap().cast::<u8>();
    // SAFETY: a fresh block of SIZE bytes, ours.
    unsafe { block.as_ptr().write_bytes(stamp, SIZE) };
    Block(block)
}

/// Checks that `block` still holds `stamp` everywhere, then frees it.
fn give(cache: &Cache, block: Block, stamp: u8) {
    assert_stamped(&block, stamp);
    // SAFETY: every `Block` here was handed out by `cache` for `layout()`
    // and is not used again.
    unsafe { cache.deallocate(block.0, layout()) };
}

fn assert_stamped(block: &Block, stamp: u8) {
    // SAFETY: a live block of SIZE bytes: if another block overlapped it, or
    // the cache wrote into it, some byte shows it.
    let bytes = unsafe { core::slice::from_raw_parts(block.0.as_ptr(), SIZE) };
    assert!(
        bytes.iter().all(|&b| b == stamp),
        "block {:p} overwritten (stamp {stamp})",
        block.0
    );
}

/// Live blocks share no byte.
fn assert_disjoint(blocks: &[&Block]) {
    let mut starts: Vec<usize> = blocks.iter().map(|b| b.0.as_ptr() as usize).collect();
    starts.sort_unstable();
    for pair in starts.windows(2) {
        assert!(pair[0] + SIZE <= pair[1], "blocks overlap: {pair:x?}");
    }
}

/// At rest (no thread inside the cache): the stats add up and agree with
/// the backing, and `live` blocks are in use.
fn assert_at_rest(cache: &Cache, backing: &Counting, live: usize) -> Stats {
    let s = cache.stats();
    assert_eq!(
        s.bytes_in_use + s.bytes_lost_to_rounding + s.bytes_cached,
        s.bytes_reserved,
        "{s:?}"
    );
    assert_eq!(
        (s.blocks_in_use, s.bytes_in_use),
        (live, live * SIZE),
        "{s:?}"
    );
    // 1024 bytes at 64: no rounding, and the tails were split off.
    assert_eq!(s.bytes_lost_to_rounding, 0, "{s:?}");
    assert_eq!(backing.live_bytes(), s.bytes_reserved, "{s:?}");
    assert_eq!(
        backing.allocs_and_frees(),
        (s.backing_allocs, s.backing_frees),
        "{s:?}"
    );
    assert_eq!(s.bytes_reserved % SEGMENT, 0, "{s:?}");
    s
}

/// With nothing live, a release gives every segment back (once: the ledger
/// panics on a second return), and nothing stays reserved.
fn assert_all_back_after_release(cache: &Cache, backing: &Counting) {
    cache.release_cached();
    let s = assert_at_rest(cache, backing, 0);
    assert_eq!(
        (s.bytes_reserved, s.bytes_cached, s.bytes_pinned),
        (0, 0, 0)
    );
    assert_eq!(backing.live_blocks(), 0);
    let (allocs, frees) = backing.allocs_and_frees();
    assert_eq!(allocs, frees);
}

/// Two threads free the two neighbouring blocks at the bottom of a segment
/// while a third trims the cache to nothing. The frees coalesce into one
/// free range with the segment's free rest, whatever the order; the trim
/// gives the segment back only if it ran after both frees (a segment holding
/// a live block is pinned), and never twice.
#[test]
fn neighbours_freed_while_trimming_coalesce_and_the_segment_goes_back_once() {
    let outcomes = model_outcomes(|| {
        let (cache, backing) = best_fit();
        let a = take(&cache, 0xA1);
        let b = take(&cache, 0xB2);
        assert_eq!(b.0.as_ptr() as usize, a.0.as_ptr() as usize + SIZE);
        assert_eq!(backing.allocs(), 1);

        let freer = {
            let cache = cache.clone();
            thread::spawn(move || give(&cache, a, 0xA1))
        };
        let trimmer = {
            let cache = cache.clone();
            thread::spawn(move || cache.trim(0))
        };
        give(&cache, b, 0xB2);
        freer.join().unwrap();
        let trimmed = trimmer.join().unwrap();

        let s = assert_at_rest(&cache, &backing, 0);
        if trimmed == 0 {
            // The segment stayed: all of it one free range.
            assert_eq!((s.bytes_cached, s.blocks_cached), (SEGMENT, 1), "{s:?}");
        } else {
            assert_eq!(trimmed, SEGMENT);
            assert_eq!((s.bytes_reserved, s.blocks_cached), (0, 0), "{s:?}");
            assert_eq!(backing.live_blocks(), 0);
        }
        assert_all_back_after_release(&cache, &backing);
        assert_eq!(backing.allocs(), 1);
        trimmed
    });
    // Both were explored: the trim before a free (nothing shed) and after
    // both (the segment shed).
    assert_eq!(outcomes, BTreeSet::from([0, SEGMENT]));
}

/// One thread frees the only block of a segment and takes a new one, the
/// main thread takes one, and a third trims to nothing: the trim may give the
/// segment back between the free and the carves, and then both carves may
/// take a new segment at once (each with the cache's lock released across
/// the backing call). The blocks never overlap, every segment goes back once.
#[test]
fn carves_into_new_segments_race_with_a_trim() {
    let outcomes = model_outcomes(|| {
        let (cache, backing) = best_fit();
        let a = take(&cache, 0xA1);

        let worker = {
            let cache = cache.clone();
            thread::spawn(move || {
                give(&cache, a, 0xA1);
                take(&cache, 0xC3)
            })
        };
        let trimmer = {
            let cache = cache.clone();
            thread::spawn(move || cache.trim(0))
        };
        let d = take(&cache, 0xD4);
        let c = worker.join().unwrap();
        let trimmed = trimmer.join().unwrap();
        assert_eq!(trimmed % SEGMENT, 0);

        assert_disjoint(&[&c, &d]);
        assert_stamped(&c, 0xC3);
        assert_stamped(&d, 0xD4);
        assert_at_rest(&cache, &backing, 2);
        let segments = backing.allocs();
        give(&cache, c, 0xC3);
        give(&cache, d, 0xD4);
        assert_all_back_after_release(&cache, &backing);
        (trimmed, segments)
    });
    // The trim shed nothing (one segment throughout), or shed the first
    // segment, after which the two carves took one or two new ones.
    assert!(outcomes.contains(&(0, 1)), "{outcomes:?}");
    assert!(outcomes.contains(&(SEGMENT, 2)), "{outcomes:?}");
    assert!(outcomes.contains(&(SEGMENT, 3)), "{outcomes:?}");
}

/// A cache capped at nothing: every free sheds the segments it empties (the
/// cap's shed runs after the free, with the lock released in between), while
/// two threads allocate and free and a third releases. No segment is given
/// back twice or while a block lives in it.
#[test]
fn a_zero_cap_and_a_release_race_with_allocations() {
    model(|| {
        let backing = Counting::default();
        let cache = CachingAllocator::builder()
            .size_policy(SizePolicy::BestFit)
            .max_cached_bytes(0)
            .build_in(backing.clone());

        let worker = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, 0xE5);
                give(&cache, block, 0xE5);
            })
        };
        let releaser = {
            let cache = cache.clone();
            thread::spawn(move || {
                cache.release_cached();
            })
        };
        let f = take(&cache, 0xF6);
        worker.join().unwrap();
        releaser.join().unwrap();

        assert_stamped(&f, 0xF6);
        let s = assert_at_rest(&cache, &backing, 1);
        // Nothing free can be shed while `f` pins its segment; the worker's
        // segment, if it took its own, went back.
        assert_eq!(s.bytes_reserved, SEGMENT, "{s:?}");
        give(&cache, f, 0xF6);
        let s = assert_at_rest(&cache, &backing, 0);
        assert_eq!(
            s.bytes_reserved, 0,
            "the cap sheds the emptied segment: {s:?}"
        );
        assert_all_back_after_release(&cache, &backing);
    });
}

/// Two threads each take a block and free it, while a third trims: the
/// frees coalesce with whatever is free around them, and after the final
/// release every segment went back once.
#[test]
fn two_threads_allocate_and_free_while_a_third_trims() {
    model(|| {
        let (cache, backing) = best_fit();
        // A segment with a live block at its bottom, so the blocks the
        // threads take sit next to each other above it.
        let pin = take(&cache, 0x11);
        let spawn = |stamp: u8| {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, stamp);
                give(&cache, block, stamp);
            })
        };
        let (one, two) = (spawn(0x22), spawn(0x33));
        let trimmed = cache.trim(0);
        one.join().unwrap();
        two.join().unwrap();
        assert_eq!(trimmed % SEGMENT, 0);

        assert_stamped(&pin, 0x11);
        let s = assert_at_rest(&cache, &backing, 1);
        // The segment has room for both: no thread took another one, the
        // trim could shed nothing (`pin` pins the segment), and everything
        // but `pin` is one free range above it (coalesced).
        assert_eq!(
            (s.bytes_cached, s.blocks_cached),
            (SEGMENT - SIZE, 1),
            "{s:?}"
        );
        give(&cache, pin, 0x11);
        assert_all_back_after_release(&cache, &backing);
    });
}

/// Three neighbouring blocks freed by three threads while a fourth releases
/// the cache: the middle free merges both ways whatever the order, and the
/// release gives the segment back only once all three are free, once.
#[test]
fn three_neighbours_freed_while_releasing() {
    let outcomes = model_outcomes(|| {
        let (cache, backing) = best_fit();
        let blocks = [take(&cache, 1), take(&cache, 2), take(&cache, 3)];
        let [a, b, c] = blocks;
        let free_on_a_thread = |block: Block, stamp: u8| {
            let cache = cache.clone();
            thread::spawn(move || give(&cache, block, stamp))
        };
        let (one, three) = (free_on_a_thread(a, 1), free_on_a_thread(c, 3));
        let releaser = {
            let cache = cache.clone();
            thread::spawn(move || cache.release_cached())
        };
        give(&cache, b, 2);
        one.join().unwrap();
        three.join().unwrap();
        let released = releaser.join().unwrap();

        let s = assert_at_rest(&cache, &backing, 0);
        if released == 0 {
            assert_eq!((s.bytes_cached, s.blocks_cached), (SEGMENT, 1), "{s:?}");
        } else {
            assert_eq!(released, SEGMENT);
            assert_eq!(s.bytes_reserved, 0, "{s:?}");
        }
        assert_all_back_after_release(&cache, &backing);
        assert_eq!(backing.allocs(), 1);
        released
    });
    assert_eq!(outcomes, BTreeSet::from([0, SEGMENT]));
}

//! The cache under real collections (allocator-api2's `Vec`/`Box`, hashbrown's
//! `HashMap`) and the raw `Allocator` calls, with exact statistics checked
//! against a `Counting` backing allocator.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::fixture::{
    Counting, FRESH_BYTE, assert_cache_agrees, block_layout, counted, layout, pattern, zeros,
};
use allocator_api2::alloc::{Allocator, Layout};
use allocator_api2::boxed::Box;
use allocator_api2::vec::Vec;
use caching_allocator::{CachingAllocator, MIN_ALIGN, Stats};

type Cache = CachingAllocator<Counting>;

fn addr(block: NonNull<[u8]>) -> usize {
    block.cast::<u8>().as_ptr() as usize
}

/// The cache's figures agree with what the backing allocator holds (every
/// block here is a miss, none lost to rounding: exact sizes).
fn assert_backing_agrees(cache: &Cache, backing: &Counting) {
    let stats = cache.stats();
    assert_cache_agrees(&stats, backing);
    assert_eq!(stats.bytes_lost_to_rounding, 0, "{stats:?}");
    assert_eq!(stats.backing_allocs, stats.misses);
}

#[test]
fn vec_and_box_are_reused_across_passes() {
    let (cache, backing) = counted();
    for pass in 0..5u32 {
        let mut v: Vec<u32, _> = Vec::with_capacity_in(1000, cache.clone());
        v.extend((0..1000).map(|i| i * pass));
        let b = Box::new_in([pass as u64; 32], cache.clone());
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32 * pass));
        assert!(b.iter().all(|&x| x == u64::from(pass)));
        let stats = cache.stats();
        assert_eq!(stats.bytes_in_use, 4000 + 256);
        assert_eq!(stats.blocks_in_use, 2);
    }
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.frees), (2, 8, 10));
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(stats.bytes_cached, 4256);
    assert_eq!(stats.blocks_cached, 2);
    assert_eq!(stats.peak_bytes_in_use, 4256);
    assert_backing_agrees(&cache, &backing);
    assert_eq!(backing.allocs(), 2);
}

#[test]
fn a_growing_vec_reuses_every_capacity_on_the_second_pass() {
    let (cache, backing) = counted();
    let mut capacities = std::vec::Vec::new();
    let mut v: Vec<u64, _> = Vec::new_in(cache.clone());
    for i in 0..1000u64 {
        v.push(i * 3);
        if capacities.last() != Some(&v.capacity()) {
            capacities.push(v.capacity());
        }
    }
    assert!(capacities.len() >= 4, "grew through {capacities:?}");
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
    let stats = cache.stats();
    let grown = capacities.len() as u64;
    let old_bytes: usize = capacities[..capacities.len() - 1].iter().sum::<usize>() * 8;
    assert_eq!((stats.misses, stats.hits), (grown, 0));
    assert_eq!(stats.frees, grown - 1);
    assert_eq!(stats.bytes_in_use, v.capacity() * 8);
    assert_eq!(stats.bytes_cached, old_bytes);
    assert_backing_agrees(&cache, &backing);
    drop(v);

    // Second pass: the same capacities, all from the free lists.
    let mut v: Vec<u64, _> = Vec::new_in(cache.clone());
    for i in 0..1000u64 {
        v.push(i);
    }
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits), (grown, grown));
    assert_eq!(backing.allocs(), grown);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
    drop(v);
    assert_eq!(cache.stats().bytes_in_use, 0);
    assert_backing_agrees(&cache, &backing);
}

#[test]
fn hashbrown_map_takes_the_cache() {
    let (cache, backing) = counted();
    let (mut first_pass_misses, mut first_pass_hits, mut per_pass) = (0, 0, 0);
    for pass in 0..3u64 {
        let mut map = hashbrown::HashMap::new_in(cache.clone());
        for k in 0..2000u64 {
            map.insert(k, k * pass + 1);
        }
        for k in 0..2000u64 {
            assert_eq!(map[&k], k * pass + 1);
        }
        map.retain(|k, _| k % 2 == 0);
        map.shrink_to_fit();
        assert_eq!(map.len(), 1000);
        assert!(map.iter().all(|(k, v)| k % 2 == 0 && *v == k * pass + 1));
        drop(map);
        let stats = cache.stats();
        assert_eq!(stats.bytes_in_use, 0);
        if pass == 0 {
            first_pass_misses = stats.misses;
            first_pass_hits = stats.hits;
            per_pass = stats.hits + stats.misses;
            assert!(first_pass_misses > 1);
        } else {
            // Same sequence of table sizes: nothing new from the backing.
            assert_eq!(stats.misses, first_pass_misses);
            assert_eq!(stats.hits, first_pass_hits + per_pass * pass);
        }
        assert_backing_agrees(&cache, &backing);
    }
}

#[test]
fn strings_and_structs_in_cached_collections() {
    #[derive(Clone, Debug, PartialEq)]
    struct Record {
        name: String,
        id: u32,
        weights: [f32; 5],
    }
    let (cache, backing) = counted();
    let mut records: Vec<Record, _> = Vec::new_in(cache.clone());
    for id in 0..300 {
        records.push(Record {
            name: format!("record number {id}"),
            id,
            weights: [id as f32; 5],
        });
    }
    let mut text: Vec<u8, _> = Vec::new_in(cache.clone());
    for record in &records {
        text.extend_from_slice(record.name.as_bytes());
        text.push(b'\n');
    }
    let text = std::str::from_utf8(&text).unwrap();
    assert_eq!(text.lines().count(), 300);
    assert_eq!(text.lines().nth(123), Some("record number 123"));
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.id as usize, i);
        assert_eq!(record.weights, [i as f32; 5]);
    }
    let boxed = Box::new_in(records[7].clone(), cache.clone());
    assert_eq!(*boxed, records[7]);
    assert_backing_agrees(&cache, &backing);
}

#[repr(align(128))]
#[derive(Clone, Copy)]
struct Line([u8; 200]);

#[repr(align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; 4096]);

#[test]
fn large_alignments_are_honoured_and_kept_apart() {
    let (cache, backing) = counted();
    for pass in 0..3u8 {
        let lines: Vec<Box<Line, Cache>> = (0..8)
            .map(|i| Box::new_in(Line([i ^ pass; 200]), cache.clone()))
            .collect();
        let mut pages: Vec<Page, _> = Vec::new_in(cache.clone());
        pages.resize(3, Page([pass; 4096]));
        pages.push(Page([pass + 1; 4096]));
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(&**line as *const Line as usize % 128, 0);
            assert!(line.0.iter().all(|&b| b == i as u8 ^ pass));
        }
        assert_eq!(pages.as_ptr() as usize % 4096, 0);
        assert!(pages[..3].iter().all(|p| p.0 == [pass; 4096]));
        assert_eq!(pages[3].0, [pass + 1; 4096]);
    }
    // Every block came from the backing with the type's own alignment.
    for taken in backing.history() {
        assert!(taken.align() == 128 || taken.align() == 4096, "{taken:?}");
    }
    assert_eq!(cache.stats().misses, backing.allocs());

    // Same size, different alignment class: not interchangeable.
    let big = cache.allocate(layout(4096, 4096)).unwrap();
    // SAFETY: allocated just above with that layout.
    unsafe { cache.deallocate(big.cast(), layout(4096, 4096)) };
    let misses = cache.stats().misses;
    let small = cache.allocate(layout(4096, 8)).unwrap();
    assert_eq!(
        cache.stats().misses,
        misses + 1,
        "align 8 must not take a 4096 block"
    );
    let again = cache.allocate(layout(4096, 4096)).unwrap();
    assert_eq!(
        addr(again),
        addr(big),
        "align 4096 takes its own block back"
    );
    assert_eq!(addr(again) % 4096, 0);
    // SAFETY: both allocated just above with these layouts.
    unsafe {
        cache.deallocate(small.cast(), layout(4096, 8));
        cache.deallocate(again.cast(), layout(4096, 4096));
    }
    assert_backing_agrees(&cache, &backing);
}

#[test]
fn small_alignments_share_one_class_and_blocks_are_cache_line_aligned() {
    let (cache, backing) = counted();
    let mut seen = std::vec::Vec::new();
    for align in [1, 2, 8, 16, 32, 64] {
        let block = cache.allocate(layout(100, align)).unwrap();
        assert_eq!(addr(block) % MIN_ALIGN, 0);
        seen.push(addr(block));
        // SAFETY: allocated just above with this layout.
        unsafe { cache.deallocate(block.cast(), layout(100, align)) };
    }
    assert!(
        seen.iter().all(|&a| a == seen[0]),
        "one block serves them all"
    );
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits), (1, 5));
    assert_eq!(backing.history(), [layout(100, 64)]);
}

#[test]
fn zero_sized_requests_never_touch_the_cache() {
    let (cache, backing) = counted();
    let mut units: Vec<(), _> = Vec::new_in(cache.clone());
    for _ in 0..1000 {
        units.push(());
    }
    assert_eq!(units.len(), 1000);
    let empty: Vec<u64, _> = Vec::new_in(cache.clone());
    assert!(empty.is_empty());
    let unit_box = Box::new_in((), cache.clone());
    let empty_array = Box::new_in([0u32; 0], cache.clone());
    drop((units, empty, unit_box, empty_array));
    for align in [1, 8, 64, 4096, 1 << 20] {
        let block = cache.allocate(layout(0, align)).unwrap();
        assert_eq!(block.len(), 0);
        assert_eq!(addr(block) % align, 0);
        let zeroed = cache.allocate_zeroed(layout(0, align)).unwrap();
        assert_eq!(addr(zeroed) % align, 0);
        // SAFETY: zero-sized blocks from this cache with these layouts.
        unsafe {
            cache.deallocate(block.cast(), layout(0, align));
            cache.deallocate(zeroed.cast(), layout(0, align));
        }
    }
    assert_eq!(cache.stats(), Stats::default());
    assert_eq!(backing.allocs(), 0);
}

#[test]
fn a_block_may_be_freed_through_another_clone() {
    let (a, backing) = counted();
    let b = a.clone();
    let c = b.clone();
    assert!(a.same_cache(&b) && b.same_cache(&c) && c.same_cache(&a));
    assert!(!a.same_cache(&CachingAllocator::new_in(backing.clone())));

    let block = a.allocate(layout(333, 8)).unwrap();
    // SAFETY: live block of this cache (any clone), same layout.
    unsafe { b.deallocate(block.cast(), layout(333, 8)) };
    let again = c.allocate(layout(333, 8)).unwrap();
    assert_eq!(addr(again), addr(block));
    let stats = a.stats();
    assert_eq!(stats, b.stats());
    assert_eq!((stats.misses, stats.hits, stats.frees), (1, 1, 1));

    // A Vec built on one clone, dropped after that clone is gone.
    let mut v: Vec<u8, _> = Vec::with_capacity_in(333, c.clone());
    v.push(1);
    drop(c);
    drop(v);
    // SAFETY: live block of this cache, same layout.
    unsafe { a.deallocate(again.cast(), layout(333, 8)) };
    assert_eq!(a.stats().bytes_in_use, 0);
    assert_eq!(a.stats().blocks_cached, 2);
    assert_backing_agrees(&a, &backing);
    assert!(std::ptr::eq(a.backing(), b.backing()));
}

#[test]
fn free_lists_are_last_in_first_out() {
    let (cache, _backing) = counted();
    let l = layout(512, 16);
    let blocks: std::vec::Vec<_> = (0..4).map(|_| cache.allocate(l).unwrap()).collect();
    for block in &blocks {
        // SAFETY: live blocks of this cache with layout `l`.
        unsafe { cache.deallocate(block.cast(), l) };
    }
    for expected in blocks.iter().rev() {
        let got = cache.allocate(l).unwrap();
        assert_eq!(addr(got), addr(*expected));
    }
    assert_eq!(cache.stats().hits, 4);
    for block in &blocks {
        // SAFETY: handed out again just above with layout `l`.
        unsafe { cache.deallocate(block.cast(), l) };
    }
    assert_eq!(cache.stats().bytes_in_use, 0);
}

#[test]
fn contents_survive_grow_and_shrink() {
    let (cache, backing) = counted();
    let mut v: Vec<u32, _> = Vec::with_capacity_in(10, cache.clone());
    v.extend(0..10);
    for n in 10..5000 {
        v.push(n);
    }
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    v.truncate(100);
    v.shrink_to_fit();
    assert_eq!(v.capacity(), 100);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    v.shrink_to(0);
    v.shrink_to_fit();
    assert_eq!(v.len(), 100);
    v.clear();
    v.shrink_to_fit();
    assert_eq!(v.capacity(), 0);
    drop(v);
    assert_eq!(cache.stats().bytes_in_use, 0);
    assert_backing_agrees(&cache, &backing);

    // Raw grow/shrink across sizes and alignment classes.
    let steps = [
        layout(16, 1),
        layout(100, 8),
        layout(100, 128),
        layout(3000, 4096),
        layout(3000, 8),
        layout(10, 2),
        layout(10, 4096),
        layout(1, 1),
    ];
    let mut block = cache.allocate(steps[0]).unwrap();
    // SAFETY: a fresh block of 16 bytes.
    unsafe { std::slice::from_raw_parts_mut(block.cast::<u8>().as_ptr(), 16) }
        .copy_from_slice(pattern(9, 16));
    let mut current = steps[0];
    let mut filled = 16;
    for &next in &steps[1..] {
        // SAFETY: `block` is live for `current`; grow/shrink chosen by size.
        block = unsafe {
            if next.size() >= current.size() {
                cache.grow(block.cast(), current, next).unwrap()
            } else {
                cache.shrink(block.cast(), current, next).unwrap()
            }
        };
        assert_eq!(addr(block) % next.align(), 0);
        assert!(block.len() >= next.size());
        filled = filled.min(next.size());
        // SAFETY: the block holds `next.size()` bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(block.cast::<u8>().as_ptr(), next.size()) };
        assert_eq!(
            &bytes[..filled],
            pattern(9, filled),
            "after {current:?} -> {next:?}"
        );
        bytes.copy_from_slice(pattern(9, next.size()));
        filled = next.size();
        current = next;
    }
    // SAFETY: live for `current`.
    unsafe { cache.deallocate(block.cast(), current) };
    assert_eq!(cache.stats().bytes_in_use, 0);
    assert_backing_agrees(&cache, &backing);
}

#[test]
fn resizing_within_one_key_stays_in_place() {
    let (cache, backing) = counted();
    let block = cache.allocate(layout(256, 8)).unwrap();
    let before = cache.stats();
    // Same size, alignment within the 64 class: same free list, same block.
    // SAFETY: live for (256, 8); sizes equal, so both grow and shrink apply.
    let grown = unsafe { cache.grow(block.cast(), layout(256, 8), layout(256, 64)) }.unwrap();
    assert_eq!(addr(grown), addr(block));
    // SAFETY: live for (256, 64).
    let shrunk = unsafe { cache.shrink(grown.cast(), layout(256, 64), layout(256, 1)) }.unwrap();
    assert_eq!(addr(shrunk), addr(block));
    // SAFETY: live for (256, 1).
    let zeroed =
        unsafe { cache.grow_zeroed(shrunk.cast(), layout(256, 1), layout(256, 32)) }.unwrap();
    assert_eq!(addr(zeroed), addr(block));
    let after = cache.stats();
    assert_eq!(after, before, "in-place resizes change no counter");
    // Into another class: a new block, the old one cached.
    // SAFETY: live for (256, 32).
    let moved = unsafe { cache.grow(zeroed.cast(), layout(256, 32), layout(256, 128)) }.unwrap();
    assert_ne!(addr(moved), addr(block));
    assert_eq!(addr(moved) % 128, 0);
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.frees, stats.blocks_cached), (2, 1, 1));
    // And back: the cached block is a hit.
    // SAFETY: live for (256, 128).
    let back = unsafe { cache.shrink(moved.cast(), layout(256, 128), layout(200, 8)) };
    // Size 200 is another key too: a miss, not the cached 256 block.
    let back = back.unwrap();
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.blocks_cached), (3, 0, 2));
    // SAFETY: live for (200, 8).
    let home = unsafe { cache.grow(back.cast(), layout(200, 8), layout(256, 16)) }.unwrap();
    assert_eq!(
        addr(home),
        addr(block),
        "the cached block of the new key is reused"
    );
    assert_eq!(cache.stats().hits, 1);
    // SAFETY: live for (256, 16).
    unsafe { cache.deallocate(home.cast(), layout(256, 16)) };
    assert_backing_agrees(&cache, &backing);
}

/// Fills the `size` bytes of a live block with `byte`.
fn fill(block: NonNull<[u8]>, size: usize, byte: u8) {
    // SAFETY: callers pass a live block of at least `size` bytes.
    unsafe { std::ptr::write_bytes(block.cast::<u8>().as_ptr(), byte, size) };
}

fn bytes_of<'a>(block: NonNull<[u8]>, size: usize) -> &'a [u8] {
    // SAFETY: callers pass a live, initialised block of at least `size` bytes.
    unsafe { std::slice::from_raw_parts(block.cast::<u8>().as_ptr(), size) }
}

#[test]
fn allocate_zeroed_zeroes_a_dirty_reused_block() {
    let (cache, backing) = counted();
    let l = layout(4096, 8);
    let first = cache.allocate_zeroed(l).unwrap();
    assert_eq!(bytes_of(first, 4096), zeros(4096));
    assert_eq!(
        backing.zeroed_allocs(),
        1,
        "a zeroed miss asks the backing for zeros"
    );
    fill(first, 4096, 0xFF);
    // SAFETY: live for `l`.
    unsafe { cache.deallocate(first.cast(), l) };
    let reused = cache.allocate_zeroed(l).unwrap();
    assert_eq!(addr(reused), addr(first));
    assert_eq!(cache.stats().hits, 1);
    assert_eq!(bytes_of(reused, 4096), zeros(4096));

    // A plain allocate of a dirty block keeps whatever was there (no cost).
    fill(reused, 4096, 0x3C);
    // SAFETY: live for `l`.
    unsafe { cache.deallocate(reused.cast(), l) };
    let plain = cache.allocate(l).unwrap();
    assert_eq!(addr(plain), addr(first));
    // SAFETY: live for `l`.
    unsafe { cache.deallocate(plain.cast(), l) };

    // A plain miss gets whatever the backing had: the fixture's fresh byte.
    let fresh = cache.allocate(layout(77, 1)).unwrap();
    assert_eq!(bytes_of(fresh, 77), [FRESH_BYTE; 77]);

    // grow_zeroed into a dirty cached block: the tail is zero, the head kept.
    let dirty = cache.allocate(layout(300, 1)).unwrap();
    fill(dirty, 300, 0xEE);
    // SAFETY: live for (300, 1).
    unsafe { cache.deallocate(dirty.cast(), layout(300, 1)) };
    fill(fresh, 77, 0x11);
    // SAFETY: live for (77, 1); 300 >= 77.
    let grown = unsafe { cache.grow_zeroed(fresh.cast(), layout(77, 1), layout(300, 1)) }.unwrap();
    assert_eq!(addr(grown), addr(dirty));
    assert_eq!(&bytes_of(grown, 300)[..77], [0x11; 77]);
    assert_eq!(&bytes_of(grown, 300)[77..], zeros(223));
    // SAFETY: live for (300, 1).
    unsafe { cache.deallocate(grown.cast(), layout(300, 1)) };
    assert_backing_agrees(&cache, &backing);
}

#[test]
fn stats_are_exact() {
    let (cache, backing) = counted();
    let a = cache.allocate(layout(1000, 8)).unwrap();
    let b = cache.allocate(layout(1000, 8)).unwrap();
    let c = cache.allocate(layout(300, 4096)).unwrap();
    // Three misses: every byte in use is reserved, nothing cached.
    let mut expected = Stats::default();
    (
        expected.misses,
        expected.backing_allocs,
        expected.blocks_in_use,
    ) = (3, 3, 3);
    expected.bytes_missed = 2300;
    (expected.bytes_in_use, expected.peak_bytes_in_use) = (2300, 2300);
    (expected.bytes_reserved, expected.peak_bytes_reserved) = (2300, 2300);
    assert_eq!(cache.stats(), expected);
    assert_backing_agrees(&cache, &backing);
    // SAFETY: live blocks with these layouts.
    unsafe {
        cache.deallocate(a.cast(), layout(1000, 8));
        cache.deallocate(b.cast(), layout(1000, 8));
    }
    let d = cache.allocate(layout(1000, 64)).unwrap();
    assert_eq!(addr(d), addr(b));
    // SAFETY: live with this layout.
    unsafe { cache.deallocate(c.cast(), layout(300, 4096)) };
    // Two 1000-byte frees (peak cached 2000), one hit, then the 300.
    (expected.hits, expected.bytes_hit, expected.frees) = (1, 1000, 3);
    (expected.bytes_in_use, expected.blocks_in_use) = (1000, 1);
    (
        expected.bytes_cached,
        expected.blocks_cached,
        expected.peak_bytes_cached,
    ) = (1300, 2, 2000);
    assert_eq!(cache.stats(), expected);
    assert_backing_agrees(&cache, &backing);
    assert_eq!(cache.release_cached(), 1300);
    assert_eq!(cache.release_cached(), 0);
    // SAFETY: live with this layout.
    unsafe { cache.deallocate(d.cast(), layout(1000, 64)) };
    let stats = cache.stats();
    // Two releases (one of nothing), then d cached.
    expected.frees = 4;
    (expected.bytes_in_use, expected.blocks_in_use) = (0, 0);
    (
        expected.bytes_cached,
        expected.blocks_cached,
        expected.bytes_reserved,
    ) = (1000, 1, 1000);
    (
        expected.releases,
        expected.bytes_released,
        expected.backing_frees,
    ) = (2, 1300, 2);
    assert_eq!(stats, expected);
    assert_backing_agrees(&cache, &backing);
    assert_eq!(stats.hit_ratio(), 0.25);
    assert!(
        stats
            .to_string()
            .starts_with("hits 1 / misses 3 (25.0% hit, 30.3% of bytes), frees 4")
    );
    assert!(format!("{cache:?}").starts_with("CachingAllocator"));
}

#[test]
fn release_cached_gives_back_only_cached_blocks() {
    let (cache, backing) = counted();
    let keep: Vec<u8, _> = Vec::with_capacity_in(5000, cache.clone());
    for size in [10, 20, 30, 40] {
        drop(Vec::<u8, _>::with_capacity_in(size, cache.clone()));
    }
    assert_eq!(backing.live_blocks(), 5);
    assert_eq!(cache.release_cached(), 100);
    assert_eq!(backing.live_blocks(), 1);
    assert_eq!(backing.live_bytes(), 5000);
    let stats = cache.stats();
    assert_eq!((stats.releases, stats.bytes_released), (1, 100));
    assert_eq!((stats.bytes_cached, stats.blocks_cached), (0, 0));
    assert_backing_agrees(&cache, &backing);
    drop(keep);
    assert_eq!(backing.live_blocks(), 1, "a free is cached, not returned");
}

#[test]
fn dropping_the_last_handle_returns_everything() {
    let backing = Counting::new();
    {
        let cache = CachingAllocator::new_in(backing.clone());
        let mut boxes = std::vec::Vec::new();
        for i in 0..50usize {
            boxes.push(Box::new_in([i as u8; 100], cache.clone()));
            let mut v: Vec<usize, _> = Vec::new_in(cache.clone());
            v.extend(0..i * 10);
        }
        let mut map = hashbrown::HashMap::new_in(cache.clone());
        map.extend((0..500).map(|i| (i, i)));
        drop(boxes);
        let clone = cache.clone();
        drop(cache);
        assert!(backing.live_blocks() > 0);
        drop(map);
        assert_eq!(clone.stats().bytes_in_use, 0);
        assert_eq!(backing.allocs(), clone.stats().misses);
    }
    backing.assert_all_returned();
}

#[test]
fn the_backing_sees_exactly_the_user_blocks() {
    let (cache, backing) = counted();
    // Many keys, so the cache's own free-list table and vectors grow a lot.
    let mut held = std::vec::Vec::new();
    for size in 1..=300usize {
        let v: Vec<u8, _> = Vec::with_capacity_in(size * 7, cache.clone());
        held.push(v);
    }
    let user_layouts: std::vec::Vec<Layout> = held
        .iter()
        .map(|v| block_layout(Layout::array::<u8>(v.capacity()).unwrap()))
        .collect();
    drop(held);
    assert_eq!(backing.history(), user_layouts);
    assert_eq!(backing.allocs(), 300);
    assert_eq!(cache.stats().blocks_cached, 300);
    cache.release_cached();
    assert_eq!(backing.live_blocks(), 0);
    assert_eq!(backing.frees(), 300);
}

thread_local! {
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The backing calls back into the cache it backs from inside every call:
/// it would deadlock if the cache called it with its lock held.
#[test]
fn the_backing_is_never_called_with_the_lock_held() {
    let (cache, backing) = counted();
    let callbacks = Arc::new(AtomicUsize::new(0));
    let (peer, count) = (cache.clone(), callbacks.clone());
    backing.set_hook(move || {
        if IN_CALLBACK.get() {
            return;
        }
        IN_CALLBACK.set(true);
        let before = peer.stats();
        // Allocate from and free into the very cache that called us.
        let block = peer.allocate(Layout::new::<[u64; 3]>()).unwrap();
        // SAFETY: allocated just above with this layout.
        unsafe { peer.deallocate(block.cast(), Layout::new::<[u64; 3]>()) };
        assert_eq!(peer.stats().frees, before.frees + 1);
        IN_CALLBACK.set(false);
        count.fetch_add(1, Ordering::SeqCst);
    });

    let mut v: Vec<u32, _> = Vec::new_in(cache.clone());
    for i in 0..10_000 {
        v.push(i);
    }
    drop(v);
    assert!(callbacks.load(Ordering::SeqCst) > 3);
    let calls = callbacks.load(Ordering::SeqCst);
    assert!(cache.release_cached() > 0);
    assert!(callbacks.load(Ordering::SeqCst) > calls);

    // Break the cycle, then the last handle's drop returns everything.
    backing.clear_hook();
    drop(cache);
    backing.assert_all_returned();
}

#[test]
fn a_default_cache_over_the_global_allocator() {
    let cache = CachingAllocator::default();
    assert_eq!(cache.stats(), Stats::default());
    assert!(!cache.same_cache(&CachingAllocator::new()));
    let mut v: Vec<u16, _> = Vec::with_capacity_in(100, cache.clone());
    v.extend(0..100);
    drop(v);
    let again: Vec<u16, _> = Vec::with_capacity_in(100, cache.clone());
    assert_eq!((cache.stats().misses, cache.stats().hits), (1, 1));
    drop(again);
    assert_eq!(cache.release_cached(), 200);
}

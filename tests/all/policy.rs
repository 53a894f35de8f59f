//! The memory policy of one cache: size classes, the cap on cached bytes,
//! `trim`, and stopping caching after a failure.
//!
//! Every cache here runs over a `Counting` backing, which panics if a block
//! comes back twice or with another layout than it was taken with, and
//! records which blocks went back in which order: that is how the tests see
//! which cached blocks an eviction chose.
//!
//! Eviction order: `trim` gives back the blocks freed longest ago first. The
//! cap evicts by GreedyDual-Size (src/cache.rs `State::evict`): a block cached
//! when the inflation is `L` has priority `L + 2^32 / block size`, the lowest
//! goes first (ties: the oldest) and `L` becomes its priority. Among blocks of
//! one size that is oldest first; a larger block goes before an older small
//! one, until the inflation has caught up with the small one.

use std::collections::BTreeSet;

use crate::fixture::{
    Counting, Held, Rng, assert_cache_agrees, assert_stats_eq, built, cache_one, class_layout,
    give, l, pattern, reference_class, take, zeros,
};
use allocator_api2::alloc::{Allocator, Layout};
use allocator_api2::vec::Vec as AVec;
use caching_allocator::{CachingAllocator, SizePolicy, Stats};

const CLASSES: SizePolicy = SizePolicy::PowerOfTwoDivisions(4);

fn la(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

fn with_policy(policy: SizePolicy) -> (CachingAllocator<Counting>, Counting) {
    built(CachingAllocator::builder().size_policy(policy))
}

fn capped(policy: SizePolicy, cap: usize) -> (CachingAllocator<Counting>, Counting) {
    built(
        CachingAllocator::builder()
            .size_policy(policy)
            .max_cached_bytes(cap),
    )
}

/// Addresses the backing holds now.
fn live_set(backing: &Counting) -> BTreeSet<usize> {
    backing.live_layouts().into_iter().map(|(a, _)| a).collect()
}

#[test]
fn block_size_follows_the_documented_rule() {
    // Hand-computed: [2^k, 2^(k+1)) in n steps, steps of at least 64 bytes.
    let table: &[(u32, usize, usize)] = &[
        (4, 1, 64),
        (4, 64, 64),
        (4, 65, 128),
        (4, 128, 128),
        (4, 129, 192),
        (4, 257, 320),
        (4, 1000, 1024),
        (4, 1025, 1280),
        (4, 4097, 5120),
        (8, 4097, 4608),
        (1, 4097, 8192),
        (0, 4097, 8192),
        (3, 4097, 5120),
        (2, 100 * 768 * 4, 393_216),
        (4, 105 * 768 * 4, 327_680),
    ];
    for &(n, size, class) in table {
        let policy = SizePolicy::PowerOfTwoDivisions(n);
        assert_eq!(policy.block_size(size), Some(class), "{policy:?} {size}");
        assert_eq!(
            reference_class(policy, size),
            Some(class),
            "{policy:?} {size}"
        );
    }
    for size in [0, 1, 63, 64, 65, 1000, usize::MAX] {
        assert_eq!(SizePolicy::Exact.block_size(size), Some(size));
    }
    assert_eq!(SizePolicy::default(), SizePolicy::Exact);
    // And against the independent reference over a range of sizes.
    for n in [0, 1, 2, 3, 4, 8, 16, 1024] {
        let policy = SizePolicy::PowerOfTwoDivisions(n);
        let mut sizes: Vec<usize> = (1..=5000).collect();
        for shift in 13..62 {
            let p = 1usize << shift;
            sizes.extend([p - 1, p, p + 1, p + p / 3, p + p / 2 + 1]);
        }
        for size in sizes {
            assert_eq!(
                policy.block_size(size),
                reference_class(policy, size),
                "{policy:?} {size}"
            );
        }
    }
}

/// BERT-style inference: every pass has its own sequence length, 100..=128
/// tokens; the hidden states (`seq × 768` f32) and the attention scores
/// (`12 heads × seq × seq` f32) are live together. With four divisions per
/// power of two, the 29 lengths fall into a handful of classes: only the
/// first request of each class misses. Exact sizes miss every new length.
#[test]
fn nearby_sequence_lengths_share_a_size_class() {
    let mut lengths: Vec<usize> = (100..=128).collect();
    // A fixed shuffle, then every length again: the order does not matter.
    lengths.reverse();
    lengths.rotate_left(11);
    let again = lengths.clone();
    lengths.extend(again);
    let buffers = |seq: usize| [l(seq * 768 * 4), l(12 * seq * seq * 4)];

    let mut classes = BTreeSet::new();
    let mut sizes = BTreeSet::new();
    for &seq in &lengths {
        for layout in buffers(seq) {
            classes.insert(reference_class(CLASSES, layout.size()).unwrap());
            sizes.insert(layout.size());
        }
    }
    assert!(classes.len() <= 6, "{classes:?}");

    for (policy, expected_misses) in [(CLASSES, classes.len()), (SizePolicy::Exact, sizes.len())] {
        let (cache, backing) = with_policy(policy);
        for &seq in &lengths {
            let held: Vec<Held> = buffers(seq).map(|layout| take(&cache, layout)).into();
            for (i, block) in held.iter().enumerate() {
                // SAFETY: a live block of `layout.size()` bytes, ours alone.
                unsafe { block.ptr.as_ptr().write_bytes(i as u8, block.layout.size()) };
            }
            for block in held {
                give(&cache, block);
            }
        }
        let stats = cache.stats();
        let requests = 2 * lengths.len();
        assert_eq!(
            stats.misses as usize, expected_misses,
            "{policy:?} {stats:?}"
        );
        assert_eq!(
            stats.hits as usize,
            requests - expected_misses,
            "{policy:?}"
        );
        assert_eq!(stats.bytes_lost_to_rounding, 0);
        assert_eq!(stats.bytes_in_use, 0);
        // The backing holds one block per class, each with its class layout.
        let held: BTreeSet<(usize, usize)> = backing
            .live_layouts()
            .into_iter()
            .map(|(_, l)| (l.size(), l.align()))
            .collect();
        let expected: BTreeSet<(usize, usize)> = match policy {
            SizePolicy::Exact => sizes.iter().map(|&s| (s, 64)).collect(),
            _ => classes.iter().map(|&s| (s, 64)).collect(),
        };
        assert_eq!(held, expected, "{policy:?}");
        assert_cache_agrees(&stats, &backing);
        drop(cache);
        backing.assert_all_returned();
    }
}

#[test]
fn stats_count_requested_bytes_in_use_and_class_bytes_held() {
    let (cache, backing) = with_policy(CLASSES);
    let requests = [l(1000), l(1025), l(10), l(4097), la(100, 4096)];
    let held: Vec<Held> = requests
        .iter()
        .map(|&layout| take(&cache, layout))
        .collect();
    let classes = [1024, 1280, 64, 5120, 128];
    let requested: usize = requests.iter().map(Layout::size).sum();
    let reserved: usize = classes.iter().sum();

    let mut expected = Stats::default();
    expected.misses = 5;
    expected.bytes_missed = requested as u64;
    expected.backing_allocs = 5;
    expected.blocks_in_use = 5;
    expected.bytes_in_use = requested;
    expected.peak_bytes_in_use = requested;
    expected.bytes_reserved = reserved;
    expected.peak_bytes_reserved = reserved;
    expected.bytes_lost_to_rounding = reserved - requested;
    assert_stats_eq(&cache.stats(), &expected);
    assert_eq!(expected.bytes_lost_to_rounding, 24 + 255 + 54 + 1023 + 28);
    // The backing took every block with its class layout.
    let history = backing.history();
    let wanted: Vec<Layout> = requests.iter().map(|&r| class_layout(CLASSES, r)).collect();
    assert_eq!(history, wanted);
    assert_eq!(history[4], la(128, 4096));

    // Free the 1000- and the 4097-byte requests: their classes are cached,
    // their rounding no longer counts.
    let mut held = held.into_iter();
    let (a, b, c, d, e) = (
        held.next().unwrap(),
        held.next().unwrap(),
        held.next().unwrap(),
        held.next().unwrap(),
        held.next().unwrap(),
    );
    let a_addr = a.addr();
    give(&cache, a);
    give(&cache, d);
    expected.frees = 2;
    expected.blocks_in_use = 3;
    expected.bytes_in_use = 1025 + 10 + 100;
    expected.bytes_lost_to_rounding = 255 + 54 + 28;
    expected.bytes_cached = 1024 + 5120;
    expected.peak_bytes_cached = 1024 + 5120;
    expected.blocks_cached = 2;
    assert_stats_eq(&cache.stats(), &expected);

    // 900 bytes is in (896, 1024]: class 1024, the block of the 1000 request.
    let a2 = take(&cache, l(900));
    assert_eq!(a2.addr(), a_addr);
    expected.hits = 1;
    expected.bytes_hit = 900;
    expected.blocks_in_use = 4;
    expected.bytes_in_use += 900;
    expected.bytes_lost_to_rounding += 124;
    expected.bytes_cached = 5120;
    expected.blocks_cached = 1;
    assert_stats_eq(&cache.stats(), &expected);
    assert_cache_agrees(&expected, &backing);

    for block in [a2, b, c, e] {
        give(&cache, block);
    }
    let stats = cache.stats();
    assert_eq!(stats.bytes_lost_to_rounding, 0);
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(stats.bytes_cached, reserved);
    assert_eq!(cache.release_cached(), reserved);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn grow_and_shrink_within_a_class_stay_in_place() {
    let (cache, backing) = with_policy(CLASSES);
    let block = take(&cache, l(1000));
    block.fill(3);
    let ptr = block.ptr;

    // SAFETY: (and for the calls below) `ptr` is live for the old layout, handed out
    // by this cache; the new sizes are larger (grow) or smaller (shrink).
    let grown = unsafe { cache.grow(ptr, l(1000), l(1024)) }.unwrap();
    assert_eq!(grown.cast::<u8>(), ptr, "1000 -> 1024 is one class");
    assert_eq!(grown.len(), 1024);
    let grown = Held {
        ptr,
        layout: l(1000),
    };
    assert!(grown.bytes() == pattern(3, 1000));
    let stats = cache.stats();
    assert_eq!(
        (stats.bytes_in_use, stats.bytes_lost_to_rounding),
        (1024, 0)
    );

    // SAFETY: as above: live for the old layout, handed out by this cache.
    let shrunk = unsafe { cache.shrink(ptr, l(1024), l(897)) }.unwrap();
    assert_eq!(shrunk.cast::<u8>(), ptr, "1024 -> 897 is one class");
    let stats = cache.stats();
    assert_eq!(
        (stats.bytes_in_use, stats.bytes_lost_to_rounding),
        (897, 127)
    );

    // grow_zeroed in place zeroes the new tail (the old bytes past 897 still
    // hold the pattern).
    // SAFETY: as above: live for the old layout, handed out by this cache.
    let zeroed = unsafe { cache.grow_zeroed(ptr, l(897), l(1000)) }.unwrap();
    assert_eq!(zeroed.cast::<u8>(), ptr);
    let held = Held {
        ptr,
        layout: l(1000),
    };
    assert!(held.bytes()[..897] == *pattern(3, 897));
    assert!(held.bytes()[897..] == *zeros(1000 - 897));

    // A small alignment change stays in the same class too.
    // SAFETY: as above: live for the old layout, handed out by this cache.
    let realigned = unsafe { cache.shrink(ptr, l(1000), la(950, 64)) }.unwrap();
    assert_eq!(realigned.cast::<u8>(), ptr);

    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.frees), (1, 0, 0));
    assert_eq!(backing.allocs(), 1);
    assert_eq!(
        (stats.bytes_in_use, stats.bytes_lost_to_rounding),
        (950, 74)
    );
    assert_eq!(stats.peak_bytes_in_use, 1024);
    give(
        &cache,
        Held {
            ptr,
            layout: la(950, 64),
        },
    );

    // A Vec growing by a few elements keeps its buffer.
    let mut v: AVec<u32, _> = AVec::with_capacity_in(250, cache.clone());
    v.extend(0..250u32);
    let before = v.as_ptr();
    v.reserve_exact(6);
    assert_eq!(v.as_ptr(), before, "1000 -> 1024 bytes, one class");
    v.extend(250..256u32);
    assert!(v.iter().copied().eq(0..256u32));
    drop(v);
    assert_eq!(cache.stats().misses, 1, "the Vec reused the cached block");
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn resizing_across_classes_moves_and_keeps_contents() {
    let (cache, backing) = with_policy(CLASSES);
    let block = take(&cache, l(1000));
    block.fill(9);
    let old = block.ptr;

    // SAFETY: (and for the calls below) the pointer is live for the old layout; the
    // new sizes are larger (grow) or smaller (shrink).
    let grown = unsafe { cache.grow(old, l(1000), l(1500)) }.unwrap();
    assert_ne!(grown.cast::<u8>(), old, "1024 and 1536 are two classes");
    let grown = Held {
        ptr: grown.cast(),
        layout: l(1500),
    };
    assert!(grown.bytes()[..1000] == *pattern(9, 1000));
    let stats = cache.stats();
    assert_eq!(
        (stats.bytes_in_use, stats.bytes_cached, stats.frees),
        (1500, 1024, 1)
    );
    assert_eq!(stats.bytes_lost_to_rounding, 36);
    assert_eq!(backing.history(), [la(1024, 64), la(1536, 64)]);
    grown.fill(10);

    // SAFETY: as above: live for the old layout, handed out by this cache.
    let zeroed = unsafe { cache.grow_zeroed(grown.ptr, l(1500), l(3000)) }.unwrap();
    let zeroed = Held {
        ptr: zeroed.cast(),
        layout: l(3000),
    };
    assert!(zeroed.bytes()[..1500] == *pattern(10, 1500));
    assert!(zeroed.bytes()[1500..] == *zeros(1500));
    zeroed.fill(11);

    // Shrinking into a cached class reuses that block.
    // SAFETY: as above: live for the old layout, handed out by this cache.
    let shrunk = unsafe { cache.shrink(zeroed.ptr, l(3000), l(950)) }.unwrap();
    assert_eq!(shrunk.cast::<u8>(), old, "950 is in the cached 1024 class");
    let shrunk = Held {
        ptr: shrunk.cast(),
        layout: l(950),
    };
    assert!(shrunk.bytes() == pattern(11, 950));

    // Same class size, larger alignment: another free list, so it moves.
    // SAFETY: as above: live for the old layout, handed out by this cache.
    let realigned = unsafe { cache.grow(shrunk.ptr, l(950), la(950, 128)) }.unwrap();
    assert_ne!(realigned.cast::<u8>(), old);
    assert_eq!(realigned.cast::<u8>().as_ptr() as usize % 128, 0);
    let realigned = Held {
        ptr: realigned.cast(),
        layout: la(950, 128),
    };
    assert!(realigned.bytes() == pattern(11, 950));
    assert_eq!(backing.layout_of(realigned.addr()), Some(la(1024, 128)));
    give(&cache, realigned);

    let stats = cache.stats();
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(stats.bytes_lost_to_rounding, 0);
    assert_cache_agrees(&stats, &backing);
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn cached_bytes_never_exceed_the_cap() {
    for policy in [
        SizePolicy::Exact,
        CLASSES,
        SizePolicy::PowerOfTwoDivisions(1),
    ] {
        for cap in [0, 100, 4096, 20_000] {
            let (cache, backing) = capped(policy, cap);
            let mut rng = Rng::new(cap as u64 + 7);
            let mut live: Vec<Held> = Vec::new();
            for step in 0..1500 {
                match rng.below(10) {
                    0..=3 => {
                        let size = 1 + rng.below(9000);
                        let align = [1, 8, 64, 256][rng.below(4)];
                        live.push(take(&cache, la(size, align)));
                    }
                    4..=8 if !live.is_empty() => {
                        let i = rng.below(live.len());
                        give(&cache, live.swap_remove(i));
                    }
                    _ => {
                        let target = rng.below(cap + 1);
                        let before = cache.stats().bytes_cached;
                        let trimmed = cache.trim(target);
                        let after = cache.stats().bytes_cached;
                        assert_eq!(before - after, trimmed);
                        assert!(after <= target);
                    }
                }
                let stats = cache.stats();
                assert!(
                    stats.bytes_cached <= cap,
                    "{policy:?} cap {cap}, step {step}: {stats:?}"
                );
                assert!(stats.peak_bytes_cached <= cap);
                assert_cache_agrees(&stats, &backing);
                let in_use: usize = live
                    .iter()
                    .map(|h| reference_class(policy, h.layout.size()).unwrap())
                    .sum();
                assert_eq!(stats.bytes_reserved, in_use + stats.bytes_cached);
            }
            let stats = cache.stats();
            assert!(stats.evictions > 0, "the cap never had to act: {stats:?}");
            for block in live {
                give(&cache, block);
            }
            assert!(cache.stats().bytes_cached <= cap);
            drop(cache);
            backing.assert_all_returned();
        }
    }
}

#[test]
fn the_cap_evicts_lowest_priority_first_and_only_as_many_as_needed() {
    let (cache, backing) = capped(SizePolicy::Exact, 10_000);
    let a = take(&cache, l(3000));
    let b = take(&cache, l(3000));
    let c = take(&cache, la(3000, 128));
    let d = take(&cache, l(2000));
    let e = take(&cache, l(5000));
    let f = take(&cache, l(10_000));
    let addrs: Vec<usize> = [&a, &b, &c, &d, &e, &f].iter().map(|h| h.addr()).collect();
    let [a_addr, b_addr, c_addr, d_addr, e_addr, f_addr] = addrs[..] else {
        unreachable!()
    };

    give(&cache, a);
    give(&cache, b);
    give(&cache, c);
    assert_eq!(cache.stats().bytes_cached, 9000);
    assert!(backing.returned().is_empty());

    // 9000 + 2000 > 10_000: of three blocks of one size (one priority), the
    // oldest (a) goes, and only it.
    give(&cache, d);
    assert_eq!(backing.returned(), [(a_addr, la(3000, 64))]);
    let stats = cache.stats();
    assert_eq!((stats.bytes_cached, stats.blocks_cached), (8000, 3));
    assert_eq!((stats.evictions, stats.bytes_evicted), (1, 3000));

    // 8000 + 5000: b (3000, lowest priority, older than c) is enough.
    give(&cache, e);
    assert_eq!(
        backing.returned(),
        [(a_addr, la(3000, 64)), (b_addr, la(3000, 64))]
    );
    assert_eq!(cache.stats().bytes_cached, 10_000);
    let held = live_set(&backing);
    assert!(held.contains(&c_addr) && held.contains(&d_addr) && held.contains(&e_addr));

    // A block of exactly the cap fits after everything else went, whatever
    // the key (c has its own alignment class), lowest priority first:
    // c (2^32/3000, cached before any eviction), then e (L + 2^32/5000), then
    // d (L + 2^32/2000), with L = 2^32/3000 for both: d outlives the younger e.
    give(&cache, f);
    assert_eq!(
        backing.returned(),
        [
            (a_addr, la(3000, 64)),
            (b_addr, la(3000, 64)),
            (c_addr, la(3000, 128)),
            (e_addr, la(5000, 64)),
            (d_addr, la(2000, 64)),
        ]
    );
    assert_eq!(live_set(&backing), BTreeSet::from([f_addr]));
    let stats = cache.stats();
    assert_eq!((stats.bytes_cached, stats.blocks_cached), (10_000, 1));
    assert_eq!((stats.evictions, stats.bytes_evicted), (5, 16_000));
    assert_eq!(stats.backing_frees, 5);
    assert_eq!(stats.releases, 0, "evictions are not releases");
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

/// `trim` goes by age, and a block's age is when it was freed (not
/// allocated); a hit and a free make it young again.
#[test]
fn a_block_is_as_old_as_its_free() {
    for cap in [None, Some(1 << 20)] {
        let backing = Counting::new();
        let mut builder = CachingAllocator::builder();
        if let Some(cap) = cap {
            builder = builder.max_cached_bytes(cap);
        }
        let cache = builder.build_in(backing.clone());
        // Allocated a, b; freed b, a: b is the older cached block.
        let a = take(&cache, l(100));
        let b = take(&cache, l(120));
        let (a_addr, b_addr) = (a.addr(), b.addr());
        give(&cache, b);
        give(&cache, a);
        let c_addr = cache_one(&cache, 50);
        assert_eq!(cache.trim(150), 120);
        assert_eq!(backing.returned(), [(b_addr, la(120, 64))]);
        // a is now older than c; a hit and a free make it the youngest.
        let a = take(&cache, l(100));
        assert_eq!(a.addr(), a_addr);
        give(&cache, a);
        assert_eq!(cache.trim(100), 50, "{cap:?}");
        assert_eq!(backing.returned()[1], (c_addr, la(50, 64)));
        assert!(backing.is_live(a_addr));
        drop(cache);
        assert_eq!(backing.live_blocks(), 0);
    }
}

/// GreedyDual-Size: a small block freed first outlives the large blocks freed
/// after it, but each eviction raises the inflation `L`, so it goes in the
/// end. A 1000-byte block has priority 2^32/1000; the k-th block of about
/// 9000 bytes gets about k * 2^32/9005, which passes it at k = 10, so the
/// small block goes when the 11th large one is freed.
#[test]
fn the_cap_keeps_small_blocks_longer_but_not_forever() {
    // Room for the small block and one large one, never two large ones.
    let (cache, backing) = capped(SizePolicy::Exact, 1000 + 9011);
    let small = cache_one(&cache, 1000);
    let mut large = Vec::new();
    for k in 1..=11 {
        // Distinct sizes, so each is a miss and a key of its own.
        large.push(cache_one(&cache, 9000 + k));
        let returned: Vec<usize> = backing.returned().iter().map(|r| r.0).collect();
        if k <= 10 {
            assert!(backing.is_live(small), "the small block went at k = {k}");
            // Only the previous large block went to make room.
            assert_eq!(returned, large[..k - 1], "k = {k}");
        } else {
            // First the small block (now the lowest priority), then the
            // previous large one: 9000 + 9011 bytes do not fit either.
            assert_eq!(returned[9..], [small, large[9]]);
        }
    }
    let stats = cache.stats();
    assert_eq!((stats.blocks_cached, stats.bytes_cached), (1, 9011));
    assert_eq!(stats.evictions, 11);
    assert_eq!(backing.live_layouts(), [(large[10], la(9011, 64))]);
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn hits_take_the_newest_block_of_their_class_evictions_the_oldest_of_a_size() {
    let (cache, backing) = capped(CLASSES, 4 * 1024);
    // Four requests of one class (1024), freed in order x0..x3.
    let blocks: Vec<Held> = [1000, 1024, 900, 1010]
        .iter()
        .map(|&s| take(&cache, l(s)))
        .collect();
    let addrs: Vec<usize> = blocks.iter().map(Held::addr).collect();
    for block in blocks {
        give(&cache, block);
    }
    assert_eq!(cache.stats().bytes_cached, 4096);

    // LIFO: the most recently freed block of the class.
    let hit = take(&cache, l(1000));
    assert_eq!(hit.addr(), addrs[3]);
    // Another class (1280): 3072 + 1280 > 4096, so one 1024-byte block goes:
    // they share a priority, and the oldest (x0) is first.
    give(&cache, take(&cache, l(1100)));
    assert_eq!(backing.returned(), [(addrs[0], la(1024, 64))]);
    // The next hit is x2 (freed after x1), then x1.
    let hit2 = take(&cache, l(1000));
    assert_eq!(hit2.addr(), addrs[2]);
    let hit3 = take(&cache, l(950));
    assert_eq!(hit3.addr(), addrs[1]);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.evictions), (3, 1));
    for block in [hit, hit2, hit3] {
        give(&cache, block);
    }
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn a_block_larger_than_the_cap_is_not_cached() {
    let (cache, backing) = capped(SizePolicy::Exact, 1000);
    let small = take(&cache, l(600));
    let small_addr = small.addr();
    give(&cache, small);
    let big = take(&cache, l(2000));
    let big_addr = big.addr();
    give(&cache, big);
    // Straight back, and the cached block did not go to make room.
    assert_eq!(backing.returned(), [(big_addr, la(2000, 64))]);
    assert!(backing.is_live(small_addr));
    let stats = cache.stats();
    assert_eq!((stats.bytes_cached, stats.blocks_cached), (600, 1));
    assert_eq!((stats.evictions, stats.bytes_evicted), (1, 2000));
    assert_eq!((stats.frees, stats.backing_frees), (2, 1));
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(stats.peak_bytes_cached, 600);
    assert_cache_agrees(&stats, &backing);

    // Under size classes the class counts: a 1000-byte request takes a
    // 1024-byte block, which does not fit a 1000-byte cap.
    let (cache, backing) = capped(CLASSES, 1000);
    let block = take(&cache, l(1000));
    let addr = block.addr();
    give(&cache, block);
    assert_eq!(backing.returned(), [(addr, la(1024, 64))]);
    let stats = cache.stats();
    assert_eq!((stats.bytes_cached, stats.evictions), (0, 1));
    assert_eq!(stats.bytes_evicted, 1024);
    assert_eq!(stats.bytes_lost_to_rounding, 0);
    assert_cache_agrees(&stats, &backing);
}

#[test]
fn a_cap_of_zero_caches_nothing() {
    let (cache, backing) = capped(CLASSES, 0);
    for size in [1, 64, 100, 5000] {
        give(&cache, take(&cache, l(size)));
        give(&cache, take(&cache, l(size)));
    }
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (0, 8));
    assert_eq!(stats.peak_bytes_cached, 0);
    assert_eq!(stats.evictions, 8);
    assert_eq!(stats.bytes_evicted, 2 * (64 + 64 + 128 + 5120));
    assert_eq!(backing.live_blocks(), 0);
    assert_cache_agrees(&stats, &backing);
    assert_eq!(cache.max_cached_bytes(), Some(0));
}

#[test]
fn trim_returns_the_exact_bytes_and_evicts_oldest_first() {
    // Without a cap (the oldest block is searched for) and with one (kept in
    // an age index).
    for cap in [None, Some(1 << 20)] {
        let backing = Counting::new();
        let mut builder = CachingAllocator::builder().size_policy(CLASSES);
        if let Some(cap) = cap {
            builder = builder.max_cached_bytes(cap);
        }
        let cache = builder.build_in(backing.clone());
        let blocks: Vec<Held> = [l(1000), la(1025, 256), l(10), l(4097)]
            .into_iter()
            .map(|layout| take(&cache, layout))
            .collect();
        let addrs: Vec<usize> = blocks.iter().map(Held::addr).collect();
        for block in blocks {
            give(&cache, block);
        }
        // Classes 1024, 1280, 64, 5120: 7488 cached.
        assert_eq!(cache.stats().bytes_cached, 7488);
        assert_eq!(cache.trim(7488), 0);
        assert_eq!(cache.trim(usize::MAX), 0);
        assert!(backing.returned().is_empty());

        // 7488 -> 6464 -> 5184 <= 6000: the two oldest.
        assert_eq!(cache.trim(6000), 1024 + 1280, "{cap:?}");
        assert_eq!(
            backing.returned(),
            [(addrs[0], la(1024, 64)), (addrs[1], la(1280, 256))]
        );
        let stats = cache.stats();
        assert_eq!((stats.bytes_cached, stats.blocks_cached), (5184, 2));
        assert_eq!((stats.evictions, stats.bytes_evicted), (2, 2304));
        assert_eq!((stats.releases, stats.bytes_released), (0, 0));
        assert_cache_agrees(&stats, &backing);

        // Exactly at the target: nothing more goes.
        assert_eq!(cache.trim(5184), 0);
        assert_eq!(cache.trim(5183), 64);
        assert_eq!(cache.trim(0), 5120);
        assert_eq!(backing.returned().last(), Some(&(addrs[3], la(5120, 64))));
        assert_eq!(backing.live_blocks(), 0);
        let stats = cache.stats();
        assert_eq!((stats.evictions, stats.bytes_evicted), (4, 7488));
        assert_eq!(stats.backing_frees, 4);
        assert_eq!(cache.trim(0), 0);

        // The cache keeps working after a trim.
        give(&cache, take(&cache, l(1000)));
        assert_eq!(cache.stats().bytes_cached, 1024);
    }
}

#[test]
fn trim_leaves_blocks_in_use_alone() {
    let (cache, backing) = with_policy(SizePolicy::Exact);
    let kept = take(&cache, l(512));
    kept.fill(4);
    give(&cache, take(&cache, l(256)));
    assert_eq!(cache.trim(0), 256);
    assert!(kept.bytes() == pattern(4, 512));
    assert_eq!(live_set(&backing), BTreeSet::from([kept.addr()]));
    give(&cache, kept);
    assert_eq!(cache.stats().bytes_cached, 512);
}

#[test]
fn stop_caching_after_failure_sends_later_frees_straight_back() {
    let failing = Counting::new();
    let counting = failing.clone();
    let cache = CachingAllocator::builder()
        .size_policy(CLASSES)
        .stop_caching_after_failure(true)
        .build_in(failing.clone());
    let held = take(&cache, l(3000));
    give(&cache, take(&cache, l(1000)));
    assert_eq!(cache.stats().bytes_cached, 1024);

    // One failure that the retry fixes does not stop caching.
    failing.fail_next(1);
    give(&cache, take(&cache, l(5000)));
    assert!(!cache.is_caching_stopped());
    let stats = cache.stats();
    assert_eq!((stats.retries, stats.releases, stats.failures), (1, 1, 0));
    assert_eq!(stats.bytes_cached, 5120, "the 5000-byte block was cached");

    // A request with no possible block fails without reaching the backing:
    // not an out-of-memory, caching goes on.
    assert!(cache.allocate(la(isize::MAX as usize - 62, 1)).is_err());
    assert!(!cache.is_caching_stopped());

    // Counting again after the release: caching stops.
    failing.fail_next(2);
    assert!(cache.allocate(l(7000)).is_err());
    assert!(cache.is_caching_stopped());
    let stats = cache.stats();
    assert_eq!((stats.retries, stats.releases, stats.failures), (2, 2, 2));
    assert_eq!(stats.bytes_cached, 0, "the retry released the cache");
    let evictions = stats.evictions;

    // Later frees go straight back, counted as evictions and backing frees.
    let addr = held.addr();
    give(&cache, held);
    assert!(!counting.is_live(addr));
    assert_eq!(counting.returned().last(), Some(&(addr, la(3072, 64))));
    let again = take(&cache, l(64));
    give(&cache, again);
    let stats = cache.stats();
    assert_eq!(stats.bytes_cached, 0);
    assert_eq!(stats.evictions, evictions + 2);
    assert_eq!(stats.bytes_evicted, 3072 + 64);
    assert_eq!(stats.misses, 4);
    assert_eq!(stats.hits, 0);
    assert_eq!(counting.live_blocks(), 0);
    assert_eq!(counting.live_bytes(), stats.bytes_reserved);
    assert_eq!(counting.frees(), stats.backing_frees);
    assert!(cache.is_caching_stopped(), "stopping is for good");
}

#[test]
fn by_default_caching_goes_on_after_a_failure() {
    let (cache, failing) = built(CachingAllocator::builder().size_policy(CLASSES));
    failing.fail_next(2);
    assert!(cache.allocate(l(7000)).is_err());
    assert!(!cache.is_caching_stopped());
    let block = take(&cache, l(7000));
    give(&cache, block);
    let stats = cache.stats();
    assert_eq!(stats.failures, 1);
    assert_eq!(stats.bytes_cached, 7168);
    assert_eq!(stats.evictions, 0);
    drop(cache);
    assert_eq!(failing.live_blocks(), 0);
}

#[test]
fn every_block_goes_back_once_with_its_class_layout() {
    for policy in [
        SizePolicy::Exact,
        SizePolicy::PowerOfTwoDivisions(1),
        SizePolicy::PowerOfTwoDivisions(2),
        SizePolicy::PowerOfTwoDivisions(8),
    ] {
        for cap in [None, Some(8192)] {
            let backing = Counting::new();
            let mut builder = CachingAllocator::builder().size_policy(policy);
            if let Some(cap) = cap {
                builder = builder.max_cached_bytes(cap);
            }
            let cache = builder.build_in(backing.clone());
            let mut rng = Rng::new(3);
            let mut live: Vec<Held> = Vec::new();
            let mut requested = Vec::new();
            for _ in 0..400 {
                if live.is_empty() || rng.below(2) == 0 {
                    let layout = la(1 + rng.below(6000), [1, 16, 64, 128, 4096][rng.below(5)]);
                    let misses = cache.stats().misses;
                    live.push(take(&cache, layout));
                    if cache.stats().misses > misses {
                        requested.push(layout);
                    }
                } else {
                    let i = rng.below(live.len());
                    give(&cache, live.swap_remove(i));
                }
            }
            // Each miss took a block of its request's class layout.
            let expected: Vec<Layout> =
                requested.iter().map(|&r| class_layout(policy, r)).collect();
            assert_eq!(backing.history(), expected, "{policy:?} {cap:?}");
            for block in live {
                give(&cache, block);
            }
            let clone = cache.clone();
            drop(cache);
            assert!(backing.live_blocks() > 0, "a clone keeps the cache alive");
            drop(clone);
            assert_eq!(backing.live_blocks(), 0, "{policy:?} {cap:?}");
            assert_eq!(backing.frees(), backing.allocs());
            // Counting panicked on any layout mismatch or double return; and
            // every layout returned is a class layout.
            assert!(backing.returned().iter().all(|&(_, layout)| {
                reference_class(policy, layout.size()) == Some(layout.size())
                    && layout.align() >= 64
            }));
        }
    }
}

#[test]
fn zero_sized_requests_never_reach_the_backing() {
    let (cache, backing) = capped(CLASSES, 0);
    let ptr = cache.allocate(la(0, 32)).unwrap();
    assert_eq!(ptr.len(), 0);
    assert_eq!(ptr.cast::<u8>().as_ptr() as usize % 32, 0);
    // SAFETY: handed out above for this layout.
    unsafe { cache.deallocate(ptr.cast(), la(0, 32)) };
    assert_eq!(backing.allocs(), 0);
    assert_stats_eq(&cache.stats(), &Stats::default());
}

#[test]
fn the_builder_settings_are_reported() {
    let plain = CachingAllocator::new();
    assert_eq!(plain.size_policy(), SizePolicy::Exact);
    assert_eq!(plain.max_cached_bytes(), None);
    assert!(plain.budget().is_none());
    assert!(!plain.is_caching_stopped());

    let configured = CachingAllocator::builder()
        .size_policy(SizePolicy::PowerOfTwoDivisions(8))
        .max_cached_bytes(1 << 20)
        .stop_caching_after_failure(true)
        .build();
    assert_eq!(configured.size_policy(), SizePolicy::PowerOfTwoDivisions(8));
    assert_eq!(configured.max_cached_bytes(), Some(1 << 20));
    assert!(configured.budget().is_none());
    assert!(!configured.is_caching_stopped());
    let clone = configured.clone();
    assert_eq!(clone.max_cached_bytes(), Some(1 << 20));
    // A builder can be reused: each build is its own cache.
    let builder = CachingAllocator::builder().max_cached_bytes(10);
    let a = builder.clone().build();
    let b = builder.build();
    assert!(!a.same_cache(&b));
}

#[test]
fn grow_across_classes_under_a_cap_evicts_for_the_old_block() {
    let (cache, backing) = capped(CLASSES, 2048);
    let old = take(&cache, l(1000)); // 1024
    let cached = take(&cache, l(1500)); // 1536
    let cached_addr = cached.addr();
    give(&cache, cached);
    old.fill(5);
    // SAFETY: `old` is live for 1000 bytes; 3000 is larger.
    let grown = unsafe { cache.grow(old.ptr, l(1000), l(3000)) }.unwrap();
    // The old 1024-byte block is cached: 1536 + 1024 > 2048 evicts the
    // 1536-byte one.
    assert_eq!(backing.returned(), [(cached_addr, la(1536, 64))]);
    assert!(backing.is_live(old.addr()));
    let grown = Held {
        ptr: grown.cast(),
        layout: l(3000),
    };
    assert!(grown.bytes()[..1000] == *pattern(5, 1000));
    let stats = cache.stats();
    assert_eq!((stats.bytes_cached, stats.evictions), (1024, 1));
    assert_eq!(stats.bytes_lost_to_rounding, 72);
    give(&cache, grown);
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

//! Several caches on one `Budget`: the sum of their cached bytes stays within
//! the limit, the block cached longest ago goes first whichever cache holds
//! it, and every block still goes back to its own backing allocator once,
//! with its own layout.
//!
//! Each cache runs over its own `Counting` backing, so the tests see which
//! cache gave back which block (and a block returned to the wrong backing
//! panics there as a foreign pointer).

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::thread;

use crate::fixture::{
    Counting, Held, Rng, assert_cache_agrees, built, cache_one, give_stamped as give, l,
    reference_class, take,
};
use allocator_api2::alloc::{Allocator, Layout};
use caching_allocator::{Budget, CachingAllocator, SizePolicy};

type Cache = CachingAllocator<Counting>;

fn block_layout(size: usize) -> Layout {
    Layout::from_size_align(size, 64).unwrap()
}

fn member(budget: &Budget) -> (Cache, Counting) {
    built(CachingAllocator::builder().budget(budget))
}

/// At rest: the budget counts exactly its members' cached bytes, within the
/// limit, and every backing holds exactly what its cache reserved.
fn assert_at_rest(budget: &Budget, members: &[(&Cache, &Counting)]) {
    let sum: usize = members.iter().map(|(c, _)| c.stats().bytes_cached).sum();
    assert!(
        sum <= budget.limit(),
        "{sum} cached over a limit of {}",
        budget.limit()
    );
    assert_eq!(budget.bytes_cached(), sum, "{budget:?}");
    for (cache, backing) in members {
        assert_cache_agrees(&cache.stats(), backing);
    }
}

/// Once every member is dropped: the budget and every backing hold nothing,
/// and every block went back once.
fn assert_all_back(budget: &Budget, backings: &[Counting]) {
    assert_eq!(budget.bytes_cached(), 0);
    for backing in backings {
        backing.assert_all_returned();
    }
}

#[test]
fn a_budget_is_send_sync_and_clone() {
    fn assert_shareable<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}
    assert_shareable::<Budget>();
    assert_shareable::<CachingAllocator<Counting>>();
    let budget = Budget::new(1234);
    assert_eq!((budget.limit(), budget.bytes_cached()), (1234, 0));
    let text = format!("{budget:?}");
    assert!(text.contains("1234"), "{text}");
}

#[test]
fn an_idle_cache_yields_to_a_busy_one() {
    let budget = Budget::new(10_000);
    let (idle, idle_backing) = member(&budget);
    let (busy, busy_backing) = member(&budget);
    let idle_addr = cache_one(&idle, 4000);
    let first = cache_one(&busy, 4000);
    assert_eq!(budget.bytes_cached(), 8000);
    // 8000 + 4000 > 10_000: the oldest block, the idle cache's, goes back to
    // the idle cache's backing.
    let held = take(&busy, l(3000));
    let second = take(&busy, l(4001));
    give(&busy, second);
    assert_eq!(idle_backing.returned(), [(idle_addr, block_layout(4000))]);
    assert!(busy_backing.returned().is_empty());
    assert!(busy_backing.is_live(first));
    let idle_stats = idle.stats();
    assert_eq!(
        (
            idle_stats.bytes_cached,
            idle_stats.evictions,
            idle_stats.bytes_evicted
        ),
        (0, 1, 4000)
    );
    assert_eq!(busy.stats().evictions, 0);
    assert_eq!(budget.bytes_cached(), 8001);
    // Then the busy cache's own oldest: 8001 + 3000 > 10_000.
    give(&busy, held);
    assert_eq!(busy_backing.returned(), [(first, block_layout(4000))]);
    assert_eq!(busy.stats().bytes_cached, 7001);
    assert_eq!(busy.stats().evictions, 1);
    assert_at_rest(&budget, &[(&idle, &idle_backing), (&busy, &busy_backing)]);
}

#[test]
fn three_caches_give_back_in_the_order_their_blocks_were_freed() {
    let budget = Budget::new(5000);
    let members: Vec<(Cache, Counting)> = (0..3).map(|_| member(&budget)).collect();
    let [a, b, c] = &members[..] else {
        unreachable!()
    };
    // Freed in the order a1, b1, c1, a2, b2: one clock for all members.
    let blocks: Vec<Held> = [&a.0, &b.0, &c.0, &a.0, &b.0]
        .iter()
        .map(|cache| take(cache, l(1000)))
        .collect();
    let addrs: Vec<usize> = blocks.iter().map(Held::addr).collect();
    let owners = [&a.0, &b.0, &c.0, &a.0, &b.0];
    for (cache, block) in owners.iter().zip(blocks) {
        give(cache, block);
    }
    assert_eq!(budget.bytes_cached(), 5000);

    // 3000 more: a1, b1 and c1 go, in that order across three backings.
    let c2 = cache_one(&c.0, 3000);
    assert_eq!(a.1.returned(), [(addrs[0], block_layout(1000))]);
    assert_eq!(b.1.returned(), [(addrs[1], block_layout(1000))]);
    assert_eq!(c.1.returned(), [(addrs[2], block_layout(1000))]);
    for (cache, _) in &members {
        assert_eq!(cache.stats().evictions, 1);
    }
    assert!(a.1.is_live(addrs[3]) && b.1.is_live(addrs[4]) && c.1.is_live(c2));
    assert_eq!(budget.bytes_cached(), 5000);

    // 1500 more into b: the oldest left is a2.
    cache_one(&b.0, 1500);
    let returned = a.1.returned();
    assert_eq!(returned.last(), Some(&(addrs[3], block_layout(1000))));
    // 1500 does not fit beside b2 (1000) and c2 (3000) once a2 went: b2 too.
    assert_eq!(b.1.returned().last(), Some(&(addrs[4], block_layout(1000))));
    assert_eq!(budget.bytes_cached(), 4500);
    let refs: Vec<(&Cache, &Counting)> = members.iter().map(|(c, b)| (c, b)).collect();
    assert_at_rest(&budget, &refs);
}

#[test]
fn the_sum_stays_within_the_limit_after_every_operation() {
    let budget = Budget::new(16_384);
    let backings: Vec<Counting> = (0..3).map(|_| Counting::new()).collect();
    let caches: Vec<Cache> = vec![
        CachingAllocator::builder()
            .budget(&budget)
            .build_in(backings[0].clone()),
        CachingAllocator::builder()
            .budget(&budget)
            .size_policy(SizePolicy::PowerOfTwoDivisions(4))
            .build_in(backings[1].clone()),
        CachingAllocator::builder()
            .budget(&budget)
            .size_policy(SizePolicy::PowerOfTwoDivisions(1))
            .max_cached_bytes(6000)
            .build_in(backings[2].clone()),
    ];
    let members: Vec<(&Cache, &Counting)> = caches.iter().zip(&backings).collect();
    let mut rng = Rng::new(11);
    let mut live: Vec<(usize, Held)> = Vec::new();
    for step in 0..3000 {
        let k = rng.below(3);
        match rng.below(12) {
            0..=4 => {
                let size = 1 + rng.below(7000);
                let align = [1, 64, 512][rng.below(3)];
                let layout = Layout::from_size_align(size, align).unwrap();
                live.push((k, take(&caches[k], layout)));
            }
            5..=9 if !live.is_empty() => {
                let (owner, held) = live.swap_remove(rng.below(live.len()));
                give(&caches[owner], held);
            }
            10 => {
                let target = rng.below(8000);
                let before = caches[k].stats().bytes_cached;
                let trimmed = caches[k].trim(target);
                assert_eq!(before - caches[k].stats().bytes_cached, trimmed);
            }
            _ => {
                if rng.below(4) == 0 {
                    let cached = caches[k].stats().bytes_cached;
                    assert_eq!(caches[k].release_cached(), cached);
                }
            }
        }
        assert_at_rest(&budget, &members);
        assert!(caches[2].stats().bytes_cached <= 6000, "step {step}");
    }
    let evictions: u64 = caches.iter().map(|c| c.stats().evictions).sum();
    assert!(evictions > 10, "the budget never had to act");
    for (owner, held) in live {
        give(&caches[owner], held);
    }
    assert_at_rest(&budget, &members);
    drop(members);
    drop(caches);
    assert_all_back(&budget, &backings);
}

#[test]
fn a_block_larger_than_the_limit_is_not_cached_and_evicts_nothing() {
    let budget = Budget::new(4096);
    let (a, a_backing) = member(&budget);
    let (b, b_backing) = member(&budget);
    let small = cache_one(&a, 4000);
    let big = cache_one(&b, 4097);
    assert!(!b_backing.is_live(big));
    assert!(a_backing.is_live(small), "nothing was evicted for it");
    assert_eq!(budget.bytes_cached(), 4000);
    let stats = b.stats();
    assert_eq!((stats.bytes_cached, stats.evictions), (0, 1));
    assert_eq!((stats.bytes_evicted, stats.backing_frees), (4097, 1));
    assert_eq!(a.stats().evictions, 0);
    // Exactly the limit fits (after the other block goes).
    let exact = cache_one(&b, 4096);
    assert!(b_backing.is_live(exact));
    assert!(!a_backing.is_live(small));
    assert_eq!(budget.bytes_cached(), 4096);
    assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
}

#[test]
fn a_hit_gives_its_bytes_back_to_the_budget() {
    let budget = Budget::new(1 << 20);
    let (a, a_backing) = member(&budget);
    let (b, b_backing) = member(&budget);
    cache_one(&a, 1000);
    cache_one(&b, 3000);
    assert_eq!(budget.bytes_cached(), 4000);
    let hit = take(&a, l(1000));
    assert_eq!(a.stats().hits, 1);
    assert_eq!(budget.bytes_cached(), 3000);
    assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
    let hit2 = take(&b, l(3000));
    assert_eq!(budget.bytes_cached(), 0);
    give(&a, hit);
    give(&b, hit2);
    assert_eq!(budget.bytes_cached(), 4000);
    assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
}

#[test]
fn size_classes_reserve_their_class_bytes() {
    let budget = Budget::new(3000);
    let backing = Counting::new();
    let policy = SizePolicy::PowerOfTwoDivisions(4);
    let cache = CachingAllocator::builder()
        .budget(&budget)
        .size_policy(policy)
        .build_in(backing.clone());
    let (other, other_backing) = member(&budget);
    let kept = cache_one(&other, 1000);
    // 1025 bytes take a 1280-byte block; 1000 + 1280 <= 3000.
    cache_one(&cache, 1025);
    assert_eq!(budget.bytes_cached(), 1000 + 1280);
    assert_eq!(reference_class(policy, 1025), Some(1280));
    // 700 bytes take 768: 3048 > 3000, the other cache's older block goes.
    cache_one(&cache, 700);
    assert!(!other_backing.is_live(kept));
    assert_eq!(budget.bytes_cached(), 1280 + 768);
    assert_eq!(cache.stats().bytes_cached, 2048);
    assert_at_rest(&budget, &[(&cache, &backing), (&other, &other_backing)]);
}

#[test]
fn dropping_a_member_releases_its_share() {
    let budget = Budget::new(10_000);
    let (a, a_backing) = member(&budget);
    let (b, b_backing) = member(&budget);
    cache_one(&a, 3000);
    cache_one(&a, 2000);
    cache_one(&b, 1000);
    assert_eq!(budget.bytes_cached(), 6000);
    // A clone going away releases nothing.
    let a2 = a.clone();
    drop(a2);
    assert_eq!(budget.bytes_cached(), 6000);
    drop(a);
    assert_eq!(budget.bytes_cached(), 1000);
    assert_eq!(a_backing.live_blocks(), 0);
    // The budget carries on without it: b can now cache the rest, and a
    // full budget evicts from b alone.
    cache_one(&b, 9000);
    assert_eq!(budget.bytes_cached(), 10_000);
    cache_one(&b, 500);
    assert_eq!(budget.bytes_cached(), 9500);
    assert_eq!(b.stats().evictions, 1);
    assert_at_rest(&budget, &[(&b, &b_backing)]);
    // A new member joins the same budget.
    let (c, c_backing) = member(&budget);
    cache_one(&c, 2000);
    assert_eq!(
        budget.bytes_cached(),
        2500,
        "b's 9000-byte block was oldest"
    );
    assert_at_rest(&budget, &[(&b, &b_backing), (&c, &c_backing)]);
    drop(b);
    drop(c);
    assert_eq!(budget.bytes_cached(), 0);
    assert_eq!(b_backing.live_blocks() + c_backing.live_blocks(), 0);
}

#[test]
fn clones_share_the_budget() {
    let budget = Budget::new(5000);
    let clone = budget.clone();
    let (a, a_backing) = member(&budget);
    let (b, b_backing) = member(&clone);
    let first = cache_one(&a, 3000);
    assert_eq!(clone.bytes_cached(), 3000);
    assert_eq!(clone.limit(), 5000);
    cache_one(&b, 3000);
    assert!(
        !a_backing.is_live(first),
        "a block on the clone evicted one"
    );
    assert_eq!(budget.bytes_cached(), 3000);
    // A cache's handles report the budget they share.
    let a_handle = a.clone();
    let reported = a_handle.budget().expect("built with a budget");
    assert_eq!(reported.limit(), 5000);
    assert_eq!(reported.bytes_cached(), budget.bytes_cached());
    // The budget lives on while members use it, even with no handle left
    // outside them.
    drop(budget);
    drop(clone);
    cache_one(&a_handle, 2500);
    assert_eq!(b.stats().bytes_cached, 0, "b's block was the oldest");
    let reported = a.budget().unwrap();
    assert_eq!(reported.bytes_cached(), 2500);
    drop(a_handle);
    let total = a.stats().bytes_cached + b.stats().bytes_cached;
    assert_eq!(a.budget().unwrap().bytes_cached(), total);
    assert_eq!(b_backing.live_bytes(), b.stats().bytes_reserved);
}

#[test]
fn the_cap_and_the_budget_both_hold() {
    let budget = Budget::new(8000);
    let (capped, backing) = built(
        CachingAllocator::builder()
            .budget(&budget)
            .max_cached_bytes(3000),
    );
    let (other, other_backing) = member(&budget);
    let mut rng = Rng::new(5);
    for _ in 0..500 {
        let size = 1 + rng.below(3500);
        let cache = if rng.below(2) == 0 { &capped } else { &other };
        let a = take(cache, l(size));
        let b = take(cache, l(1 + rng.below(3500)));
        give(cache, a);
        give(cache, b);
        assert!(capped.stats().bytes_cached <= 3000);
        assert_at_rest(&budget, &[(&capped, &backing), (&other, &other_backing)]);
    }
    assert!(capped.stats().evictions > 0 && other.stats().evictions > 0);
}

#[test]
fn trim_and_release_give_bytes_back_to_the_budget() {
    let budget = Budget::new(1 << 20);
    let (a, a_backing) = member(&budget);
    let (b, b_backing) = member(&budget);
    for size in [100, 200, 300] {
        cache_one(&a, size);
        cache_one(&b, size * 10);
    }
    assert_eq!(budget.bytes_cached(), 600 + 6000);
    assert_eq!(a.trim(300), 300, "the two oldest of a: 100 and 200");
    assert_eq!(budget.bytes_cached(), 300 + 6000);
    assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
    assert_eq!(b.release_cached(), 6000);
    assert_eq!(budget.bytes_cached(), 300);
    assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
}

#[test]
fn a_budget_of_zero_caches_nothing() {
    let budget = Budget::new(0);
    let (a, a_backing) = member(&budget);
    for size in [1, 64, 5000] {
        cache_one(&a, size);
    }
    assert_eq!(a_backing.live_blocks(), 0);
    let stats = a.stats();
    assert_eq!((stats.bytes_cached, stats.evictions), (0, 3));
    assert_eq!(stats.bytes_evicted, 1 + 64 + 5000);
    assert_eq!(budget.bytes_cached(), 0);
}

/// A cache whose cap keeps a block out must give it straight back: making
/// room on the budget for it would evict the other members' blocks for
/// nothing.
#[test]
fn a_block_over_its_caches_cap_evicts_nothing_from_the_budget() {
    let budget = Budget::new(10_000);
    let (other, other_backing) = member(&budget);
    let (capped, backing) = built(
        CachingAllocator::builder()
            .budget(&budget)
            .max_cached_bytes(1000),
    );
    let kept = cache_one(&other, 8000);
    // 3000 > the cap of 1000: not cached, whatever the budget holds.
    let big = cache_one(&capped, 3000);
    assert!(!backing.is_live(big));
    assert_eq!(capped.stats().bytes_cached, 0);
    assert!(
        other_backing.is_live(kept),
        "the other cache lost its block to a free that was never going to be cached: {:?}",
        other.stats()
    );
    assert_eq!(other.stats().evictions, 0);
    assert_eq!(budget.bytes_cached(), 8000);
}

/// After caching stopped, frees go straight back; they must not evict the
/// other members' blocks on their way.
#[test]
fn a_cache_that_stopped_caching_evicts_nothing_from_the_budget() {
    let budget = Budget::new(10_000);
    let (other, other_backing) = member(&budget);
    let (stopped, failing) = built(
        CachingAllocator::builder()
            .budget(&budget)
            .stop_caching_after_failure(true),
    );
    let held = take(&stopped, l(3000));
    failing.fail_next(2);
    assert!(stopped.allocate(l(5000)).is_err());
    assert!(stopped.is_caching_stopped());
    let kept = cache_one(&other, 8000);
    give(&stopped, held);
    assert_eq!(failing.live_blocks(), 0, "went straight back");
    assert_eq!(stopped.stats().bytes_cached, 0);
    assert!(
        other_backing.is_live(kept),
        "the other cache lost its block to a free that was never going to be cached: {:?}",
        other.stats()
    );
    assert_eq!(budget.bytes_cached(), 8000);
}

/// Four threads, each with its own cache on one budget, each also taking
/// blocks from its neighbour's cache and handing blocks of its own cache to
/// its neighbour to free (so every cache is freed into from two threads).
#[test]
fn threads_with_their_own_caches_keep_the_budget() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 4000;
    let budget = Budget::new(24 * 1024);
    let backings: Vec<Counting> = (0..THREADS).map(|_| Counting::new()).collect();
    let caches: Vec<Cache> = backings
        .iter()
        .enumerate()
        .map(|(i, backing)| {
            let mut builder = CachingAllocator::builder().budget(&budget);
            if i % 2 == 1 {
                builder = builder.size_policy(SizePolicy::PowerOfTwoDivisions(2));
            }
            builder.build_in(backing.clone())
        })
        .collect();
    // Thread i sends blocks of its cache to thread i + 1, which frees them.
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS)
        .map(|_| mpsc::channel::<(usize, Held)>())
        .unzip();
    let mut receivers: Vec<Option<mpsc::Receiver<(usize, Held)>>> =
        receivers.into_iter().map(Some).collect();
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let caches = caches.clone();
            let budget = budget.clone();
            let to_next = senders[(i + 1) % THREADS].clone();
            let from_prev = receivers[i].take().unwrap();
            thread::spawn(move || {
                let mut rng = Rng::new(i as u64 + 100);
                let own = &caches[i];
                let neighbour = &caches[(i + 1) % THREADS];
                let mut held: Vec<(usize, Held)> = Vec::new();
                for round in 0..ROUNDS {
                    // A few sizes, some varied a little: exact caches hit too.
                    let size = [64, 100, 1000, 1500, 4096, 6000][rng.below(6)]
                        + rng.below(2) * rng.below(64);
                    match rng.below(4) {
                        0 | 1 => held.push((i, take(own, l(size)))),
                        2 => held.push(((i + 1) % THREADS, take(neighbour, l(size)))),
                        _ => {
                            let block = take(own, l(size));
                            // The receiver may have finished: then free it here.
                            if let Err(mpsc::SendError(block)) = to_next.send((i, block)) {
                                give(own, block.1);
                            }
                        }
                    }
                    while held.len() > 3 {
                        let (owner, block) = held.swap_remove(rng.below(held.len()));
                        give(&caches[owner], block);
                        assert!(budget.bytes_cached() <= budget.limit());
                    }
                    while let Ok((owner, block)) = from_prev.try_recv() {
                        give(&caches[owner], block);
                        assert!(budget.bytes_cached() <= budget.limit());
                    }
                    if round % 100 == 99 {
                        own.trim(4096);
                    }
                    assert!(budget.bytes_cached() <= budget.limit());
                }
                for (owner, block) in held {
                    give(&caches[owner], block);
                }
                from_prev
            })
        })
        .collect();
    drop(senders);
    let leftovers: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    for receiver in leftovers {
        for (owner, block) in receiver.try_iter() {
            give(&caches[owner], block);
        }
    }
    let members: Vec<(&Cache, &Counting)> = caches.iter().zip(&backings).collect();
    assert_at_rest(&budget, &members);
    for cache in &caches {
        let stats = cache.stats();
        assert_eq!(stats.bytes_in_use, 0, "{stats:?}");
        assert!(stats.hits > 0, "{stats:?}");
    }
    let evictions: u64 = caches.iter().map(|c| c.stats().evictions).sum();
    assert!(evictions > 0);
    drop(members);
    drop(caches);
    assert_all_back(&budget, &backings);
}

/// Two caches on a budget of two small blocks, freed into from two threads:
/// nearly every free evicts, often the other cache's block, while the other
/// thread frees into that cache. It must simply finish.
#[test]
fn caches_evicting_each_other_do_not_deadlock() {
    let budget = Budget::new(128);
    let (a, a_backing) = member(&budget);
    let (b, b_backing) = member(&budget);
    let workers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|cache| {
            let budget = budget.clone();
            thread::spawn(move || {
                for i in 0..10_000usize {
                    // Two sizes, so a free often finds the budget full of the
                    // other size's blocks.
                    let first = take(&cache, l(64));
                    let second = take(&cache, l(64 + (i % 2)));
                    give(&cache, first);
                    give(&cache, second);
                    assert!(budget.bytes_cached() <= 128);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let stats = [a.stats(), b.stats()];
    assert!(stats.iter().all(|s| s.frees == 20_000));
    assert!(stats.iter().map(|s| s.evictions).sum::<u64>() > 0);
    assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
    drop((a, b));
    assert_eq!(a_backing.live_blocks() + b_backing.live_blocks(), 0);
    assert_eq!(budget.bytes_cached(), 0);
}

/// Several blocks of one cache, checked by address, stay where the age order
/// says: a sanity check of the address bookkeeping used above.
#[test]
fn a_member_evicts_its_own_oldest_when_it_holds_it() {
    let budget = Budget::new(3002);
    let (a, a_backing) = member(&budget);
    let (b, b_backing) = member(&budget);
    let first = cache_one(&a, 1000);
    let second = cache_one(&a, 1001);
    let other = cache_one(&b, 999);
    cache_one(&a, 1002);
    assert!(!a_backing.is_live(first));
    let live: BTreeSet<usize> = a_backing.live_layouts().iter().map(|p| p.0).collect();
    assert!(live.contains(&second));
    assert!(b_backing.is_live(other));
    assert_eq!(budget.bytes_cached(), 1001 + 999 + 1002);
    assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
}

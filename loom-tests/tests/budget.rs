//! Loom models of caches sharing one `Budget`: the budget's counter, clock
//! and member list, and each cache's lock, are loom's under `--cfg loom`, so
//! every interleaving of two caches evicting each other's blocks is explored
//! (up to the preemption bound: `LOOM_MAX_PREEMPTIONS`, default 2). Loom
//! reports a deadlock if two paths ever wait on each other's locks.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`.
#![cfg(loom)]

use caching_allocator::{Allocator, Budget, CachingAllocator};
use core::alloc::Layout;
use loom::thread;
use loom_tests::{Block, Counting, model, model_outcomes};

const SIZE: usize = 16;

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 8).unwrap()
}

type Cache = CachingAllocator<Counting>;

fn member(budget: &Budget) -> (Cache, Counting) {
    let backing = Counting::default();
    let cache = CachingAllocator::builder()
        .budget(budget)
        .build_in(backing.clone());
    (cache, backing)
}

fn take(cache: &Cache) -> Block {
    Block(cache.allocate(layout()).unwrap().cast())
}

fn give(cache: &Cache, block: Block) {
    // SAFETY: every `Block` here was handed out by `cache` for `layout()`
    // and is not used again.
    unsafe { cache.deallocate(block.0, layout()) };
}

/// A budget of `limit` bytes and two members on it.
fn pair(limit: usize) -> (Budget, (Cache, Counting), (Cache, Counting)) {
    let budget = Budget::new(limit);
    let (a, b) = (member(&budget), member(&budget));
    (budget, a, b)
}

/// Frees `block` into `cache` on a new thread, and checks the limit after.
fn give_on_a_thread(cache: &Cache, budget: &Budget, block: Block) -> thread::JoinHandle<()> {
    let (cache, budget) = (cache.clone(), budget.clone());
    thread::spawn(move || {
        give(&cache, block);
        assert_within(&budget);
    })
}

/// Once the members are dropped, their backings and the budget hold nothing.
fn assert_all_back(budget: &Budget, backings: &[&Counting]) {
    let live: usize = backings.iter().map(|b| b.live_blocks()).sum();
    assert_eq!(live, 0);
    assert_eq!(budget.bytes_cached(), 0);
}

fn assert_within(budget: &Budget) {
    let cached = budget.bytes_cached();
    assert!(cached <= budget.limit(), "{cached} over {}", budget.limit());
}

/// At rest: the budget counts exactly its members' cached bytes, within the
/// limit, and each backing holds what its cache reserved.
fn assert_at_rest(budget: &Budget, members: &[(&Cache, &Counting)]) {
    let sum: usize = members.iter().map(|(c, _)| c.stats().bytes_cached).sum();
    assert!(sum <= budget.limit(), "{sum} over {}", budget.limit());
    assert_eq!(budget.bytes_cached(), sum);
    for (cache, backing) in members {
        let stats = cache.stats();
        assert_eq!(backing.live_bytes(), stats.bytes_reserved, "{stats:?}");
        assert_eq!(
            backing.allocs_and_frees(),
            (stats.backing_allocs, stats.backing_frees),
            "{stats:?}"
        );
    }
}

/// Two threads free into two caches on a budget of one block, each after
/// the other cache cached one: every free must evict (its own or the other
/// cache's block) or give its block back, and the limit holds throughout.
#[test]
fn concurrent_frees_into_two_caches_stay_within_the_limit() {
    let outcomes = model_outcomes(|| {
        let (budget, (a, a_backing), (b, b_backing)) = pair(SIZE);
        let a_block = take(&a);
        let b_block = take(&b);
        // The budget starts full with a block of a's.
        give(&a, take(&a));
        assert_eq!(budget.bytes_cached(), SIZE);

        let worker = give_on_a_thread(&b, &budget, b_block);
        give(&a, a_block);
        assert_within(&budget);
        worker.join().unwrap();

        assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!((sa.frees, sb.frees), (2, 1));
        // Three blocks, room for one: two went back, one way or another.
        assert_eq!(sa.blocks_cached + sb.blocks_cached, 1, "{sa:?} {sb:?}");
        assert_eq!(sa.evictions + sb.evictions, 2, "{sa:?} {sb:?}");
        drop((a, b));
        assert_all_back(&budget, &[&a_backing, &b_backing]);
        (sa.blocks_cached, sb.blocks_cached)
    });
    // Both ways round were explored: b's free evicting a's block, and a's
    // free evicting b's (or finding the budget taken and giving its own back).
    assert_eq!(outcomes, std::collections::BTreeSet::from([(0, 1), (1, 0)]));
}

/// A hit in one cache races with a free into the other that needs the hit
/// block's room: the block is either handed out or evicted, never both, and
/// the budget's count comes out exact.
#[test]
fn a_hit_races_with_an_eviction_by_another_cache() {
    model(|| {
        let (budget, (a, a_backing), (b, b_backing)) = pair(SIZE);
        let b_block = take(&b);
        give(&a, take(&a));
        assert_eq!(budget.bytes_cached(), SIZE);

        let worker = give_on_a_thread(&b, &budget, b_block);
        let block = take(&a);
        // SAFETY: a live block of SIZE bytes owned by this thread: if the
        // other thread evicted it too, the ledger or this write shows it.
        unsafe { block.0.as_ptr().write_bytes(7, SIZE) };
        assert_within(&budget);
        worker.join().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { *block.0.as_ptr().add(SIZE - 1) }, 7);
        give(&a, block);
        assert_within(&budget);

        assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!(sa.hits + sa.misses, 2, "{sa:?}");
        assert_eq!(sa.bytes_in_use + sb.bytes_in_use, 0);
        drop((a, b));
        assert_all_back(&budget, &[&a_backing, &b_backing]);
    });
}

/// The last handle of a member is dropped while another member's free wants
/// the dropped member's block evicted: the block goes back exactly once
/// (released by the drop or evicted first), and the budget ends up counting
/// only the survivor.
#[test]
fn dropping_a_member_races_with_an_eviction_of_its_block() {
    let outcomes = model_outcomes(|| {
        let (budget, (a, a_backing), (b, b_backing)) = pair(SIZE);
        let b_block = take(&b);
        give(&a, take(&a));
        assert_eq!(budget.bytes_cached(), SIZE);

        let dropper = thread::spawn(move || drop(a));
        give(&b, b_block);
        assert_within(&budget);
        dropper.join().unwrap();

        assert_eq!(a_backing.live_blocks(), 0, "a's block went back once");
        assert_eq!(a_backing.allocs_and_frees(), (1, 1));
        assert_at_rest(&budget, &[(&b, &b_backing)]);
        let stats = b.stats();
        // b's block is cached unless the reservation found the budget held
        // by a's block that was already leaving (then b's went back).
        assert!(stats.blocks_cached <= 1, "{stats:?}");
        drop(b);
        assert_all_back(&budget, &[&b_backing]);
        stats.blocks_cached
    });
    // Both were explored: b's block cached (a's evicted or released first),
    // and b's block given back while a's release still held the budget.
    assert_eq!(outcomes, std::collections::BTreeSet::from([0, 1]));
}

/// Three threads: two free into their own caches while a third trims one of
/// them. No deadlock, no block lost or given back twice, the limit holds.
#[test]
fn trim_races_with_frees_on_one_budget() {
    model(|| {
        let (budget, (a, a_backing), (b, b_backing)) = pair(SIZE);
        let a_block = take(&a);
        let b_block = take(&b);
        give(&a, take(&a));

        let freer = give_on_a_thread(&b, &budget, b_block);
        let trimmer = {
            let a = a.clone();
            thread::spawn(move || a.trim(0))
        };
        give(&a, a_block);
        assert_within(&budget);
        freer.join().unwrap();
        let trimmed = trimmer.join().unwrap();
        assert_eq!(trimmed % SIZE, 0);

        assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
        let (sa, sb) = (a.stats(), b.stats());
        assert!(sa.blocks_cached + sb.blocks_cached <= 1, "{sa:?} {sb:?}");
        drop((a, b));
        assert_all_back(&budget, &[&a_backing, &b_backing]);
    });
}

/// Two threads, each freeing two blocks into its own cache (one of them
/// 32 bytes, so the budget of three small blocks must evict by size as well
/// as by count), with each cache holding a cached block to start with.
#[test]
fn two_threads_free_twice_into_their_caches() {
    model(|| {
        let (budget, (a, a_backing), (b, b_backing)) = pair(3 * SIZE);
        let big = Layout::from_size_align(2 * SIZE, 8).unwrap();
        let a_blocks = [take(&a), take(&a)];
        let b_small = take(&b);
        let b_big = Block(b.allocate(big).unwrap().cast());
        give(&b, take(&b));
        give(&a, take(&a));
        assert_eq!(budget.bytes_cached(), 2 * SIZE);

        let worker = {
            let (b, budget) = (b.clone(), budget.clone());
            thread::spawn(move || {
                // SAFETY: handed out by `b` for `big`, not used again.
                unsafe { b.deallocate(b_big.0, big) };
                assert_within(&budget);
                give(&b, b_small);
                assert_within(&budget);
            })
        };
        for block in a_blocks {
            give(&a, block);
            assert_within(&budget);
        }
        worker.join().unwrap();

        assert_at_rest(&budget, &[(&a, &a_backing), (&b, &b_backing)]);
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!((sa.frees, sb.frees), (3, 3));
        assert!(sa.bytes_cached + sb.bytes_cached <= 3 * SIZE);
        drop((a, b));
        assert_all_back(&budget, &[&a_backing, &b_backing]);
    });
}

/// A cache whose backing is another cache on the same budget: the upper
/// cache's eviction hands its block to the lower cache, whose own reservation
/// must evict again, while another thread takes and frees through the upper
/// cache. No lock is held across a backing call, so nothing deadlocks (loom
/// reports a deadlock as a failure), and the budget's books stay exact.
#[test]
fn layered_caches_on_one_budget_evict_through_each_other() {
    model(|| {
        // Room for the upper cache's two blocks, not for a third of any size.
        let budget = Budget::new(150);
        let backing = Counting::default();
        // The lower cache rounds the upper cache's 72-byte blocks up to 128:
        // giving one back needs more budget than evicting it freed.
        let lower = CachingAllocator::builder()
            .budget(&budget)
            .size_policy(caching_allocator::SizePolicy::PowerOfTwoDivisions(1))
            .build_in(backing.clone());
        let upper = CachingAllocator::builder()
            .budget(&budget)
            .build_in(lower.clone());
        let small = Layout::from_size_align(72, 8).unwrap();
        let big = Layout::from_size_align(128, 8).unwrap();
        let blocks = [small, small].map(|l| Block(upper.allocate(l).unwrap().cast()));
        for block in blocks {
            // SAFETY: handed out by `upper` for `small`, not used again.
            unsafe { upper.deallocate(block.0, small) };
        }
        let freed_below = Block(lower.allocate(big).unwrap().cast());

        let worker = {
            let upper = upper.clone();
            thread::spawn(move || {
                let block = upper.allocate(small).unwrap().cast::<u8>();
                // SAFETY: handed out by `upper` for `small`, not used again.
                unsafe { upper.deallocate(block, small) };
            })
        };
        // SAFETY: handed out by `lower` for `big`, not used again.
        unsafe { lower.deallocate(freed_below.0, big) };
        worker.join().unwrap();

        let (up, low) = (upper.stats(), lower.stats());
        assert_eq!(budget.bytes_cached(), up.bytes_cached + low.bytes_cached);
        assert_within(&budget);
        drop(upper);
        drop(lower);
        assert_eq!(backing.live_blocks(), 0);
        assert_eq!(budget.bytes_cached(), 0);
    });
}

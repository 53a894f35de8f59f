//! Loom models of caches sharing one `Budget`: the budget's counter, clock
//! and member list, and each cache's lock, are loom's under `--cfg loom`, so
//! every interleaving of two caches evicting each other's blocks is explored
//! (up to the preemption bound: `LOOM_MAX_PREEMPTIONS`, default 2). Loom
//! reports a deadlock if two paths ever wait on each other's locks.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`.
#![cfg(loom)]

use std::collections::BTreeMap;
use std::ptr::NonNull;

use caching_allocator::{AllocError, Allocator, Budget, CachingAllocator, Global};
use core::alloc::Layout;
use loom::sync::{Arc, Mutex};
use loom::thread;

/// Runs `f` under loom and returns the distinct outcomes it reported, so a
/// test can check that the races it is about were explored.
fn model_outcomes<T, F>(f: F) -> std::collections::BTreeSet<T>
where
    T: Ord + Send + 'static,
    F: Fn() -> T + Sync + Send + 'static,
{
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let sink = seen.clone();
    model(move || {
        let outcome = f();
        sink.lock().unwrap().insert(outcome);
    });
    std::mem::take(&mut *seen.lock().unwrap())
}

fn model<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(
        std::env::var("LOOM_MAX_PREEMPTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    );
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f()
    });
    eprintln!("RUNS {}", runs.load(std::sync::atomic::Ordering::Relaxed));
}

#[derive(Default)]
struct Ledger {
    live: BTreeMap<usize, Layout>,
    allocs: u64,
    frees: u64,
}

/// A backing allocator with a loom-visible ledger: panics on a double return,
/// a return with another layout, or a block it never handed out (a block
/// given back to the wrong cache's backing).
#[derive(Clone, Default)]
struct Counting {
    ledger: Arc<Mutex<Ledger>>,
}

impl Counting {
    fn live_blocks(&self) -> usize {
        self.ledger.lock().unwrap().live.len()
    }

    fn live_bytes(&self) -> usize {
        let ledger = self.ledger.lock().unwrap();
        ledger.live.values().map(Layout::size).sum()
    }

    fn allocs_and_frees(&self) -> (u64, u64) {
        let ledger = self.ledger.lock().unwrap();
        (ledger.allocs, ledger.frees)
    }
}

// SAFETY: blocks come from `Global` and go back to it unchanged.
unsafe impl Allocator for Counting {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let block = Global.allocate(layout)?;
        let mut ledger = self.ledger.lock().unwrap();
        let previous = ledger
            .live
            .insert(block.cast::<u8>().as_ptr() as usize, layout);
        assert!(
            previous.is_none(),
            "the global allocator handed out a live block"
        );
        ledger.allocs += 1;
        Ok(block)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        {
            let mut ledger = self.ledger.lock().unwrap();
            let recorded = ledger.live.remove(&(ptr.as_ptr() as usize));
            assert_eq!(
                recorded,
                Some(layout),
                "double return, wrong backing or layout mismatch"
            );
            ledger.frees += 1;
        }
        // SAFETY: the ledger had it live with this layout: it came from
        // `Global` with it and goes back once.
        unsafe { Global.deallocate(ptr, layout) }
    }
}

/// A block pointer that may cross threads.
struct Block(NonNull<u8>);

// SAFETY: a block is plain memory owned by whoever holds the pointer.
unsafe impl Send for Block {}

/// Every block is 16 bytes (exact sizes): the budget counts in these.
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
        let budget = Budget::new(SIZE);
        let (a, a_backing) = member(&budget);
        let (b, b_backing) = member(&budget);
        let a_block = take(&a);
        let b_block = take(&b);
        // The budget starts full with a block of a's.
        give(&a, take(&a));
        assert_eq!(budget.bytes_cached(), SIZE);

        let worker = {
            let (b, budget) = (b.clone(), budget.clone());
            thread::spawn(move || {
                give(&b, b_block);
                assert_within(&budget);
            })
        };
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
        assert_eq!(a_backing.live_blocks() + b_backing.live_blocks(), 0);
        assert_eq!(budget.bytes_cached(), 0);
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
        let budget = Budget::new(SIZE);
        let (a, a_backing) = member(&budget);
        let (b, b_backing) = member(&budget);
        let b_block = take(&b);
        give(&a, take(&a));
        assert_eq!(budget.bytes_cached(), SIZE);

        let worker = {
            let (b, budget) = (b.clone(), budget.clone());
            thread::spawn(move || {
                give(&b, b_block);
                assert_within(&budget);
            })
        };
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
        assert_eq!(a_backing.live_blocks() + b_backing.live_blocks(), 0);
        assert_eq!(budget.bytes_cached(), 0);
    });
}

/// The last handle of a member is dropped while another member's free wants
/// the dropped member's block evicted: the block goes back exactly once
/// (released by the drop or evicted first), and the budget ends up counting
/// only the survivor.
#[test]
fn dropping_a_member_races_with_an_eviction_of_its_block() {
    let outcomes = model_outcomes(|| {
        let budget = Budget::new(SIZE);
        let (a, a_backing) = member(&budget);
        let (b, b_backing) = member(&budget);
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
        assert_eq!(b_backing.live_blocks(), 0);
        assert_eq!(budget.bytes_cached(), 0);
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
        let budget = Budget::new(SIZE);
        let (a, a_backing) = member(&budget);
        let (b, b_backing) = member(&budget);
        let a_block = take(&a);
        let b_block = take(&b);
        give(&a, take(&a));

        let freer = {
            let (b, budget) = (b.clone(), budget.clone());
            thread::spawn(move || {
                give(&b, b_block);
                assert_within(&budget);
            })
        };
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
        assert_eq!(a_backing.live_blocks() + b_backing.live_blocks(), 0);
        assert_eq!(budget.bytes_cached(), 0);
    });
}

/// Two threads, each freeing two blocks into its own cache (one of them
/// 32 bytes, so the budget of three small blocks must evict by size as well
/// as by count), with each cache holding a cached block to start with.
#[test]
fn two_threads_free_twice_into_their_caches() {
    model(|| {
        let budget = Budget::new(3 * SIZE);
        let (a, a_backing) = member(&budget);
        let (b, b_backing) = member(&budget);
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
        assert_eq!(a_backing.live_blocks() + b_backing.live_blocks(), 0);
        assert_eq!(budget.bytes_cached(), 0);
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

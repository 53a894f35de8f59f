//! Regression tests for the soundness findings of an adversarial review: each
//! one failed (a use-after-free, a wrong owner, a hang, an unwind out of the
//! global allocator, wrong books) before its fix.
//!
//! This binary installs `ScopedGlobal`, so plain `Vec`s of at least 4 KiB
//! inside a scope come from the scope's cache. A scenario that used to hang
//! runs on its own thread with a timeout: a hang fails the test instead of
//! stalling the suite.

use std::alloc::Layout;
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use allocator_api2::alloc::{AllocError, Allocator};
use allocator_api2::vec::Vec as ApiVec;
use caching_allocator::plan::{Planned, Recorder};
use caching_allocator::{
    Budget, CachingAllocator, FRONT_CACHE_BYTES, Scope, ScopedGlobal, SizePolicy,
};
use fixture::{Counting, cache_one};

#[path = "all/fixture/mod.rs"]
mod fixture;

#[global_allocator]
static GLOBAL: ScopedGlobal = ScopedGlobal::new();

/// Runs `f` on a thread and fails the test if it does not finish in time.
fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    finished
        .recv_timeout(Duration::from_secs(if cfg!(miri) { 600 } else { 20 }))
        .unwrap_or_else(|_| panic!("{what}: hung (a deadlock) or panicked"))
}

/// Frees the blocks a panicking backing call kept (its hook panicked before
/// freeing them), once nothing else of `backing`'s is live, so that
/// LeakSanitizer and Miri see no leak.
fn free_what_the_backing_kept(backing: &Counting) {
    backing.clear_hook();
    for (addr, layout) in backing.live_layouts() {
        let block = NonNull::new(addr as *mut u8).unwrap();
        // SAFETY: the ledger has the block live with this layout, and no
        // cache holds it any more: the cache counted it as given back.
        unsafe { backing.deallocate(block, layout) };
    }
    backing.assert_all_returned();
}

/// Makes the `calls`-th backing call from now (0: the next) panic, before it
/// allocates or frees anything: a block handed to a panicking `deallocate`
/// stays live in the ledger (the backing's own leak), the cache counts it as
/// given back.
fn panic_on_call(backing: &Counting, calls: isize) {
    let countdown = Arc::new(AtomicIsize::new(calls));
    backing.set_hook(move || {
        if countdown.fetch_sub(1, Ordering::SeqCst) == 0 {
            panic!("the backing panics on purpose");
        }
    });
}

// 1. A backing allocator that ends the scope holding the cache's last count.

std::thread_local! {
    static HELD_SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

#[test]
fn a_backing_that_ends_the_scope_holding_the_last_count_frees_nothing_in_use() {
    let backing = Counting::new();
    // Every backing call ends this thread's held scope.
    backing.set_hook(|| drop(HELD_SCOPE.with(|held| held.borrow_mut().take())));
    let cache = CachingAllocator::new_in(backing.clone());
    HELD_SCOPE.with(|held| *held.borrow_mut() = Some(cache.enter()));
    drop(cache); // the held scope has the last count
    // The miss calls the backing, which ends the scope: the cache must live on.
    let block = vec![7u8; 8192];
    assert!(block.iter().all(|&b| b == 7));
    assert_eq!(backing.live_blocks(), 1);
    // The registry held the last count; freeing the block frees the cache,
    // which gives the block back.
    drop(block);
    backing.assert_all_returned();
}

// 2. A budget member dropped while another thread evicts from it.

#[test]
fn budget_members_come_and_go_while_others_evict_from_them() {
    let rounds = if cfg!(miri) { 20 } else { 300 };
    let budget = Budget::new(3 * 4096);
    let backing = Counting::without_log();
    let threads: Vec<_> = (0..2)
        .map(|seed| {
            let (budget, backing) = (budget.clone(), backing.clone());
            std::thread::spawn(move || {
                for round in 0..rounds {
                    let cache = CachingAllocator::builder()
                        .budget(&budget)
                        .build_in(backing.clone());
                    for i in 0..3 {
                        cache_one(&cache, 4096 * (1 + (i + round + seed) % 2));
                    }
                    if round % 3 == 0 {
                        cache.trim(4096);
                    }
                    drop(cache); // racing the other thread's evictions
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(budget.bytes_cached(), 0);
    backing.assert_all_returned();
}

// 3. Frees made inside the allocator reach the block's owner.

#[test]
fn a_planned_arena_dropped_as_an_orphan_gives_its_plan_copy_back_to_its_cache() {
    let recorder = Recorder::new();
    for _ in 0..300 {
        drop(ApiVec::<u8, _>::with_capacity_in(64, recorder.clone()));
    }
    let plan = recorder.plan();
    let cache = CachingAllocator::new();
    // The arena's copy of the plan (300 slots, over 4 KiB) is a block of `cache`.
    let planned = {
        let _scope = cache.enter();
        Planned::new(&plan)
    };
    // (And its per-size slot index, once that is over 4 KiB too.)
    let tables = cache.stats().blocks_in_use;
    assert!((1..=2).contains(&tables), "{tables}");
    // A scope block of the arena outlives every handle of it...
    let block = {
        let _scope = planned.enter();
        vec![1u8; 8192]
    };
    drop(planned);
    // ...so the arena is dropped inside this free, and frees its plan copy.
    drop(block);
    let stats = cache.stats();
    assert_eq!((stats.blocks_in_use, stats.blocks_cached), (0, tables));
    // The address is the cache's again, not a stale registry entry's: a plain
    // block there later goes to the system allocator, not to the cache.
    cache.release_cached();
    drop(vec![0u8; 8192]);
    assert_eq!(cache.stats().blocks_cached, 0);
}

/// A backing allocator large enough that a cache over it (its `Arc`) is over
/// the 4 KiB minimum, so it is a scope block when built inside a scope.
#[derive(Clone)]
struct Padded {
    _pad: [u8; 8192],
    inner: Counting,
}

// SAFETY: forwards to `Counting`.
unsafe impl Allocator for Padded {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.inner.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.deallocate(ptr, layout) }
    }
}

#[test]
fn a_cache_built_inside_another_caches_scope_goes_back_to_it_when_dropped_as_an_orphan() {
    let outer = CachingAllocator::new();
    let backing = Counting::new();
    let inner = {
        let _scope = outer.enter();
        CachingAllocator::new_in(Padded {
            _pad: [0; 8192],
            inner: backing.clone(),
        })
    };
    assert_eq!(
        outer.stats().blocks_in_use,
        1,
        "the inner cache lives in outer"
    );
    let block = {
        let _scope = inner.enter();
        vec![2u8; 8192]
    };
    drop(inner);
    drop(block); // the inner cache is freed inside this free
    backing.assert_all_returned();
    let stats = outer.stats();
    assert_eq!((stats.blocks_in_use, stats.blocks_cached), (0, 1));
}

// 4. `Recorder::plan()` inside the recorder's own scope.

#[test]
fn a_recorder_plans_inside_its_own_scope() {
    let slots = within("plan() inside the recorder's scope", || {
        let recorder = Recorder::new();
        let _scope = recorder.enter();
        for _ in 0..200 {
            drop(vec![0u8; 4096]);
        }
        // The planner's buffers are at least 4 KiB: they must not be routed
        // to the recorder, whose log lock `plan()` holds, nor be recorded.
        let planned = recorder.plan().allocations();
        (planned, recorder.allocations())
    });
    assert_eq!(slots, (200, 200), "(planned, recorded after planning)");
}

// 5. Layered caches on one budget, and budgets layered crosswise.

#[test]
fn a_cache_whose_backing_is_a_cache_on_the_same_budget_does_not_deadlock() {
    let (upper_cached, lower_cached, budget_cached) = within("layered caches", || {
        let budget = Budget::new(3000);
        // The lower cache rounds 1152 up to 2048: giving a block back to it
        // needs more budget than the upper cache's eviction freed.
        let lower = CachingAllocator::builder()
            .budget(&budget)
            .size_policy(SizePolicy::PowerOfTwoDivisions(1))
            .build();
        let upper = CachingAllocator::builder()
            .budget(&budget)
            .build_in(lower.clone());
        let a = ApiVec::<u8, _>::with_capacity_in(1152, upper.clone());
        let b = ApiVec::<u8, _>::with_capacity_in(1152, upper.clone());
        drop((a, b)); // the upper cache holds 2 x 1152
        // Caching 1024 bytes in the lower cache evicts the upper cache's
        // oldest block, which goes back to the lower cache, which must evict.
        drop(ApiVec::<u8, _>::with_capacity_in(1024, lower.clone()));
        (
            upper.stats().bytes_cached,
            lower.stats().bytes_cached,
            budget.bytes_cached(),
        )
    });
    assert_eq!(budget_cached, upper_cached + lower_cached);
    assert!(budget_cached <= 3000);
    assert!(lower_cached >= 1024, "the freed block was cached");
}

#[test]
fn budgets_layered_crosswise_do_not_deadlock() {
    let rounds = if cfg!(miri) { 3 } else { 20_000 };
    within("crosswise budgets", move || {
        let (p, q) = (Budget::new(8192), Budget::new(8192));
        let p_lower = CachingAllocator::builder().budget(&p).build();
        let q_lower = CachingAllocator::builder().budget(&q).build();
        // Each upper cache is on one budget and backed by a cache on the other.
        let p_upper = CachingAllocator::builder()
            .budget(&p)
            .build_in(q_lower.clone());
        let q_upper = CachingAllocator::builder()
            .budget(&q)
            .build_in(p_lower.clone());
        let threads: Vec<_> = [(p_upper, p_lower), (q_upper, q_lower)]
            .into_iter()
            .map(|(upper, lower)| {
                std::thread::spawn(move || {
                    for round in 0..rounds {
                        let bytes = 1024 * (1 + round % 4);
                        drop(ApiVec::<u8, _>::with_capacity_in(bytes, upper.clone()));
                        drop(ApiVec::<u8, _>::with_capacity_in(5000, lower.clone()));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(p.bytes_cached() <= p.limit() && q.bytes_cached() <= q.limit());
    });
}

// 6. Panics never unwind out of `ScopedGlobal`.

#[test]
fn a_backing_that_panics_inside_a_scope_does_not_unwind_out_of_the_global_allocator() {
    let backing = Counting::new();
    let cache = CachingAllocator::builder()
        .max_cached_bytes(0) // every free goes straight back to the backing
        .build_in(backing.clone());
    let scope = cache.enter();
    panic_on_call(&backing, 0);
    let served = panic::catch_unwind(|| vec![3u8; 8192]);
    let block = served.expect("a panic unwound out of `GlobalAlloc::alloc`");
    assert!(block.iter().all(|&b| b == 3));
    drop(block); // served by the inner allocator, freed there
    assert_eq!(backing.live_blocks(), 0);
    backing.clear_hook();
    // The cache still works, and a panicking free is contained too.
    let block = vec![4u8; 8192];
    assert_eq!(backing.live_blocks(), 1);
    panic_on_call(&backing, 0);
    let freed = panic::catch_unwind(AssertUnwindSafe(|| drop(block)));
    assert!(
        freed.is_ok(),
        "a panic unwound out of `GlobalAlloc::dealloc`"
    );
    drop(scope);
    let stats = cache.stats();
    assert_eq!((stats.bytes_in_use, stats.bytes_reserved), (0, 0));
    // The block the panicking free was handed stays the backing's (its hook
    // panicked before freeing it); the cache counts it as given back.
    assert_eq!(backing.live_blocks(), 1);
    free_what_the_backing_kept(&backing);
}

// 7. A panicking backing `deallocate` leaves the books right.

#[test]
fn a_panic_during_cap_eviction_keeps_the_budget_and_the_stats_exact() {
    let backing = Counting::new();
    let budget = Budget::new(1 << 20);
    let cache = CachingAllocator::builder()
        .budget(&budget)
        .max_cached_bytes(8192)
        .build_in(backing.clone());
    cache_one(&cache, 8192); // cached: the cap is full
    let block = ApiVec::<u8, _>::with_capacity_in(4096, cache.clone());
    panic_on_call(&backing, 0); // the eviction's give-back panics
    let freed = panic::catch_unwind(AssertUnwindSafe(|| drop(block)));
    assert!(freed.is_err(), "the backing's panic reaches the caller");
    let stats = cache.stats();
    assert_eq!(stats.bytes_cached, 4096, "the freed block was listed");
    assert_eq!(budget.bytes_cached(), stats.bytes_cached);
    // The evicted block was handed to the panicking backing, which kept it.
    assert_eq!(backing.live_bytes(), stats.bytes_reserved + 8192);
    cache.trim(0);
    assert_eq!(budget.bytes_cached(), 0);
    assert_eq!(backing.live_bytes(), 8192);
    free_what_the_backing_kept(&backing);
}

#[test]
fn a_panic_during_release_gives_every_other_block_back() {
    let backing = Counting::new();
    let cache = CachingAllocator::new_in(backing.clone());
    let blocks: Vec<_> = (1..=4)
        .map(|i| ApiVec::<u8, _>::with_capacity_in(1000 * i, cache.clone()))
        .collect();
    drop(blocks);
    panic_on_call(&backing, 1); // the second give-back panics
    let released = panic::catch_unwind(AssertUnwindSafe(|| cache.release_cached()));
    assert!(released.is_err());
    let stats = cache.stats();
    assert_eq!((stats.blocks_cached, stats.bytes_reserved), (0, 0));
    // Only the block the panicking call was handed is still the backing's:
    // the two after it were given back.
    assert_eq!(backing.live_blocks(), 1);
    free_what_the_backing_kept(&backing);
}

#[test]
fn a_panic_during_trim_or_budget_eviction_keeps_the_books() {
    let backing = Counting::new();
    let budget = Budget::new(3 * 4096);
    let cache = CachingAllocator::builder()
        .budget(&budget)
        .build_in(backing.clone());
    let other = CachingAllocator::builder()
        .budget(&budget)
        .build_in(backing.clone());
    for _ in 0..3 {
        let blocks: Vec<_> = (0..3)
            .map(|_| ApiVec::<u8, _>::with_capacity_in(4096, cache.clone()))
            .collect();
        drop(blocks);
    }
    // A trim whose first give-back panics still trims to its target.
    panic_on_call(&backing, 0);
    assert!(panic::catch_unwind(AssertUnwindSafe(|| cache.trim(4096))).is_err());
    assert_eq!(cache.stats().bytes_cached, 4096);
    assert_eq!(budget.bytes_cached(), 4096);
    // The budget evicts `cache`'s block for `other`'s, and that give-back panics.
    let blocks: Vec<_> = (0..3)
        .map(|_| ApiVec::<u8, _>::with_capacity_in(4096, cache.clone()))
        .collect();
    drop(blocks);
    assert_eq!(budget.bytes_cached(), budget.limit());
    let block = ApiVec::<u8, _>::with_capacity_in(4096, other.clone());
    panic_on_call(&backing, 0);
    assert!(panic::catch_unwind(AssertUnwindSafe(|| drop(block))).is_err());
    let (mine, theirs) = (cache.stats(), other.stats());
    assert_eq!(
        budget.bytes_cached(),
        mine.bytes_cached + theirs.bytes_cached
    );
    // Each panicking call kept the 4096-byte block it was handed.
    assert_eq!(
        backing.live_bytes(),
        mine.bytes_reserved + theirs.bytes_reserved + 2 * 4096
    );
    drop((cache, other));
    assert_eq!(budget.bytes_cached(), 0);
    assert_eq!(backing.live_bytes(), 2 * 4096);
    free_what_the_backing_kept(&backing);
}

#[test]
fn a_panicking_backing_allocate_changes_nothing() {
    let backing = Counting::new();
    let cache = CachingAllocator::new_in(backing.clone());
    cache_one(&cache, 4096);
    let before = cache.stats();
    panic_on_call(&backing, 0);
    let taken = panic::catch_unwind(AssertUnwindSafe(|| {
        ApiVec::<u8, _>::with_capacity_in(8192, cache.clone())
    }));
    assert!(taken.is_err());
    let after = cache.stats();
    assert_eq!((after.hits, after.misses), (before.hits, before.misses));
    assert_eq!(after.bytes_in_use, 0);
    assert_eq!(backing.live_bytes(), after.bytes_reserved);
}

// Round 3 (issue 19).

// 1. A dropped best-fit cache gives its budget share back.

#[test]
fn a_dropped_best_fit_cache_gives_its_share_of_the_budget_back() {
    let budget = Budget::new(1 << 20);
    let busy = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .budget(&budget)
        .build();
    // Per-model caches come and go on the budget, each leaving free bytes.
    for round in 0..4 {
        let backing = Counting::new();
        let reserved = CachingAllocator::builder()
            .size_policy(SizePolicy::BestFit)
            .budget(&budget)
            .build();
        let fixed = CachingAllocator::builder()
            .size_policy(SizePolicy::BestFit)
            .budget(&budget)
            .build_in(backing.clone());
        drop(ApiVec::<u8, _>::with_capacity_in(
            64 << 10,
            reserved.clone(),
        ));
        drop(ApiVec::<u8, _>::with_capacity_in(64 << 10, fixed.clone()));
        assert!(budget.bytes_cached() >= 128 << 10, "round {round}");
        drop((reserved, fixed));
        assert_eq!(budget.bytes_cached(), 0, "round {round}: nobody holds them");
        backing.assert_all_returned();
    }
    // The live member keeps what it frees.
    for _ in 0..3 {
        drop(ApiVec::<u8, _>::with_capacity_in(256 << 10, busy.clone()));
    }
    let stats = busy.stats();
    assert_eq!(stats.misses, 1, "{stats:?}");
    assert_eq!(budget.bytes_cached(), stats.bytes_cached);
}

// 3. Free bytes a best-fit cache gets without a free age like freed ones.

#[test]
#[cfg_attr(
    miri,
    ignore = "Miri has no mmap: best fit takes fixed segments there, and a free tail beside a live block in one is pinned, not sheddable"
)]
fn free_bytes_from_a_shrink_in_place_are_evicted_for_a_busy_member() {
    let budget = Budget::new(2 << 20);
    let idle = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .budget(&budget)
        .build();
    let busy = CachingAllocator::builder()
        .size_policy(SizePolicy::BestFit)
        .budget(&budget)
        .build();
    // The idle model keeps a buffer it shrank in place: its tail is free.
    let mut kept = ApiVec::<u8, _>::with_capacity_in(2 << 20, idle.clone());
    kept.push(1);
    kept.shrink_to_fit();
    let idle_free = idle.stats().bytes_cached;
    assert!(idle_free >= (2 << 20) - 4096, "{:?}", idle.stats());
    assert_eq!(budget.bytes_cached(), idle_free);
    // The busy model frees 1 MiB blocks: the idle model's free bytes are
    // older, so they go.
    for _ in 0..4 {
        drop(ApiVec::<u8, _>::with_capacity_in(1 << 20, busy.clone()));
    }
    let stats = busy.stats();
    assert_eq!(stats.misses, 1, "the busy member kept its block: {stats:?}");
    assert!(idle.stats().bytes_cached < idle_free, "{:?}", idle.stats());
    assert!(budget.bytes_cached() <= budget.limit());
    assert_eq!(kept[0], 1);
}

// 2. A panicking backing `deallocate` while the cache drops drains every
// front and gives every segment back, and never aborts.

type Blocks = std::vec::Vec<ApiVec<u8, CachingAllocator<Counting>>>;

/// A cache with front caches whose caching stopped while two threads' fronts
/// hold blocks: the backing's retry (after the release that drained them)
/// frees blocks into this thread's front and has another thread free its
/// own, then fails. Returns the cache and the other thread (alive until
/// `release` is sent, so its front is not an orphan).
fn stopped_with_blocks_in_two_fronts(
    backing: &Counting,
) -> (
    CachingAllocator<Counting>,
    mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let cache = CachingAllocator::builder()
        .front_cache_bytes(FRONT_CACHE_BYTES)
        .stop_caching_after_failure(true)
        .build_in(backing.clone());
    let mine: Arc<Mutex<Option<Blocks>>> = Arc::new(Mutex::new(Some(
        (1..=4)
            .map(|i| ApiVec::with_capacity_in(1024 * i, cache.clone()))
            .collect(),
    )));
    let (free_yours, freeing) = mpsc::channel::<()>();
    let (freed, yours_are_freed) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let theirs: Blocks = (5..=8)
        .map(|i| ApiVec::with_capacity_in(1024 * i, cache.clone()))
        .collect();
    let other = std::thread::spawn(move || {
        freeing.recv().unwrap();
        drop(theirs);
        freed.send(()).unwrap();
        let _ = released.recv();
    });
    let retry = backing.attempts() + 1;
    let (hooked, free_yours) = (backing.clone(), Mutex::new(free_yours));
    let (kept, yours) = (Arc::clone(&mine), Mutex::new(Some(yours_are_freed)));
    backing.set_hook(move || {
        if hooked.attempts() == retry
            && let Some(yours) = yours.lock().unwrap().take()
        {
            drop(kept.lock().unwrap().take());
            free_yours.lock().unwrap().send(()).unwrap();
            yours.recv().unwrap();
        }
    });
    backing.fail_all(true);
    let mut failing = ApiVec::<u8, _>::new_in(cache.clone());
    assert!(failing.try_reserve_exact(64 << 10).is_err());
    drop(failing);
    backing.fail_all(false);
    backing.clear_hook();
    assert!(cache.is_caching_stopped());
    assert!(mine.lock().unwrap().is_none(), "the retry freed them");
    let stats = cache.stats();
    assert_eq!(stats.blocks_cached, 8, "both fronts hold theirs: {stats:?}");
    (cache, release, other)
}

#[test]
fn a_panic_while_fronts_drain_on_drop_gives_every_other_block_back() {
    let backing = Counting::new();
    let (cache, release, other) = stopped_with_blocks_in_two_fronts(&backing);
    panic_on_call(&backing, 0); // the drain's first give-back panics
    let dropped = panic::catch_unwind(AssertUnwindSafe(|| drop(cache)));
    assert!(dropped.is_err(), "the backing's panic reaches the caller");
    // Only the block the panicking call was handed is still the backing's.
    assert_eq!(backing.live_blocks(), 1);
    release.send(()).unwrap();
    other.join().unwrap();
    free_what_the_backing_kept(&backing);
}

const CHILD: &str = "CACHING_ALLOCATOR_SOUNDNESS_CHILD";

#[test]
fn a_cache_dropped_while_unwinding_with_a_panicking_drain_does_not_abort() {
    const CASE: &str = "a_cache_dropped_while_unwinding_with_a_panicking_drain_does_not_abort";
    if std::env::var(CHILD).is_ok_and(|case| case == CASE) {
        let backing = Counting::new();
        let (cache, release, other) = stopped_with_blocks_in_two_fronts(&backing);
        panic_on_call(&backing, 0);
        let unwound = panic::catch_unwind(AssertUnwindSafe(move || {
            let _dropped_while_unwinding = cache;
            panic!("a panic of the user's");
        }));
        let payload = unwound.expect_err("the user's panic");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"a panic of the user's")
        );
        assert_eq!(backing.live_blocks(), 1);
        release.send(()).unwrap();
        other.join().unwrap();
        free_what_the_backing_kept(&backing);
        return;
    }
    if cfg!(miri) {
        return; // Miri runs no child processes.
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CASE, "--test-threads=1", "--nocapture"])
        .env(CHILD, CASE)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the child died: {:?}\n{stderr}",
        output.status
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("1 passed"));
}

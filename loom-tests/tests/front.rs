//! Loom models of the per-thread front caches (`src/front.rs`,
//! `src/cache/fronts.rs`): an owner's lock-free hit or free racing a drainer
//! (`trim`, `release_cached`, the cache's drop), two owners and a drainer, a
//! thread's exit (its thread-local table orphans its slot) racing a trim, the
//! last handle dropping while a thread's front still holds a block, a block
//! freed on another thread than the one it was taken on, and `stats()`
//! snapshots taken while fronts change.
//!
//! Under `--cfg loom` the slot's flags and counters are loom atomics, its lock
//! a loom mutex, its magazine a loom `UnsafeCell` (so an owner and a drainer
//! in it at once is reported as a causality violation), both sides of the
//! asymmetric fence are `fence(SeqCst)`, and the thread-local table is loom's
//! `thread_local!`, whose values loom drops when a loom thread finishes
//! (`loom::rt::thread_done`, before the thread counts as terminated, so
//! `join` returns after the table's destructor ran): a model thread's exit
//! orphans its slots as a real thread's does.
//!
//! Not modelled: the native fast mode, where the owner's side is only a
//! compiler fence and the drainer's is `membarrier` (loom has no model of a
//! fence run on other threads); under loom both are `SeqCst` fences, the
//! mode used where `membarrier` is missing.
//!
//! After the threads join: every block held the stamp its owner wrote while
//! it was live, the stats add up (nothing in use; `bytes_in_use +
//! bytes_lost_to_rounding + bytes_cached == bytes_reserved`, exact for the
//! Exact policy) and agree with the backing's ledger; after a final release
//! (or the drop) the backing has nothing live, and no block went back twice
//! (`Counting`'s ledger panics on a second return).
//!
//! Models 7 and 8 take a `stats()` snapshot while an owner frees into its
//! front, or while its front is drained: such a snapshot is not consistent
//! (their docs say what loom finds), and they check what `stats()` promises
//! instead, a snapshot off by at most what is in flight and exact at rest.
//!
//! A model failing (an assertion, or loom's causality check) while a model
//! thread that used the cache is still alive ends in an abort ("panic in a
//! destructor during cleanup") after the real panic message: loom then
//! drops that thread's thread-locals outside the model, and the table's
//! destructor takes a loom mutex. The first message is the finding. Run
//! failing models with `RUST_BACKTRACE=0`: with a backtrace, loom's
//! coroutine overflows its stack printing it, and the test hangs.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p loom-tests --release --test front`.
#![cfg(loom)]

use std::collections::BTreeSet;

use caching_allocator::{Allocator, CachingAllocator, FRONT_CACHE_BYTES, SizePolicy, Stats};
use core::alloc::Layout;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use loom_tests::{Block, Counting, model, model_outcomes};

type Cache = CachingAllocator<Counting>;

/// A policy and the one layout a model takes blocks of.
#[derive(Clone, Copy)]
struct Shape {
    policy: SizePolicy,
    size: usize,
    align: usize,
}

impl Shape {
    fn layout(self) -> Layout {
        Layout::from_size_align(self.size, self.align).unwrap()
    }

    /// What a trim or release gives back when one free block is shed: the
    /// block, or (best fit) its whole fixed segment.
    fn shed(self) -> usize {
        match self.policy {
            SizePolicy::BestFit => SEGMENT,
            _ => self.size,
        }
    }
}

/// Exact sizes: a block is its request (no rounding).
const EXACT: Shape = Shape {
    policy: SizePolicy::Exact,
    size: 16,
    align: 8,
};

/// Best fit over fixed segments (`build_in`): as in `best_fit.rs`, a block
/// above the split threshold and the quick lists' limit, so a block drained
/// from a front merges with the free rest of its segment at once.
const BEST_FIT: Shape = Shape {
    policy: SizePolicy::BestFit,
    size: 8 << 10,
    align: 64,
};

/// The size of a fixed segment best fit takes for a small block.
const SEGMENT: usize = 256 << 10;

/// A cache with per-thread front caches, over a counting backing.
fn fronted(shape: Shape) -> (Cache, Counting) {
    let backing = Counting::default();
    let cache = CachingAllocator::builder()
        .size_policy(shape.policy)
        .front_cache_bytes(FRONT_CACHE_BYTES)
        .build_in(backing.clone());
    (cache, backing)
}

/// Takes a block and fills it with `stamp`.
fn take(cache: &Cache, shape: Shape, stamp: u8) -> Block {
    let block = cache.allocate(shape.layout()).unwrap().cast::<u8>();
    // SAFETY: a fresh block of `shape.size` bytes, ours.
    unsafe { block.as_ptr().write_bytes(stamp, shape.size) };
    Block(block)
}

fn assert_stamped(block: &Block, shape: Shape, stamp: u8) {
    // SAFETY: a live block of `shape.size` bytes: if the cache handed it to
    // someone else too, or a drain wrote into it, some byte shows it.
    let bytes = unsafe { core::slice::from_raw_parts(block.0.as_ptr(), shape.size) };
    assert!(
        bytes.iter().all(|&b| b == stamp),
        "block {:p} overwritten while live (stamp {stamp:#x})",
        block.0
    );
}

/// Checks the stamp and frees the block.
fn give(cache: &Cache, shape: Shape, block: Block, stamp: u8) {
    assert_stamped(&block, shape, stamp);
    // SAFETY: every `Block` here was handed out by `cache` for
    // `shape.layout()` and is not used again.
    unsafe { cache.deallocate(block.0, shape.layout()) };
}

/// Lets the other threads run first (another owner may take a block and
/// stamp it between this owner's stamp and its check: the check sees it if
/// the cache handed the same block out twice), then `give`s.
///
/// Only where two threads take blocks: a yield is a point where loom
/// switches threads, and each switch back costs a preemption of the bound,
/// so the drain models (one owner; a block handed out twice would be given
/// back twice, which the ledger catches) free without one, keeping all
/// their orders within the bound.
fn give_after_others(cache: &Cache, shape: Shape, block: Block, stamp: u8) {
    thread::yield_now();
    give(cache, shape, block, stamp);
}

/// At rest (no thread inside the cache, nothing live): the stats add up and
/// agree with the backing's ledger.
fn assert_at_rest(cache: &Cache, backing: &Counting, shape: Shape) -> Stats {
    let s = cache.stats();
    assert_eq!((s.bytes_in_use, s.blocks_in_use), (0, 0), "{s:?}");
    assert_eq!(s.hits + s.misses, s.frees, "{s:?}");
    assert_eq!(
        s.bytes_in_use + s.bytes_lost_to_rounding + s.bytes_cached,
        s.bytes_reserved,
        "{s:?}"
    );
    assert_eq!(backing.live_bytes(), s.bytes_reserved, "{s:?}");
    assert_eq!(
        backing.allocs_and_frees(),
        (s.backing_allocs, s.backing_frees),
        "{s:?}"
    );
    match shape.policy {
        SizePolicy::BestFit => {
            assert_eq!(s.bytes_reserved % SEGMENT, 0, "{s:?}");
        }
        _ => {
            // Exact: every block is its request, the cache's or a front's.
            assert_eq!(s.bytes_lost_to_rounding, 0, "{s:?}");
            assert_eq!(s.bytes_cached, s.bytes_reserved, "{s:?}");
            assert_eq!(s.bytes_cached, s.blocks_cached * shape.size, "{s:?}");
            assert_eq!(s.backing_allocs, s.misses, "{s:?}");
            assert_eq!(
                s.backing_allocs - s.backing_frees,
                s.blocks_cached as u64,
                "{s:?}"
            );
        }
    }
    assert!(s.peak_bytes_cached >= s.bytes_cached, "{s:?}");
    assert!(s.peak_bytes_reserved >= s.bytes_reserved, "{s:?}");
    s
}

/// With nothing live, a release reaches every front (exited threads'
/// included) and gives everything back, once.
fn assert_all_back_after_release(cache: &Cache, backing: &Counting, shape: Shape) {
    cache.release_cached();
    let s = assert_at_rest(cache, backing, shape);
    assert_eq!(
        (s.bytes_reserved, s.bytes_cached, s.blocks_cached),
        (0, 0, 0),
        "{s:?}"
    );
    assert_all_back(backing);
}

/// The backing has nothing live, and took back as many blocks as it gave.
fn assert_all_back(backing: &Counting) {
    assert_eq!(backing.live_blocks(), 0);
    let (allocs, frees) = backing.allocs_and_frees();
    assert_eq!(allocs, frees);
}

/// A drainer (main: `drain`) races an owner's hit and free: the owner takes
/// a block and frees it (a miss, then a free into its front), takes it again
/// (a front hit, unless the drain came first) and frees it again. Returns
/// the distinct `(bytes the drain gave back, backing allocations)`.
fn a_drain_races_a_hit_and_a_free(
    shape: Shape,
    drain: fn(&Cache) -> usize,
) -> BTreeSet<(usize, u64)> {
    model_outcomes(move || {
        let (cache, backing) = fronted(shape);
        let owner = {
            let cache = cache.clone();
            thread::spawn(move || {
                let primed = take(&cache, shape, 0x11);
                give(&cache, shape, primed, 0x11);
                let hit = take(&cache, shape, 0x22);
                give(&cache, shape, hit, 0x22);
            })
        };
        let drained = drain(&cache);
        owner.join().unwrap();
        assert_eq!(drained % shape.shed(), 0);

        let s = assert_at_rest(&cache, &backing, shape);
        assert_eq!((s.hits + s.misses, s.frees), (2, 2), "{s:?}");
        // The block the owner freed last is held (its front, or the shared
        // side if the drain took it in and left it), unless the drain came
        // after the last free and shed it.
        let held = if drained == 0 { shape.shed() } else { 0 };
        let outcome = (drained, s.backing_allocs);
        if s.backing_allocs == 2 {
            // The drain shed the first block between the frees; the second
            // miss's block is held.
            assert_eq!(s.bytes_reserved, shape.shed(), "{s:?}");
        } else {
            assert_eq!(s.bytes_reserved, held, "{s:?}");
        }
        assert_all_back_after_release(&cache, &backing, shape);
        outcome
    })
}

/// The three orders a drain can take against the owner were all explored:
/// before its first free (nothing shed, one block), between its frees (the
/// primed block shed, a second miss), after its last free (shed, one block).
fn assert_every_order(outcomes: &BTreeSet<(usize, u64)>, shape: Shape) {
    let shed = shape.shed();
    assert_eq!(
        *outcomes,
        BTreeSet::from([(0, 1), (shed, 1), (shed, 2)]),
        "{outcomes:?}"
    );
}

/// Model 1: A trim races an owner's front hit and free (Exact).
#[test]
fn a_trim_races_a_front_hit_and_free() {
    let outcomes = a_drain_races_a_hit_and_a_free(EXACT, |cache| cache.trim(0));
    assert_every_order(&outcomes, EXACT);
}

/// Model 1': The same with `release_cached` as the drainer.
#[test]
fn a_release_races_a_front_hit_and_free() {
    let outcomes = a_drain_races_a_hit_and_a_free(EXACT, Cache::release_cached);
    assert_every_order(&outcomes, EXACT);
}

/// Model 6: A trim races an owner's front hit and free over best fit: a block
/// drained from a front is uncarved (merged back into its segment) and the
/// emptied segment given back, once.
#[test]
fn best_fit_a_trim_races_a_front_hit_and_free() {
    let outcomes = a_drain_races_a_hit_and_a_free(BEST_FIT, |cache| cache.trim(0));
    assert_every_order(&outcomes, BEST_FIT);
}

/// Model 6': The same with `release_cached` as the drainer.
#[test]
fn best_fit_a_release_races_a_front_hit_and_free() {
    let outcomes = a_drain_races_a_hit_and_a_free(BEST_FIT, Cache::release_cached);
    assert_every_order(&outcomes, BEST_FIT);
}

/// Model 1'': Two drainers (a release on a thread, a trim on main) race an
/// owner's front hit and free: each drain takes the slot's lock in turn,
/// the owner may meet either, and the block goes back once.
#[test]
fn two_drainers_race_a_front_hit_and_free() {
    let shape = EXACT;
    model(move || {
        let (cache, backing) = fronted(shape);
        let owner = {
            let cache = cache.clone();
            thread::spawn(move || {
                let primed = take(&cache, shape, 0x14);
                give(&cache, shape, primed, 0x14);
                let hit = take(&cache, shape, 0x15);
                give(&cache, shape, hit, 0x15);
            })
        };
        let releaser = {
            let cache = cache.clone();
            thread::spawn(move || cache.release_cached())
        };
        let trimmed = cache.trim(0);
        owner.join().unwrap();
        let released = releaser.join().unwrap();
        assert_eq!((trimmed + released) % shape.size, 0);

        let s = assert_at_rest(&cache, &backing, shape);
        assert_eq!((s.hits + s.misses, s.frees), (2, 2), "{s:?}");
        assert_all_back_after_release(&cache, &backing, shape);
    });
}

/// Model 2: Two owners each take a block and free it into their fronts while
/// main trims down to one block: the trim drains both fronts (either may be
/// mid-access) and keeps one block on the shared side, where the other
/// owner's miss may find it.
#[test]
fn two_owners_and_a_trim() {
    let shape = EXACT;
    let outcomes = model_outcomes(move || {
        let (cache, backing) = fronted(shape);
        let spawn = |stamp: u8| {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, stamp);
                give_after_others(&cache, shape, block, stamp);
            })
        };
        let (one, two) = (spawn(0x33), spawn(0x44));
        let trimmed = cache.trim(shape.size);
        one.join().unwrap();
        two.join().unwrap();
        assert_eq!(trimmed % shape.size, 0);

        let s = assert_at_rest(&cache, &backing, shape);
        assert_eq!((s.hits + s.misses, s.frees), (2, 2), "{s:?}");
        // Every block made is held, unless trimmed.
        assert_eq!(
            s.bytes_cached,
            s.misses as usize * shape.size - trimmed,
            "{s:?}"
        );
        assert_all_back_after_release(&cache, &backing, shape);
        (trimmed, s.misses)
    });
    // The trim drained at most one block (kept: the target), with the
    // other owner missing or then hitting it on the shared side; or drained
    // both and shed one.
    assert_eq!(
        outcomes,
        BTreeSet::from([(0, 1), (0, 2), (shape.size, 2)]),
        "{outcomes:?}"
    );
}

/// Model 2': Two owners with a front hit each (take, free, take again: a front
/// hit unless the trim came between, free) while main trims to nothing.
#[test]
fn two_owners_hitting_their_fronts_and_a_trim() {
    let shape = EXACT;
    model(move || {
        let (cache, backing) = fronted(shape);
        let spawn = |stamp: u8| {
            let cache = cache.clone();
            thread::spawn(move || {
                // Without yields (with one before the second free, 30 s
                // at 3 preemptions): a block handed to both owners would be
                // given back twice, which the ledger catches.
                for _ in 0..2 {
                    let block = take(&cache, shape, stamp);
                    give(&cache, shape, block, stamp);
                }
            })
        };
        let (one, two) = (spawn(0x55), spawn(0x66));
        cache.trim(0);
        one.join().unwrap();
        two.join().unwrap();

        let s = assert_at_rest(&cache, &backing, shape);
        assert_eq!((s.hits + s.misses, s.frees), (4, 4), "{s:?}");
        assert_all_back_after_release(&cache, &backing, shape);
    });
}

/// Model 3: An owner frees a block into its front and exits (its table's
/// destructor orphans the slot, the block staying in it) while main trims.
/// The trim drains the slot live or orphaned (adopting it), or finds it
/// still empty; after the join the orphan's block still counts, and the
/// final release reaches it.
#[test]
fn a_thread_exit_races_a_trim() {
    let shape = EXACT;
    let outcomes = model_outcomes(move || {
        let (cache, backing) = fronted(shape);
        let owner = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0x77);
                give(&cache, shape, block, 0x77);
                // The handle goes now; the thread's table (and the slot's
                // orphaning) when the thread finishes.
                drop(cache);
            })
        };
        let trimmed = cache.trim(0);
        owner.join().unwrap();

        let s = assert_at_rest(&cache, &backing, shape);
        assert_eq!((s.misses, s.frees), (1, 1), "{s:?}");
        // Trimmed, or still held: in the exited thread's front.
        assert_eq!(s.bytes_cached, shape.size - trimmed, "{s:?}");
        assert_all_back_after_release(&cache, &backing, shape);
        trimmed
    });
    assert_eq!(outcomes, BTreeSet::from([0, shape.size]), "{outcomes:?}");
}

/// Model 3': The same exit racing main's own slow path, which adopts orphaned
/// slots: main's first allocation (a front miss) may adopt the exiting
/// thread's slot, and then hits the adopted block on the shared side.
#[test]
fn a_thread_exit_races_an_adopting_miss() {
    let shape = EXACT;
    let outcomes = model_outcomes(move || {
        let (cache, backing) = fronted(shape);
        let owner = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0x88);
                give(&cache, shape, block, 0x88);
            })
        };
        let mine = take(&cache, shape, 0x99);
        owner.join().unwrap();
        give(&cache, shape, mine, 0x99);

        let s = assert_at_rest(&cache, &backing, shape);
        assert_eq!((s.hits + s.misses, s.frees), (2, 2), "{s:?}");
        assert_all_back_after_release(&cache, &backing, shape);
        s.misses
    });
    // Main missed with nothing to adopt (two blocks), or adopted the orphan
    // and reused its block (one).
    assert_eq!(outcomes, BTreeSet::from([1, 2]), "{outcomes:?}");
}

/// Model 3'': An exiting thread's slot, wanted by two at once: a second thread's
/// first allocation (a front miss, which adopts orphaned slots) and main's
/// trim (which drains every slot, orphaned ones included). One of them
/// takes the orphan's block in, once.
#[test]
fn an_adopting_miss_and_a_trim_race_for_an_exiting_threads_front() {
    let shape = EXACT;
    model(move || {
        let (cache, backing) = fronted(shape);
        let exiting = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0x16);
                give(&cache, shape, block, 0x16);
            })
        };
        let adopter = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0x17);
                give(&cache, shape, block, 0x17);
            })
        };
        cache.trim(0);
        exiting.join().unwrap();
        adopter.join().unwrap();

        let s = assert_at_rest(&cache, &backing, shape);
        assert_eq!((s.hits + s.misses, s.frees), (2, 2), "{s:?}");
        assert_all_back_after_release(&cache, &backing, shape);
    });
}

/// Model 4: The last handle drops while a thread's front holds a block: the
/// owner takes, frees (into its front) and drops its handle; main, which
/// has a front of its own, does the same at once. Whichever drop is last
/// drains both fronts (the other thread's possibly exiting, its table
/// orphaning its slot) and gives everything back, once.
#[test]
fn the_last_handle_drops_with_blocks_in_fronts() {
    let shape = EXACT;
    model(move || {
        let (cache, backing) = fronted(shape);
        let owner = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0xAA);
                give(&cache, shape, block, 0xAA);
                drop(cache);
            })
        };
        let block = take(&cache, shape, 0xBB);
        give(&cache, shape, block, 0xBB);
        drop(cache);
        owner.join().unwrap();
        assert_all_back(&backing);
    });
}

/// Model 4': The cache drops (main's handle is the last) while the thread whose
/// front holds a block is still alive, finishing: the drop must reach the
/// block without waiting for the thread's exit, and the thread's table,
/// torn down after or during the drop, finds its slot dead.
#[test]
fn the_cache_drops_while_an_owner_is_finishing() {
    let shape = EXACT;
    model(move || {
        let (cache, backing) = fronted(shape);
        let let_go = Arc::new(AtomicBool::new(false));
        let owner = {
            let cache = cache.clone();
            let let_go = let_go.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0xCC);
                give(&cache, shape, block, 0xCC);
                drop(cache);
                let_go.store(true, Ordering::Release);
            })
        };
        while !let_go.load(Ordering::Acquire) {
            thread::yield_now();
        }
        // The last handle: the cache drops here, draining the owner's front.
        drop(cache);
        assert_all_back(&backing);
        owner.join().unwrap();
        assert_all_back(&backing);
    });
}

/// Model 5: A block taken on one thread is freed on another: the owner takes a
/// block and hands it over; main checks it, frees it into its own front and
/// trims down to one block (the block drained to the shared side and kept);
/// meanwhile the owner takes another block, a front miss that may find the
/// handed-over block on the shared side. Returns the owner's second take's
/// hits.
#[test]
fn a_block_freed_on_another_thread() {
    let shape = EXACT;
    let outcomes = model_outcomes(move || {
        let (cache, backing) = fronted(shape);
        let handoff = Arc::new(Mutex::new(None::<Block>));
        let owner = {
            let cache = cache.clone();
            let handoff = handoff.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0xDD);
                *handoff.lock().unwrap() = Some(block);
                let second = take(&cache, shape, 0xEE);
                give_after_others(&cache, shape, second, 0xEE);
            })
        };
        let block = loop {
            if let Some(block) = handoff.lock().unwrap().take() {
                break block;
            }
            thread::yield_now();
        };
        give_after_others(&cache, shape, block, 0xDD);
        let trimmed = cache.trim(shape.size);
        owner.join().unwrap();
        assert_eq!(trimmed % shape.size, 0);

        let s = assert_at_rest(&cache, &backing, shape);
        assert_eq!((s.hits + s.misses, s.frees), (2, 2), "{s:?}");
        assert_all_back_after_release(&cache, &backing, shape);
        s.hits
    });
    // The owner's second take missed (the handed-over block not yet on the
    // shared side) or hit it there.
    assert_eq!(outcomes, BTreeSet::from([0, 1]), "{outcomes:?}");
}

/// Model 7: A `stats()` snapshot taken while an owner takes a block and frees
/// it into its front. With fronts a snapshot is the shared books plus each
/// front's counters, read without stopping the owner (a hit or free is a few
/// plain stores), so while a thread is inside the allocator it may catch an
/// operation half-counted (loom finds `freed_block_bytes` counted and `frees`
/// not yet). What `stats()` promises, and this checks: a snapshot is off by
/// at most what is in flight (here the one block: see
/// [`assert_within_the_block`]), and once no thread is inside, the stats are
/// exact. Loom must also have taken a snapshot mid-operation (one whose books
/// do not add up as they do at rest), or the race was not explored.
#[test]
fn a_stats_snapshot_during_a_front_free_is_off_by_at_most_the_block() {
    let shape = EXACT;
    let snapshots = model_outcomes(move || {
        let (cache, backing) = fronted(shape);
        let owner = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0x12);
                give(&cache, shape, block, 0x12);
            })
        };
        let s = cache.stats();
        // Checked after the join: a model failing while a thread that used
        // the cache is alive ends in an abort (see the module docs).
        owner.join().unwrap();
        assert_within_the_block(&s, shape, 1);
        let at_rest = cache.stats();
        assert_eq!(
            (at_rest.hits + at_rest.misses, at_rest.frees),
            (1, 1),
            "{at_rest:?}"
        );
        assert_eq!(at_rest.bytes_lost_to_rounding, 0, "{at_rest:?}");
        assert_eq!(
            (at_rest.bytes_in_use, at_rest.blocks_in_use),
            (0, 0),
            "{at_rest:?}"
        );
        assert_eq!(
            (at_rest.bytes_cached, at_rest.blocks_cached),
            (shape.size, 1),
            "{at_rest:?}"
        );
        assert_all_back_after_release(&cache, &backing, shape);
        Snapshot::of(&s)
    });
    assert_some_mid_operation(&snapshots, shape);
}

/// Model 8: A `stats()` snapshot taken while an owner frees into its front and
/// then trims (draining its own front and folding its counters into the
/// shared books). A snapshot reads the fronts' counters, then the shared
/// books: a drain between them can count the free twice (loom finds `frees:
/// 2` after one free, and the block's bytes cached twice). What `stats()`
/// promises, and this checks: off by at most what is in flight (the block,
/// counted at most twice: [`assert_within_the_block`]), and at rest the books
/// are exact. As in model 7, loom must have caught the owner mid-operation.
#[test]
fn a_stats_snapshot_during_a_front_drain_counts_the_block_at_most_twice() {
    let shape = EXACT;
    let snapshots = model_outcomes(move || {
        let (cache, backing) = fronted(shape);
        let owner = {
            let cache = cache.clone();
            thread::spawn(move || {
                let block = take(&cache, shape, 0x13);
                give(&cache, shape, block, 0x13);
                cache.trim(0);
            })
        };
        let s = cache.stats();
        // Checked after the join: a model failing while a thread that used
        // the cache is alive ends in an abort (see the module docs).
        owner.join().unwrap();
        assert_within_the_block(&s, shape, 2);
        let at_rest = cache.stats();
        assert_eq!(
            (at_rest.hits + at_rest.misses, at_rest.frees),
            (1, 1),
            "{at_rest:?}"
        );
        assert_eq!(
            (at_rest.bytes_in_use, at_rest.bytes_cached),
            (0, 0),
            "{at_rest:?}"
        );
        assert_eq!(
            at_rest.bytes_reserved, 0,
            "the trim gave the block back: {at_rest:?}"
        );
        assert_all_back_after_release(&cache, &backing, shape);
        Snapshot::of(&s)
    });
    assert_some_mid_operation(&snapshots, shape);
}

/// A snapshot taken while one owner takes one block of `shape` (Exact) and
/// frees it, maybe then draining its front, is within what the model can
/// have at once, one block, and what can be in flight, that block again:
/// the bytes reserved (moved only under the shared lock) are none or the
/// block; in use at most the block; cached at most the block `counted`
/// times (2 when a drain can move it between the snapshot's read of the
/// front and its read of the shared books) and at most one block more than
/// reserved (the block counted in the front after the drain gave it back);
/// lost to rounding at most the block (Exact loses nothing, but a free read
/// half-counted shows its block's bytes before its requested bytes); the
/// peaks within the same; at most one allocation, and `counted` frees.
#[track_caller]
fn assert_within_the_block(s: &Stats, shape: Shape, counted: usize) {
    let size = shape.size;
    let within = [
        (
            "bytes_reserved",
            s.bytes_reserved == 0 || s.bytes_reserved == size,
        ),
        (
            "bytes_in_use",
            s.bytes_in_use <= size && s.blocks_in_use <= 1,
        ),
        (
            "bytes_cached",
            s.bytes_cached <= counted * size && s.blocks_cached <= counted,
        ),
        (
            "bytes_cached against bytes_reserved",
            s.bytes_cached <= s.bytes_reserved + (counted - 1) * size,
        ),
        ("bytes_lost_to_rounding", s.bytes_lost_to_rounding <= size),
        (
            "peaks",
            s.peak_bytes_in_use <= size && s.peak_bytes_cached <= counted * size,
        ),
        (
            "counters",
            s.hits + s.misses <= 1 && s.frees <= counted as u64,
        ),
    ];
    for (name, holds) in within {
        assert!(holds, "{name}: {s:?}");
    }
}

/// The gauges and counters of a snapshot, kept across loom's runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Snapshot {
    bytes_in_use: usize,
    blocks_in_use: usize,
    bytes_cached: usize,
    blocks_cached: usize,
    bytes_lost_to_rounding: usize,
    bytes_reserved: usize,
    allocations: u64,
    frees: u64,
}

impl Snapshot {
    fn of(s: &Stats) -> Self {
        Self {
            bytes_in_use: s.bytes_in_use,
            blocks_in_use: s.blocks_in_use,
            bytes_cached: s.bytes_cached,
            blocks_cached: s.blocks_cached,
            bytes_lost_to_rounding: s.bytes_lost_to_rounding,
            bytes_reserved: s.bytes_reserved,
            allocations: s.hits + s.misses,
            frees: s.frees,
        }
    }

    /// Its books add up as at rest (Exact): reserved bytes in use or cached,
    /// none lost, the blocks in use those allocated and not freed, the
    /// cached bytes whole blocks.
    fn adds_up(&self, shape: Shape) -> bool {
        self.bytes_in_use + self.bytes_lost_to_rounding + self.bytes_cached == self.bytes_reserved
            && self.bytes_lost_to_rounding == 0
            && self.allocations.checked_sub(self.frees) == Some(self.blocks_in_use as u64)
            && self.bytes_cached == self.blocks_cached * shape.size
    }
}

/// Some snapshot caught the owner mid-operation: the races were explored.
fn assert_some_mid_operation(snapshots: &BTreeSet<Snapshot>, shape: Shape) {
    assert!(
        snapshots.iter().any(|s| !s.adds_up(shape)),
        "no snapshot caught an operation in flight: {snapshots:?}"
    );
}

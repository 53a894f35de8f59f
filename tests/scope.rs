//! `cache.enter()` under `ScopedGlobal`: this test binary installs the global
//! allocator, so plain `Vec`s inside a scope come from the current cache.
//!
//! Tests run on parallel threads; each uses its own caches, and scopes are
//! per thread, so their counters do not mix.

use std::alloc::Layout;
use std::panic;
use std::sync::mpsc;

use allocator_api2::alloc::Allocator;
use caching_allocator::{CachingAllocator, FRONT_CACHE_BYTES, ScopedGlobal};
use fixture::Counting;

#[path = "all/fixture/mod.rs"]
mod fixture;

#[global_allocator]
static GLOBAL: ScopedGlobal = ScopedGlobal::new();

const FLOATS: usize = 50_000; // 200 KB: far above the 4 KiB minimum

/// One "forward pass": three activations, each computed from the last.
fn forward(input: &[f32]) -> f32 {
    let hidden: Vec<f32> = input.iter().map(|x| x * 2.0).collect();
    let activated: Vec<f32> = hidden.iter().map(|x| x.max(0.0)).collect();
    activated.iter().sum()
}

#[test]
fn plain_vecs_in_a_scope_are_served_from_the_cache_after_pass_one() {
    let cache = CachingAllocator::new();
    let outputs: Vec<f32> = {
        let _scope = cache.enter();
        (0..5)
            .map(|pass| {
                let input = vec![pass as f32; FLOATS];
                forward(&input)
            })
            .collect()
    };
    assert_eq!(outputs[4], 4.0 * 2.0 * FLOATS as f32);
    let stats = cache.stats();
    // Pass one: input, hidden and activated are live at once: three blocks.
    assert_eq!(stats.misses, 3);
    assert_eq!(stats.hits, 12);
    assert_eq!(stats.bytes_in_use, 0);
    assert_eq!(stats.bytes_cached, 3 * 4 * FLOATS);
}

#[test]
fn small_allocations_and_allocations_outside_a_scope_skip_the_cache() {
    let cache = CachingAllocator::new();
    drop(vec![0u8; 100_000]); // no scope yet
    {
        let _scope = cache.enter();
        let small: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        drop(small);
        drop(vec![0u8; 4095]);
    }
    drop(vec![0u8; 100_000]); // the scope ended
    assert_eq!(cache.stats().hits + cache.stats().misses, 0);
}

#[test]
fn a_free_on_another_thread_goes_back_to_the_owner() {
    let cache = CachingAllocator::new();
    let buffer = {
        let _scope = cache.enter();
        vec![7u8; 10_000]
    };
    std::thread::spawn(move || {
        assert!(buffer.iter().all(|&b| b == 7));
        drop(buffer);
    })
    .join()
    .unwrap();
    let stats = cache.stats();
    assert_eq!((stats.bytes_in_use, stats.bytes_cached), (0, 10_000));
}

#[test]
fn a_thread_that_exits_holding_blocks_loses_nothing() {
    let cache = CachingAllocator::new();
    let worker_cache = cache.clone();
    let buffers = std::thread::spawn(move || {
        let _scope = worker_cache.enter();
        vec![vec![1u8; 8192], vec![2u8; 16384]]
    })
    .join()
    .unwrap();
    assert_eq!(cache.stats().bytes_in_use, 8192 + 16384);
    drop(buffers);
    let stats = cache.stats();
    assert_eq!((stats.bytes_in_use, stats.bytes_cached), (0, 8192 + 16384));
}

#[test]
fn a_free_inside_another_caches_scope_goes_to_the_owner() {
    let owner = CachingAllocator::new();
    let other = CachingAllocator::new();
    let buffer = {
        let _scope = owner.enter();
        vec![0u64; 2048]
    };
    {
        let _scope = other.enter();
        drop(buffer);
    }
    assert_eq!(owner.stats().bytes_cached, 2048 * 8);
    assert_eq!(other.stats().bytes_cached, 0);
    assert_eq!(other.stats().frees, 0);
}

#[test]
fn a_free_after_every_handle_dropped_frees_the_orphaned_cache() {
    let backing = Counting::new();
    let cache = CachingAllocator::new_in(backing.clone());
    let (a, b) = {
        let _scope = cache.enter();
        let a = vec![1u8; 8192];
        drop(vec![3u8; 8192]); // a cached block, too
        (a, vec![2u8; 20_000])
    };
    drop(cache);
    // Live blocks keep the cache alive.
    assert_eq!(backing.live_blocks(), 3);
    drop(a);
    assert_eq!(
        backing.live_blocks(),
        3,
        "a goes back to the orphaned cache"
    );
    drop(b);
    // The last block freed the cache, which gave everything back.
    backing.assert_all_returned();
}

#[test]
fn scopes_nest_and_the_outer_one_is_restored() {
    let outer = CachingAllocator::new();
    let inner = CachingAllocator::new();
    let _outer_scope = outer.enter();
    drop(vec![0u8; 5000]);
    {
        let _inner_scope = inner.enter();
        drop(vec![0u8; 6000]);
    }
    drop(vec![0u8; 7000]);
    assert_eq!(outer.stats().misses, 2);
    assert_eq!(inner.stats().misses, 1);
    assert_eq!(inner.stats().bytes_cached, 6000);
}

#[test]
fn guards_dropped_out_of_order_end_every_scope() {
    let a = CachingAllocator::new();
    let b = CachingAllocator::new();
    let scope_a = a.enter();
    let scope_b = b.enter();
    drop(scope_a); // out of order: ends both scopes
    drop(vec![0u8; 5000]);
    drop(scope_b); // inert
    drop(vec![0u8; 5000]);
    assert_eq!(a.stats().misses + b.stats().misses, 0);
    // A new scope works as usual afterwards.
    let _again = a.enter();
    drop(vec![0u8; 5000]);
    assert_eq!(a.stats().misses, 1);
}

#[test]
fn a_panicking_scope_unwinds_and_restores_the_previous_cache() {
    let outer = CachingAllocator::new();
    let failing = CachingAllocator::new();
    let _outer_scope = outer.enter();
    let failing_in_closure = failing.clone();
    let result = panic::catch_unwind(move || {
        let _scope = failing_in_closure.enter();
        let buffer = vec![1u8; 9000];
        // `resume_unwind` unwinds without running the panic hook, whose
        // backtrace printing would allocate (and keep) memory in this scope.
        panic::resume_unwind(Box::new(buffer.len()));
    });
    assert!(result.is_err());
    // The buffer was freed to its owner during the unwind.
    let stats = failing.stats();
    assert_eq!(
        (stats.misses, stats.bytes_in_use, stats.bytes_cached),
        (1, 0, 9000)
    );
    drop(vec![0u8; 9000]);
    assert_eq!(outer.stats().misses, 1, "the outer scope is current again");
}

#[test]
fn many_threads_with_their_own_scopes() {
    let caches: Vec<CachingAllocator> = (0..8).map(|_| CachingAllocator::new()).collect();
    std::thread::scope(|threads| {
        for (index, cache) in caches.iter().enumerate() {
            threads.spawn(move || {
                let _scope = cache.enter();
                for pass in 0..20 {
                    let input = vec![(index + pass) as f32; 4096 + index];
                    let _ = forward(&input);
                }
            });
        }
    });
    for cache in &caches {
        let stats = cache.stats();
        assert_eq!((stats.misses, stats.hits), (3, 57));
        assert_eq!(stats.bytes_in_use, 0);
    }
}

#[test]
fn a_cache_used_directly_inside_its_own_scope_does_not_reenter_itself() {
    let cache = CachingAllocator::new();
    let _scope = cache.enter();
    // Direct use: the block comes from the cache once, not through the scope
    // a second time.
    let direct: allocator_api2::vec::Vec<u8, _> =
        allocator_api2::vec::Vec::with_capacity_in(100_000, cache.clone());
    assert_eq!(cache.stats().misses, 1);
    drop(direct);
    // Many distinct sizes grow the free-list map far past the 4 KiB minimum
    // while this cache is current: its bookkeeping must not come from itself.
    // (Under Miri 300 sizes: 57 entries take the map to 128 buckets of 32 or
    // more bytes, past 4 KiB, and 300 to 512 buckets; 2000 cost 44 s of
    // Miri's clock.)
    let sizes: usize = if cfg!(miri) { 300 } else { 2000 };
    for size in 0..sizes {
        let layout = Layout::from_size_align(8192 + size, 8).unwrap();
        let block = cache.allocate(layout).unwrap();
        // SAFETY: allocated just above with `layout`.
        unsafe { cache.deallocate(block.cast(), layout) };
    }
    let stats = cache.stats();
    let blocks = sizes as u64 + 1;
    assert_eq!((stats.misses, stats.blocks_cached as u64), (blocks, blocks));
    assert!(cache.release_cached() > sizes * 8192);
    // Dropping another cache's last handle inside this scope gives its
    // blocks back to the system, not to this cache.
    let other = CachingAllocator::new();
    drop(allocator_api2::vec::Vec::<u8, _>::with_capacity_in(
        50_000,
        other.clone(),
    ));
    drop(other);
    assert_eq!(cache.stats().hits + cache.stats().misses, blocks);
}

#[test]
fn a_default_cache_created_inside_a_scope_takes_its_blocks_from_the_inner_allocator() {
    let scoped = CachingAllocator::new();
    let _scope = scoped.enter();
    let own = CachingAllocator::new();
    let buffer: allocator_api2::vec::Vec<u8, _> =
        allocator_api2::vec::Vec::with_capacity_in(64 * 1024, own.clone());
    drop(buffer);
    assert_eq!(own.stats().misses, 1);
    assert_eq!(
        scoped.stats().misses,
        0,
        "own's misses never reach the scope's cache"
    );
}

#[test]
fn realloc_of_a_cache_block_outside_any_scope_keeps_contents_and_owner() {
    let cache = CachingAllocator::new();
    let mut buffer: Vec<u8> = {
        let _scope = cache.enter();
        let mut buffer = Vec::with_capacity(8192);
        buffer.extend((0..8192).map(|i| i as u8));
        buffer
    };
    buffer.reserve_exact(100_000); // realloc outside the scope
    assert!(buffer.iter().enumerate().all(|(i, &b)| b == i as u8));
    let stats = cache.stats();
    assert_eq!((stats.bytes_in_use, stats.bytes_cached), (0, 8192));
    buffer.shrink_to_fit();
    drop(buffer);
    assert_eq!(
        cache.stats().bytes_cached,
        8192,
        "the new block was never the cache's"
    );
}

#[test]
fn a_vec_growing_inside_a_scope_takes_its_large_buffers_from_the_cache() {
    let cache = CachingAllocator::new();
    let _scope = cache.enter();
    for _pass in 0..3 {
        let mut grown = Vec::new();
        for i in 0..10_000u32 {
            grown.push(i);
        }
        assert_eq!(grown[9_999], 9_999);
    }
    let stats = cache.stats();
    // Capacities 1024 .. 16384 u32s (4 KiB .. 64 KiB): five sizes per pass.
    assert_eq!(stats.misses, 5);
    assert_eq!(stats.hits, 10);
}

#[test]
fn stats_show_a_cross_thread_free_as_soon_as_it_returns() {
    let cache = CachingAllocator::new();
    let (send, receive) = mpsc::channel::<Vec<u8>>();
    let (done, wait) = mpsc::channel::<()>();
    let freer = std::thread::spawn(move || {
        for buffer in receive {
            drop(buffer);
            done.send(()).unwrap();
        }
    });
    let _scope = cache.enter();
    for round in 1..=5 {
        send.send(vec![0u8; 10_000]).unwrap();
        wait.recv().unwrap();
        let stats = cache.stats();
        assert_eq!((stats.frees, stats.bytes_in_use), (round, 0));
    }
    drop(send);
    freer.join().unwrap();
}

/// A best-fit cache as the scope: its arena's own tables (B-trees, hash maps,
/// bins) allocate through this global allocator while the cache's lock is
/// held, and must come from the inner allocator, not recurse into the cache.
#[test]
fn a_best_fit_scope_serves_plain_vecs_and_keeps_its_tables_out() {
    let cache = CachingAllocator::builder()
        .size_policy(caching_allocator::SizePolicy::BestFit)
        .build();
    let outputs: Vec<f32> = {
        let _scope = cache.enter();
        (0..5)
            .map(|pass| {
                let input = vec![pass as f32; FLOATS + pass * 1000];
                let out = forward(&input);
                // Trims and stats inside the scope allocate bookkeeping too.
                cache.trim(FLOATS);
                let _ = cache.stats();
                out
            })
            .collect()
    };
    assert_eq!(outputs[4], 4.0 * 2.0 * (FLOATS + 4000) as f32);
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.misses, 15, "{stats:?}");
    assert_eq!(stats.frees, 15);
    assert_eq!(stats.bytes_in_use, 0);
    cache.release_cached();
    assert_eq!(cache.stats().bytes_reserved, 0);
}

#[test]
fn scoped_global_knows_it_is_installed() {
    assert!(ScopedGlobal::is_installed());
}

/// A scope reports the blocks it handed out that are still live: what a
/// request kept (its output, a library's thread-local scratch).
#[test]
fn a_scope_reports_the_blocks_it_handed_out_that_are_still_live() {
    let cache = CachingAllocator::new();
    let outer = cache.enter();
    let kept = vec![1u8; 10_000];
    let (inner_kept, inner_live) = {
        let inner = cache.enter();
        let inner_kept = vec![2u8; 20_000];
        drop(vec![3u8; 30_000]);
        // Below the minimum size: not a scope block.
        let small: Vec<u8> = (0..100).collect();
        assert_eq!(small.len(), 100);
        (inner_kept, inner.end())
    };
    // The inner scope's blocks are its own, not the outer's.
    assert_eq!((inner_live.blocks, inner_live.bytes), (1, 20_000));
    let live = outer.live_blocks();
    assert_eq!((live.blocks, live.bytes), (1, 10_000));
    // Freed on another thread: no longer live.
    std::thread::spawn(move || drop(kept)).join().unwrap();
    assert_eq!(outer.end().blocks, 0);
    drop(inner_kept);
    assert_eq!(cache.stats().bytes_in_use, 0);
}

/// A cache with per-thread front caches entered as the scope of two
/// threads: plain `Vec<u8>`s of 4 KiB and more allocated and freed in loops,
/// every other one sent to the other thread and freed there (inside its
/// scope: frees go to the owner, through the freeing thread's front). Every
/// buffer keeps its bytes; once both threads are gone the counters are
/// exact, and `release_cached()` reaches their fronts: it returns every
/// cached byte and nothing stays reserved.
#[test]
fn a_front_cache_scope_on_two_threads_frees_on_either() {
    const ROUNDS: usize = if cfg!(miri) { 20 } else { 300 };
    type Parcel = (u8, Vec<u8>);
    let cache = CachingAllocator::builder()
        .front_cache_bytes(FRONT_CACHE_BYTES)
        .build();
    let (to_second, from_first) = mpsc::channel::<Parcel>();
    let (to_first, from_second) = mpsc::channel::<Parcel>();
    let work = |me: u8, send: mpsc::Sender<Parcel>, receive: mpsc::Receiver<Parcel>| {
        let cache = &cache;
        move || {
            // Compared a line at a time (a `memcmp`): byte by byte, the
            // check was half of this test's time under Miri.
            let check = |(seed, buffer): &Parcel| {
                let line = [*seed; 1024];
                assert!(
                    buffer
                        .chunks(line.len())
                        .all(|chunk| chunk == &line[..chunk.len()]),
                    "a buffer of {} bytes changed",
                    buffer.len()
                );
            };
            let _scope = cache.enter();
            for round in 0..ROUNDS {
                let seed = me.wrapping_mul(100).wrapping_add(round as u8) | 1;
                // One allocation of at least the scope's minimum size.
                let buffer = vec![seed; 4096 + (round % 5) * 1000];
                if round.is_multiple_of(2) {
                    send.send((seed, buffer)).unwrap();
                } else {
                    check(&(seed, buffer));
                }
                while let Ok(parcel) = receive.try_recv() {
                    check(&parcel);
                }
            }
            drop(send);
            for parcel in receive {
                check(&parcel);
            }
        }
    };
    std::thread::scope(|threads| {
        threads.spawn(work(1, to_second, from_second));
        threads.spawn(work(2, to_first, from_first));
    });
    let stats = cache.stats();
    let buffers = 2 * ROUNDS as u64;
    assert_eq!(stats.hits + stats.misses, buffers, "{stats:?}");
    assert_eq!(stats.frees, buffers, "{stats:?}");
    assert_eq!(
        (stats.bytes_in_use, stats.blocks_in_use),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(stats.bytes_reserved, stats.bytes_cached, "{stats:?}");
    assert!(stats.hits > stats.misses, "{stats:?}");
    assert_eq!(cache.release_cached(), stats.bytes_cached);
    let released = cache.stats();
    assert_eq!(
        (released.bytes_reserved, released.bytes_cached),
        (0, 0),
        "{released:?}"
    );
}

/// A scope's cache with a hard limit: past it a plain `Vec`'s
/// `try_reserve` sees an ordinary allocation failure (an infallible push
/// would call `handle_alloc_error`), and what fits afterwards succeeds.
#[test]
fn a_request_past_a_scopes_limit_is_an_ordinary_allocation_failure() {
    let cache = CachingAllocator::builder()
        .size_policy(caching_allocator::SizePolicy::BestFit)
        .max_bytes(1 << 20)
        .build();
    {
        let _scope = cache.enter();
        let mut request: Vec<u8> = Vec::new();
        assert!(request.try_reserve_exact(600 << 10).is_ok());
        let mut another: Vec<u8> = Vec::new();
        assert!(another.try_reserve_exact(600 << 10).is_err());
        drop(request);
        assert!(another.try_reserve_exact(600 << 10).is_ok());
    }
    let stats = cache.stats();
    assert_eq!(stats.limit_failures, 1, "{stats:?}");
    assert!(stats.peak_bytes_reserved <= 1 << 20, "{stats:?}");
}

/// A snapshot taken inside the cache's own scope allocates nothing from
/// it: its books go to the inner allocator.
#[test]
fn a_snapshot_inside_its_caches_scope_takes_nothing_from_the_cache() {
    let cache = CachingAllocator::builder()
        .size_policy(caching_allocator::SizePolicy::BestFit)
        .record_history(10_000)
        .build();
    let _scope = cache.enter();
    // Under Miri 10 blocks: the page's rows and events are most of the
    // test's time there, and one block in use already shows where they go.
    let blocks = if cfg!(miri) { 10 } else { 50 };
    let kept: Vec<Vec<u8>> = (0..blocks).map(|i| vec![i as u8; 8192]).collect();
    let before = cache.stats();
    let snapshot = cache.snapshot();
    // Writing it uses no memory of the cache's either (the output is the
    // caller's: a sink that allocates nothing).
    snapshot.write_pytorch(&mut std::io::sink()).unwrap();
    snapshot
        .write_html("in scope", &mut std::io::sink())
        .unwrap();
    let after = cache.stats();
    assert_eq!(
        (after.hits, after.misses, after.bytes_in_use),
        (before.hits, before.misses, before.bytes_in_use),
        "the snapshot allocated from the cache it describes"
    );
    assert!(snapshot.bytes_in(caching_allocator::snapshot::BlockState::InUse) >= blocks * 8192);
    drop(kept);
}

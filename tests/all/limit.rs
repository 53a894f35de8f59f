//! The hard limit (`Builder::max_bytes`): `bytes_reserved` never exceeds it,
//! with every policy, with fronts, on several threads; a request past it
//! makes the cache give back its free memory, then fails cleanly, and the
//! next request that fits succeeds.

use std::sync::Barrier;

use allocator_api2::alloc::{Allocator, Layout};
use allocator_api2::vec::Vec;
use caching_allocator::{Builder, CachingAllocator, FRONT_CACHE_BYTES, SizePolicy};

use crate::fixture::{Counting, Held, Rng, give, l, take};

const MAX: usize = 2 << 20;

fn limited() -> std::vec::Vec<(&'static str, Builder)> {
    let builder = || CachingAllocator::builder().max_bytes(MAX);
    vec![
        ("exact", builder()),
        (
            "exact, fronts",
            builder().front_cache_bytes(FRONT_CACHE_BYTES),
        ),
        (
            "size classes",
            builder().size_policy(SizePolicy::PowerOfTwoDivisions(4)),
        ),
        ("best fit", builder().size_policy(SizePolicy::BestFit)),
        (
            "best fit, per-thread fronts",
            builder()
                .size_policy(SizePolicy::BestFit)
                .per_cpu_fronts(false),
        ),
        (
            "best fit, no fronts",
            builder()
                .size_policy(SizePolicy::BestFit)
                .front_cache_bytes(0),
        ),
    ]
}

const SIZES: [usize; 7] = [64, 1000, 4096, 20_000, 100_000, 400_000, 1 << 20];

/// Random traffic on one thread; the limit checked after every step.
fn traffic<A: Allocator>(cache: &CachingAllocator<A>, what: &str, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut held: std::vec::Vec<Held> = std::vec::Vec::new();
    let mut refused = 0u64;
    for _ in 0..600 {
        if rng.below(3) > 0 || held.is_empty() {
            let layout = l(SIZES[rng.below(SIZES.len())]);
            match cache.allocate(layout) {
                Ok(block) => held.push(Held {
                    ptr: block.cast(),
                    layout,
                }),
                Err(_) => {
                    refused += 1;
                    // Refused only when what is live leaves no room.
                    let live: usize = held.iter().map(|held| held.layout.size()).sum();
                    assert!(
                        live + layout.size() > MAX / 2,
                        "{what}: refused {layout:?} with {live} live"
                    );
                }
            }
        } else {
            give(cache, held.swap_remove(rng.below(held.len())));
        }
        let stats = cache.stats();
        assert!(stats.bytes_reserved <= MAX, "{what}: {stats:?}");
    }
    let stats = cache.stats();
    assert_eq!(stats.limit_failures, refused, "{what}: {stats:?}");
    assert!(refused > 0, "{what}: the traffic never reached the limit");
    held.into_iter().for_each(|held| give(cache, held));
}

#[test]
fn bytes_reserved_never_exceeds_the_limit_with_any_policy() {
    for (what, builder) in limited() {
        let backing = Counting::new();
        let cache = builder.clone().build_in(backing.clone());
        traffic(&cache, what, 1);
        assert!(backing.live_bytes() <= MAX, "{what}");
        drop(cache);
        backing.assert_all_returned();
        let cache = builder.build();
        traffic(&cache, what, 2);
    }
}

#[test]
fn a_refused_request_leaves_the_cache_working() {
    for (what, builder) in limited() {
        let backing = Counting::new();
        let cache = builder.build_in(backing.clone());
        let big = take(&cache, l(MAX / 2 + 4096));
        assert!(cache.allocate(l(MAX / 2 + 4096)).is_err(), "{what}");
        assert_eq!(cache.stats().limit_failures, 1, "{what}");
        let small = take(&cache, l(100_000));
        give(&cache, big);
        let again = take(&cache, l(MAX / 2 + 4096));
        assert!(cache.stats().bytes_reserved <= MAX, "{what}");
        give(&cache, again);
        give(&cache, small);
        drop(cache);
        backing.assert_all_returned();
    }
}

#[test]
fn a_grow_past_the_limit_fails_and_keeps_the_old_block() {
    for (what, builder) in limited() {
        let cache = builder.build();
        let mut buffer: Vec<u8, _> = Vec::with_capacity_in(MAX / 2, cache.clone());
        buffer.extend((0..MAX / 2).map(|i| i as u8));
        let before = buffer.as_ptr();
        assert!(buffer.try_reserve_exact(MAX).is_err(), "{what}");
        assert_eq!(buffer.as_ptr(), before, "{what}");
        assert!(
            buffer.iter().enumerate().all(|(i, &b)| b == i as u8),
            "{what}"
        );
        assert!(cache.stats().bytes_reserved <= MAX, "{what}");
        buffer.pop();
        buffer.push(1); // within its capacity: no new memory
    }
}

/// Four threads of traffic on one limited cache with fronts: after every
/// step, with all of them parked at a barrier, the limit holds.
#[test]
fn four_threads_with_fronts_never_cross_the_limit() {
    const THREADS: usize = 4;
    const STEPS: usize = if cfg!(miri) { 20 } else { 400 };
    for (what, builder) in limited() {
        let cache = builder.build();
        let parked = Barrier::new(THREADS + 1);
        let checked = Barrier::new(THREADS + 1);
        std::thread::scope(|threads| {
            for t in 0..THREADS {
                let (cache, parked, checked) = (&cache, &parked, &checked);
                threads.spawn(move || {
                    let mut rng = Rng::new(t as u64 + 7);
                    let mut held: std::vec::Vec<Held> = std::vec::Vec::new();
                    for _ in 0..STEPS {
                        if rng.below(2) == 0 || held.is_empty() {
                            let layout = l(SIZES[rng.below(SIZES.len() - 1)]);
                            if let Ok(block) = cache.allocate(layout) {
                                held.push(Held {
                                    ptr: block.cast(),
                                    layout,
                                });
                            }
                        } else {
                            give(cache, held.swap_remove(rng.below(held.len())));
                        }
                        parked.wait();
                        checked.wait();
                    }
                    held.into_iter().for_each(|held| give(cache, held));
                });
            }
            for _ in 0..STEPS {
                parked.wait();
                let stats = cache.stats();
                let ok = stats.bytes_reserved <= MAX;
                checked.wait();
                assert!(ok, "{what}: {stats:?}");
            }
        });
        let stats = cache.stats();
        assert_eq!(stats.bytes_in_use, 0, "{what}: {stats:?}");
    }
}

#[test]
fn a_zero_limit_refuses_everything_but_zero_sized_requests() {
    let cache = CachingAllocator::builder().max_bytes(0).build();
    assert!(cache.allocate(l(1)).is_err());
    let empty = cache.allocate(Layout::new::<()>()).unwrap();
    assert_eq!(empty.len(), 0);
    assert_eq!(cache.stats().bytes_reserved, 0);
}

/// A budget's hard limit over three caches of different policies, each
/// worked by its own thread: after every step, with all threads parked,
/// what the members hold together is within it (and the budget's count
/// agrees with their stats); a member past it takes the others' free
/// memory first.
#[test]
fn a_budgets_hard_limit_holds_over_several_caches() {
    const STEPS: usize = if cfg!(miri) { 20 } else { 300 };
    let budget = caching_allocator::Budget::with_max_bytes(usize::MAX, 2 * MAX);
    let caches = [
        CachingAllocator::builder().budget(&budget).build(),
        CachingAllocator::builder()
            .size_policy(SizePolicy::PowerOfTwoDivisions(4))
            .budget(&budget)
            .build(),
        CachingAllocator::builder()
            .size_policy(SizePolicy::BestFit)
            .budget(&budget)
            .build(),
    ];
    let parked = Barrier::new(caches.len() + 1);
    let checked = Barrier::new(caches.len() + 1);
    std::thread::scope(|threads| {
        for (t, cache) in caches.iter().enumerate() {
            let (parked, checked) = (&parked, &checked);
            threads.spawn(move || {
                let mut rng = Rng::new(t as u64 + 11);
                let mut held: std::vec::Vec<Held> = std::vec::Vec::new();
                for _ in 0..STEPS {
                    if rng.below(2) == 0 || held.is_empty() {
                        let layout = l(SIZES[rng.below(SIZES.len())]);
                        if let Ok(block) = cache.allocate(layout) {
                            held.push(Held {
                                ptr: block.cast(),
                                layout,
                            });
                        }
                    } else {
                        give(cache, held.swap_remove(rng.below(held.len())));
                    }
                    parked.wait();
                    checked.wait();
                }
                held.into_iter().for_each(|held| give(cache, held));
            });
        }
        for _ in 0..STEPS {
            parked.wait();
            let counted = budget.bytes_reserved();
            let held: usize = caches
                .iter()
                .map(|cache| {
                    let stats = cache.stats();
                    stats.bytes_reserved + stats.bytes_decommitted
                })
                .sum();
            checked.wait();
            assert!(counted <= 2 * MAX, "{counted}");
            assert_eq!(counted, held, "the budget counts what its members hold");
        }
    });
    assert!(
        caches
            .iter()
            .map(|cache| cache.stats().limit_failures)
            .sum::<u64>()
            > 0
    );
    for cache in &caches {
        cache.release_cached();
    }
    assert_eq!(budget.bytes_reserved(), 0);
}

/// Anonymous resident memory of this process, from `/proc/self/statm`:
/// resident pages less the file-backed ones (the test binary's code pages
/// in as new paths run: over a megabyte in a debug build).
#[cfg(all(target_os = "linux", not(miri), not(asan), not(tsan)))]
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let field = |n: usize| -> usize { statm.split_whitespace().nth(n).unwrap().parse().unwrap() };
    let pages = field(1) - field(2);
    // SAFETY: sysconf only reads a configuration value.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

/// The limit as the system sees it: four threads write every block they
/// get from a best-fit cache (per-CPU fronts, per-thread fronts, none), and
/// after every step, all of them parked, the process's resident memory has
/// grown by at most the limit and a little bookkeeping. Best fit maps its
/// memory itself and gives pages back to the system; the free-list
/// policies give blocks to malloc, which may keep them resident, so only
/// `bytes_reserved` is theirs to hold. Run in a child process of its own,
/// so that no other test's memory counts; not under a sanitizer, whose
/// shadow memory is resident too.
#[cfg(all(target_os = "linux", not(miri), not(asan), not(tsan)))]
#[test]
fn resident_memory_stays_within_the_limit_under_four_threads() {
    const CHILD: &str = "CACHING_ALLOCATOR_RSS_CHILD";
    const CASE: &str = "limit::resident_memory_stays_within_the_limit_under_four_threads";
    // The threads' stacks, the cache's tables, the per-CPU slabs, the
    // test's own vectors: 0.1-0.4 MiB seen.
    const BOOKKEEPING: usize = 1 << 20;
    const THREADS: usize = 4;
    const STEPS: usize = 300;
    if std::env::var(CHILD).is_err() {
        // The child's output goes to a file, so that a hang (a worker that
        // died leaves the others at the barrier) ends in a failure that
        // shows it, not in a CI timeout.
        let log = std::env::temp_dir().join(format!("rss-limit-{}.log", std::process::id()));
        let file = std::fs::File::create(&log).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CASE, "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > std::time::Duration::from_secs(300) {
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        assert!(
            status.is_some_and(|status| status.success()) && output.contains("1 passed"),
            "child {status:?}:\n{output}"
        );
        return;
    }
    for (what, builder) in limited()
        .into_iter()
        .filter(|(what, _)| what.starts_with("best fit"))
    {
        let cache = builder.build();
        let mut base = 0;
        let parked = Barrier::new(THREADS + 1);
        let checked = Barrier::new(THREADS + 1);
        let mut peak = 0;
        let mut violation = None;
        std::thread::scope(|threads| {
            for t in 0..THREADS {
                let (cache, parked, checked) = (&cache, &parked, &checked);
                threads.spawn(move || {
                    let mut rng = Rng::new(t as u64 + 11);
                    // The thread's own memory (its stack, its malloc arena,
                    // this list) is there before the base is read.
                    let mut held: std::vec::Vec<Held> = std::vec::Vec::with_capacity(STEPS);
                    parked.wait();
                    for _ in 0..STEPS {
                        if rng.below(2) == 0 || held.is_empty() {
                            let layout = l(SIZES[rng.below(SIZES.len())]);
                            if let Ok(block) = cache.allocate(layout) {
                                let mut block = Held {
                                    ptr: block.cast(),
                                    layout,
                                };
                                // Every page written: resident, as a tensor's.
                                block.bytes_mut().fill(t as u8);
                                held.push(block);
                            }
                        } else {
                            give(cache, held.swap_remove(rng.below(held.len())));
                        }
                        parked.wait();
                        checked.wait();
                    }
                    held.into_iter().for_each(|held| give(cache, held));
                });
            }
            // Every round completes even after a violation (an assert here
            // would leave the workers waiting at the barrier forever).
            parked.wait();
            base = resident_bytes();
            for step in 0..STEPS {
                parked.wait();
                let (stats, resident) = (cache.stats(), resident_bytes());
                peak = peak.max(resident.saturating_sub(base));
                checked.wait();
                if violation.is_none()
                    && (stats.bytes_reserved > MAX || resident > base + MAX + BOOKKEEPING)
                {
                    violation = Some(format!(
                        "{what}, step {step}: resident {resident} vs {base} + {MAX} + \
                         {BOOKKEEPING}: {stats:?}"
                    ));
                }
            }
        });
        assert_eq!(violation, None);
        // The traffic did reach the limit, so the check meant something.
        assert!(
            peak > MAX / 2 && cache.stats().limit_failures > 0,
            "{what}: peak growth {peak}, {:?}",
            cache.stats()
        );
        drop(cache);
    }
}

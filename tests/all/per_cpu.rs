//! Per-CPU front caches: best fit's default where the system has restartable
//! sequences (x86-64 Linux, glibc 2.35+). Elsewhere, and under Miri and
//! ThreadSanitizer (which cannot see inside the sequences), the same caches
//! have per-thread fronts: every test here runs on either, and the ones that
//! check what only a per-CPU front does say so and return early.
//!
//! - a block freed on a CPU is the next request's there, whichever thread;
//! - threads that take turns and then park leave no more behind than two do;
//! - a release, a trim and the cache's drop reach every CPU's front;
//! - a stress run with more threads than CPUs, which migrate
//!   (`sched_setaffinity`), sleep and exit mid-traffic while another thread
//!   trims: after every allocation no live block overlaps another, every
//!   block keeps its contents until it is freed, and at rest the books are
//!   exact and a release leaves nothing;
//! - a fork while fronts hold blocks: the child allocates, frees and
//!   releases through them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use allocator_api2::alloc::Allocator;
use caching_allocator::{CachingAllocator, FrontKind, SizePolicy};

use crate::fixture::{Counting, Held, Rng, give, l, take};

fn best_fit() -> caching_allocator::Builder {
    CachingAllocator::builder().size_policy(SizePolicy::BestFit)
}

/// The CPUs this process may run on.
fn cpus() -> Vec<usize> {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        // SAFETY: `sched_getaffinity` fills the set we pass, of its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let got = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
        if got == 0 {
            // SAFETY: reading bits of an initialised set.
            return (0..libc::CPU_SETSIZE as usize)
                .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
                .collect();
        }
    }
    vec![0]
}

/// Moves the calling thread to `cpu` (a hint: a no-op where unsupported).
fn pin(cpu: usize) {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        // SAFETY: a zeroed set with one bit set, passed with its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        }
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    let _ = cpu;
}

/// Lets the calling thread run anywhere again.
fn unpin() {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        // SAFETY: as in `pin`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for cpu in cpus() {
                libc::CPU_SET(cpu, &mut set);
            }
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

#[test]
fn best_fit_has_per_cpu_fronts_where_the_system_has_them() {
    let kind = best_fit().build().front_kind();
    let expected = if cfg!(all(target_os = "linux", target_arch = "x86_64", not(miri))) {
        // ThreadSanitizer builds and systems without glibc's registration
        // fall back; this machine's CI has both kinds of run.
        [FrontKind::PerCpu, FrontKind::PerThread]
    } else {
        [FrontKind::PerThread; 2]
    };
    assert!(expected.contains(&kind), "{kind:?}");
    assert_eq!(
        best_fit().per_cpu_fronts(false).build().front_kind(),
        FrontKind::PerThread
    );
    assert_eq!(
        best_fit().front_cache_bytes(0).build().front_kind(),
        FrontKind::None
    );
    assert_eq!(CachingAllocator::new().front_kind(), FrontKind::None);
}

#[test]
fn a_block_freed_on_a_cpu_is_the_next_request_there_whichever_thread() {
    let cache = best_fit().build();
    if cache.front_kind() != FrontKind::PerCpu {
        return;
    }
    let cpu = cpus()[0];
    let freed = thread::scope(|threads| {
        threads
            .spawn(|| {
                pin(cpu);
                let held = take(&cache, l(4096));
                let addr = held.addr();
                give(&cache, held);
                addr
            })
            .join()
            .unwrap()
    });
    let (again, stats) = thread::scope(|threads| {
        threads
            .spawn(|| {
                pin(cpu);
                let before = cache.stats();
                let held = take(&cache, l(4096));
                let addr = held.addr();
                give(&cache, held);
                (addr, cache.stats().since(&before))
            })
            .join()
            .unwrap()
    });
    // A thread may be moved off its CPU (`pin` is a request); the exited
    // thread's counters are folded either way.
    if again == freed {
        assert_eq!((stats.hits, stats.misses), (1, 0), "{stats:?}");
    }
    let stats = cache.stats();
    assert_eq!(
        (stats.bytes_in_use, stats.blocks_in_use),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(cache.release_cached(), stats.bytes_reserved);
    assert_eq!(cache.stats().bytes_reserved, 0);
}

/// One pass of a decode-like model: blocks of a few sizes, some growing.
fn pass(cache: &CachingAllocator, step: usize) {
    let mut live: Vec<Held> = Vec::new();
    for round in 0..4 {
        for &size in &[64, 256, 1000, 4096, 16 << 10] {
            live.push(take(cache, l(size)));
        }
        live.push(take(cache, l((64 << 10) + 4096 * (step + round))));
        // Most of a layer's blocks go at its end.
        for held in live.drain(1..) {
            give(cache, held);
        }
    }
    for held in live {
        give(cache, held);
    }
}

/// `threads` threads take turns running passes, then park (stay alive):
/// the bytes the cache holds once they all wait. Thread `i` runs on the
/// `i`-th CPU (round robin): a thread the scheduler moved mid-pass would
/// free its blocks into another CPU's front than it took them from, and
/// how often that happens depends on the machine's load, not the cache.
fn held_after_turns(threads: usize) -> usize {
    let cache = best_fit().build();
    let turn = Mutex::new(());
    let parked = Barrier::new(threads + 1);
    let release = Barrier::new(threads + 1);
    let cpus = cpus();
    thread::scope(|scope| {
        for i in 0..threads {
            let (cache, turn, parked, release) = (&cache, &turn, &parked, &release);
            let cpu = cpus[i % cpus.len()];
            scope.spawn(move || {
                pin(cpu);
                for step in 0..4 {
                    let _mine = turn.lock().unwrap();
                    pass(cache, step);
                }
                parked.wait();
                release.wait();
            });
        }
        parked.wait();
        let held = cache.stats().bytes_reserved;
        release.wait();
        held
    })
}

#[test]
fn sixteen_parked_threads_leave_no_more_than_two() {
    if best_fit().build().front_kind() != FrontKind::PerCpu {
        return; // per thread, each parked thread keeps its front
    }
    let two = held_after_turns(2);
    let sixteen = held_after_turns(16);
    assert!(
        sixteen * 4 <= two * 5,
        "16 parked threads hold {sixteen} bytes, 2 hold {two}"
    );
}

#[test]
fn a_release_a_trim_and_the_drop_reach_every_cpus_front() {
    let backing = Counting::new();
    let cache = best_fit().build_in(backing.clone());
    let fill = |cache: &CachingAllocator<Counting>| {
        thread::scope(|threads| {
            for cpu in cpus() {
                threads.spawn(move || {
                    pin(cpu);
                    let held: Vec<Held> = [64, 1000, 4096, 50_000, 200_000]
                        .iter()
                        .flat_map(|&size| [size; 3])
                        .map(|size| take(cache, l(size)))
                        .collect();
                    held.into_iter().for_each(|held| give(cache, held));
                });
            }
        });
    };
    fill(&cache);
    let stats = cache.stats();
    assert_eq!(stats.bytes_in_use, 0, "{stats:?}");
    assert_eq!(
        stats.bytes_reserved,
        stats.bytes_cached + stats.bytes_lost_to_rounding,
        "{stats:?}"
    );
    // Fixed segments go back whole once no block in them is in a front.
    assert_eq!(cache.release_cached(), stats.bytes_reserved, "{stats:?}");
    let released = cache.stats();
    assert_eq!(
        (released.bytes_reserved, released.bytes_cached),
        (0, 0),
        "{released:?}"
    );
    backing.assert_all_returned();
    fill(&cache);
    cache.trim(0);
    assert_eq!(cache.stats().bytes_reserved, 0, "{:?}", cache.stats());
    backing.assert_all_returned();
    fill(&cache);
    assert!(backing.live_blocks() > 0);
    drop(cache);
    backing.assert_all_returned();
}

/// Live blocks of the stress test, by start: `(end, owner's stamp)`.
type Extents = Mutex<std::collections::BTreeMap<usize, (usize, u8)>>;

/// Records a new block, failing if it overlaps a live one.
fn claim(extents: &Extents, held: &Held, stamp: u8) {
    let (start, end) = (held.addr(), held.addr() + held.layout.size().max(1));
    let mut live = extents.lock().unwrap();
    if let Some((&before, &(before_end, _))) = live.range(..=start).next_back() {
        assert!(
            before_end <= start,
            "{start:#x} handed out inside live {before:#x}"
        );
    }
    if let Some((&after, _)) = live.range(start..).next() {
        assert!(
            end <= after,
            "{start:#x}..{end:#x} overlaps live {after:#x}"
        );
    }
    live.insert(start, (end, stamp));
}

/// Checks a block's contents, then forgets it (before it is freed).
fn unclaim(extents: &Extents, held: &Held, stamp: u8) {
    assert!(
        held.bytes().iter().all(|&byte| byte == stamp),
        "block {:#x} changed while it was live",
        held.addr()
    );
    extents.lock().unwrap().remove(&held.addr());
}

const SIZES: [usize; 9] = [24, 64, 200, 1000, 4096, 5000, 70_000, 300_000, 1 << 20];

#[test]
fn threads_outnumbering_cpus_migrate_sleep_and_exit_mid_traffic() {
    let seconds: f64 = std::env::var("PER_CPU_STRESS_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if cfg!(miri) { 0.0 } else { 2.0 });
    let backing = Counting::without_log();
    for cache in [
        best_fit().build_in(backing.clone()),
        best_fit().build_in(backing.clone()),
    ] {
        stress(&cache, Duration::from_secs_f64(seconds));
        let stats = cache.stats();
        assert_eq!(
            (stats.bytes_in_use, stats.blocks_in_use),
            (0, 0),
            "{stats:?}"
        );
        assert_eq!(stats.hits + stats.misses, stats.frees, "{stats:?}");
        assert_eq!(
            stats.bytes_reserved,
            stats.bytes_cached + stats.bytes_lost_to_rounding,
            "{stats:?}"
        );
        assert_eq!(cache.release_cached(), stats.bytes_reserved, "{stats:?}");
        backing.assert_all_returned();
    }
}

fn stress(cache: &CachingAllocator<Counting>, time: Duration) {
    let cpus = cpus();
    let extents = Extents::default();
    // Blocks an exiting thread leaves behind for another to free.
    let left: Mutex<Vec<(Held, u8)>> = Mutex::new(Vec::new());
    let deadline = Instant::now() + time;
    let done = AtomicBool::new(false);
    let started = AtomicUsize::new(0);
    let workers = 4 * cpus.len().max(2);
    thread::scope(|scope| {
        // The trimmer: releases and trims race the workers.
        scope.spawn(|| {
            let mut rounds = 0usize;
            while !done.load(Ordering::Relaxed) {
                match rounds % 3 {
                    0 => drop(cache.trim(1 << 20)),
                    1 => drop(cache.release_cached()),
                    _ => drop(cache.stats()),
                }
                rounds += 1;
                thread::sleep(Duration::from_micros(300));
            }
        });
        let (extents, left, cpus) = (&extents, &left, &cpus);
        let worker = move |seed: u64| {
            let mut rng = Rng::new(seed);
            let mut held: Vec<(Held, u8)> = Vec::new();
            let lifetime = 200 + rng.below(2000);
            // A thread also exits when its share of the time is up, so that
            // threads come and go however slow the build (TSan, Miri).
            let until = deadline.min(Instant::now() + time / 4);
            for op in 0..lifetime {
                if Instant::now() >= until {
                    break;
                }
                match rng.below(100) {
                    0..=44 => {
                        let size = SIZES[rng.below(SIZES.len())];
                        let mut block = take(cache, l(size));
                        let stamp = rng.byte();
                        claim(extents, &block, stamp);
                        block.bytes_mut().fill(stamp);
                        held.push((block, stamp));
                    }
                    45..=89 if !held.is_empty() => {
                        let (block, stamp) = held.swap_remove(rng.below(held.len()));
                        unclaim(extents, &block, stamp);
                        give(cache, block);
                    }
                    90..=94 => {
                        // Free what an exited thread left: a cross-thread free.
                        if let Some((block, stamp)) = left.lock().unwrap().pop() {
                            unclaim(extents, &block, stamp);
                            give(cache, block);
                        }
                    }
                    95..=97 => pin(cpus[rng.below(cpus.len())]),
                    98 => unpin(),
                    _ => thread::sleep(Duration::from_micros(rng.below(500) as u64)),
                }
                let _ = op;
            }
            // Exits mid-traffic: half its blocks go to the others.
            let keep = held.len() / 2;
            left.lock().unwrap().extend(held.drain(keep..));
            for (block, stamp) in held {
                unclaim(extents, &block, stamp);
                give(cache, block);
            }
        };
        // Keep `workers` alive until the deadline, each running a while.
        let mut handles = Vec::new();
        let mut seed = 0;
        while Instant::now() < deadline || handles.is_empty() {
            handles.retain(|handle: &thread::ScopedJoinHandle<'_, ()>| !handle.is_finished());
            while handles.len() < workers {
                seed += 1;
                started.fetch_add(1, Ordering::Relaxed);
                handles.push(scope.spawn(move || worker(seed)));
            }
            thread::sleep(Duration::from_millis(2));
            if time.is_zero() {
                break;
            }
        }
        for handle in handles {
            handle.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    for (block, stamp) in left.into_inner().unwrap() {
        unclaim(&extents, &block, stamp);
        give(cache, block);
    }
    assert!(started.load(Ordering::Relaxed) > workers || time.is_zero());
    assert!(extents.into_inner().unwrap().is_empty());
}

/// A fork while fronts hold blocks: the child (one thread, a copy of the
/// fronts) allocates, frees and releases through them; the parent goes on.
/// Run in a child process of its own, so that no other test thread holds a
/// lock at the fork.
#[cfg(all(target_os = "linux", not(miri)))]
#[test]
fn a_fork_with_fronts_in_use_leaves_both_processes_working() {
    const CHILD: &str = "CACHING_ALLOCATOR_FORK_CHILD";
    const CASE: &str = "per_cpu::a_fork_with_fronts_in_use_leaves_both_processes_working";
    if std::env::var(CHILD).is_err() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CASE, "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(
            output.status.success() && String::from_utf8_lossy(&output.stdout).contains("1 passed"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    }
    let cache = best_fit().build();
    let (park, parked) = std::sync::mpsc::channel::<()>();
    let (ready, readied) = std::sync::mpsc::channel::<()>();
    let parked = Mutex::new(parked);
    thread::scope(|threads| {
        for cpu in cpus() {
            let (cache, ready, parked) = (&cache, ready.clone(), &parked);
            threads.spawn(move || {
                pin(cpu);
                let held: Vec<Held> = SIZES.iter().map(|&size| take(cache, l(size))).collect();
                held.into_iter().for_each(|held| give(cache, held));
                ready.send(()).unwrap();
                let _ = parked.lock().unwrap().recv();
            });
        }
        for _ in cpus() {
            readied.recv().unwrap();
        }
        let before = cache.stats();
        assert!(before.bytes_cached > 0);
        // SAFETY: the other threads of this process wait on a channel, none
        // inside the allocator; the child only uses the cache and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let ok = std::panic::catch_unwind(|| {
                let held: Vec<Held> = SIZES.iter().map(|&size| take(&cache, l(size))).collect();
                held.into_iter().for_each(|held| give(&cache, held));
                cache.release_cached();
                let stats = cache.stats();
                stats.bytes_in_use == 0 && stats.bytes_reserved == 0
            });
            // SAFETY: ends the child at once, running nothing of the parent's.
            unsafe { libc::_exit(if matches!(ok, Ok(true)) { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child {status:#x}"
        );
        for _ in cpus() {
            park.send(()).unwrap();
        }
    });
    let held: Vec<Held> = SIZES.iter().map(|&size| take(&cache, l(size))).collect();
    held.into_iter().for_each(|held| give(&cache, held));
    cache.release_cached();
    assert_eq!(cache.stats().bytes_reserved, 0);
    let _ = cache.allocate(l(64)).map(|block| {
        // SAFETY: just allocated with this layout.
        unsafe { cache.deallocate(block.cast(), l(64)) }
    });
}

/// With a budget and a cap, per-CPU fronts hold their blocks as the arena's
/// blocks in use: the budget and the cap bound the arena's free bytes at
/// every moment, the fronts hold at most `PER_CPU_FRONT_BYTES` a CPU more,
/// and a release gives everything back to both.
#[test]
fn a_budget_and_a_cap_bound_the_arena_and_fronts_stay_within_their_own_bound() {
    let budget = caching_allocator::Budget::new(256 << 10);
    // Reserved address ranges: a best-fit cache over fixed segments counts
    // the free bytes it cannot give back (pinned) even past the limit.
    let cache = best_fit()
        .budget(&budget)
        .max_cached_bytes(192 << 10)
        .build();
    let other = best_fit().budget(&budget).build();
    let cpus = cpus();
    let bound = (192 << 10) + cpus.len() * caching_allocator::PER_CPU_FRONT_BYTES;
    thread::scope(|threads| {
        for (t, &cpu) in cpus.iter().enumerate() {
            let (cache, other, budget) = (&cache, &other, &budget);
            threads.spawn(move || {
                pin(cpu);
                let mut rng = Rng::new(t as u64 + 1);
                for _ in 0..300 {
                    let size = SIZES[rng.below(SIZES.len())];
                    let held: Vec<Held> = (0..4).map(|_| take(cache, l(size))).collect();
                    let theirs = take(other, l(SIZES[rng.below(SIZES.len())]));
                    held.into_iter().for_each(|held| give(cache, held));
                    give(other, theirs);
                    assert!(budget.bytes_cached() <= budget.limit());
                    let stats = cache.stats();
                    assert!(stats.bytes_cached <= bound, "{stats:?}");
                }
            });
        }
    });
    let stats = cache.stats();
    assert_eq!(
        (stats.bytes_in_use, stats.blocks_in_use),
        (0, 0),
        "{stats:?}"
    );
    cache.release_cached();
    other.release_cached();
    assert_eq!(budget.bytes_cached(), 0);
    assert_eq!(cache.stats().bytes_reserved, 0, "{:?}", cache.stats());
}

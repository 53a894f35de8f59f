//! Memory that comes back by itself: a cache built with
//! [`Builder::release_after`](crate::Builder::release_after) gives back the
//! free memory nobody reused for that long, without a call from its user.
//!
//! **What "not reused" means.** Each window of `release_after`, the cache
//! keeps the lowest its free bytes fell to (the low-water mark): that many
//! bytes stayed free the whole window, nobody needed them. When the window
//! closes, that many go back, oldest first (a trim: for best fit, the free
//! top is uncommitted and free pages inside are decommitted in place; for
//! the free-list policies, whole blocks go back to the backing allocator),
//! and the front caches are drained so that their blocks age in the shared
//! cache for the next window. jemalloc's and mimalloc's decay of dirty pages
//! is the anchor.
//!
//! Best fit over fixed segments (a cache built with `build_in`, and every
//! best-fit cache under Miri and on systems other than Linux) can give a
//! segment back only whole, and the low-water mark cannot say which: it
//! counts the never-used tail of a segment reused every few seconds as
//! much as a segment nobody touched. There, what goes back is every
//! segment that was wholly free the whole window (no block was freed into
//! it since before the window opened; a block drained from a front was
//! in use until the drain), and a segment reused in the window stays,
//! however much of it stayed free.
//!
//! **When it runs.** On the cache's own slow paths (a miss, a free that
//! reaches the shared cache), which read a coarse clock once in 32
//! calls (a read costs a few nanoseconds, a window lasts
//! seconds) and compare it with the window's end: never on a front hit. An idle server makes no calls at
//! all, so [`spawn`] starts one background thread for every cache with
//! decay, stopped when its [`Decay`] handle drops; no thread runs unless
//! asked.
//!
//! **The clock.** The system's monotonic clock, or a [`Clock::manual`] a test
//! moves by hand ([`Builder::decay_clock`](crate::Builder::decay_clock)).

use core::fmt;
use core::sync::atomic::Ordering;
use core::time::Duration;

use crate::sync::{Arc, AtomicU64};

/// A cache's slow paths look at the system clock once in this many calls
/// (a manual clock, on every call).
pub(crate) const CHECK_EVERY: u32 = 32;

#[cfg(not(loom))]
pub use background::{Decay, spawn};
#[cfg(not(loom))]
pub(crate) use background::{Member, register};

/// Best fit's default window: free memory unused for this long goes back
/// (jemalloc's dirty decay is 10 s; measured here, see the README's
/// "Memory that comes back").
pub const DEFAULT_RELEASE_AFTER: Duration = Duration::from_secs(10);

/// Where a cache reads the time for decay: the system's monotonic clock (the
/// default), or a clock that moves only when told to, for tests.
///
/// ```
/// use std::time::Duration;
/// use allocator_api2::vec::Vec;
/// use caching_allocator::{CachingAllocator, decay::Clock};
///
/// let clock = Clock::manual();
/// let cache = CachingAllocator::builder()
///     .release_after(Duration::from_secs(10))
///     .decay_clock(&clock)
///     .build();
/// drop(Vec::<u8, _>::with_capacity_in(1 << 20, cache.clone()));
/// assert_eq!(cache.stats().bytes_cached, 1 << 20);
/// clock.advance(Duration::from_secs(10));
/// cache.decay(); // the first window closes: the block was freed inside it
/// assert_eq!(cache.stats().bytes_cached, 1 << 20);
/// clock.advance(Duration::from_secs(10));
/// cache.decay(); // a whole window, nobody reused it
/// assert_eq!(cache.stats().bytes_cached, 0);
/// assert_eq!(cache.stats().bytes_decayed, 1 << 20);
/// ```
#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system's clock; else nanoseconds a test set.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system's monotonic clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock at zero that moves only by [`advance`](Self::advance).
    pub fn manual() -> Self {
        Self {
            manual: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Moves a manual clock forward (does nothing to the system's).
    pub fn advance(&self, by: Duration) {
        if let Some(now) = &self.manual {
            now.fetch_add(
                by.as_nanos().min(u128::from(u64::MAX)) as u64,
                Ordering::AcqRel,
            );
        }
    }

    /// Whether reading the time costs a system clock read (a few ns), not
    /// a load.
    #[inline]
    pub(crate) fn is_system(&self) -> bool {
        self.manual.is_none()
    }

    /// The time since an arbitrary start, in nanoseconds.
    pub(crate) fn now(&self) -> u64 {
        match &self.manual {
            Some(now) => now.load(Ordering::Acquire),
            None => coarse_now(),
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            Some(now) => write!(
                f,
                "Clock::manual({:?})",
                Duration::from_nanos(now.load(Ordering::Relaxed))
            ),
            None => f.write_str("Clock::system()"),
        }
    }
}

/// The monotonic clock, coarse where the system has one (a few
/// nanoseconds to read, a few milliseconds of resolution: plenty for
/// windows of seconds).
fn coarse_now() -> u64 {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock_gettime` writes the timespec we pass.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) } == 0 {
            return now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
        }
    }
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// A cache's decay books (under its lock).
#[derive(Debug)]
pub(crate) struct Window {
    /// The window's length in nanoseconds.
    pub(crate) length: u64,
    /// The lowest the free bytes fell to in this window.
    pub(crate) low_water: usize,
}

impl Window {
    pub(crate) fn new(length: Duration) -> Self {
        Self {
            length: length.as_nanos().min(u128::from(u64::MAX)) as u64,
            // Nothing was free when the window opened.
            low_water: 0,
        }
    }

    /// The free bytes fell to `cached` (a reuse, a release).
    #[inline]
    pub(crate) fn note(&mut self, cached: usize) {
        self.low_water = self.low_water.min(cached);
    }

    /// Closes the window: the bytes that stayed free all of it (at most
    /// `cached`, what is free now), and a new window starting at `cached`.
    pub(crate) fn close(&mut self, cached: usize) -> usize {
        let unused = self.low_water.min(cached);
        self.low_water = cached;
        unused
    }
}

/// The background thread (std only: loom models no threads of ours).
#[cfg(not(loom))]
mod background {
    use core::fmt;
    use core::time::Duration;
    use std::sync::{Arc, Condvar, Mutex, Weak};
    use std::thread::JoinHandle;

    /// What the background thread needs of a cache.
    pub(crate) trait Member: Send + Sync {
        /// Gives back what went unused for a window, if a window closed.
        fn decay(&self);
        /// The cache's window, in nanoseconds.
        fn window(&self) -> u64;
    }

    /// Every cache built with decay, for the background thread: by weak count,
    /// so the registry keeps no cache alive.
    static MEMBERS: Mutex<Vec<Weak<dyn Member>>> = Mutex::new(Vec::new());

    /// The running threads' signals, so that a new cache wakes them: a
    /// thread napping for a second (or a long window) would otherwise leave
    /// a cache with a short window undecayed that long.
    static THREADS: Mutex<Vec<Weak<Signal>>> = Mutex::new(Vec::new());

    /// How a thread is told to stop, or to look at the list again.
    #[derive(Default)]
    struct Signal {
        state: Mutex<Flags>,
        wake: Condvar,
    }

    #[derive(Default)]
    struct Flags {
        stopped: bool,
        /// A cache joined since the thread last read the list.
        joined: bool,
    }

    impl Signal {
        fn flags(&self) -> std::sync::MutexGuard<'_, Flags> {
            self.state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }

    /// Adds a cache to the background thread's list, and wakes the threads.
    pub(crate) fn register(member: Weak<dyn Member>) {
        {
            let mut members = MEMBERS
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            members.retain(|member| member.strong_count() > 0);
            members.push(member);
        }
        // After the push: a thread that read the list before it finds the
        // flag set before it naps (the flag is read under the same lock).
        let threads: Vec<Arc<Signal>> = THREADS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for signal in threads {
            signal.flags().joined = true;
            signal.wake.notify_all();
        }
    }

    /// The background thread of [`spawn`]; stops (and is joined) when dropped.
    #[must_use = "the thread stops when the handle drops"]
    pub struct Decay {
        signal: Arc<Signal>,
        thread: Option<JoinHandle<()>>,
    }

    impl fmt::Debug for Decay {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Decay").finish_non_exhaustive()
        }
    }

    /// Starts one thread that gives back, for every cache built with decay
    /// (before or after), the free memory nobody reused for its window, also
    /// while the program makes no allocator calls at all. It wakes a few times
    /// a window (at least every second). Dropping the handle stops it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use allocator_api2::vec::Vec;
    /// use caching_allocator::{CachingAllocator, decay};
    ///
    /// let _decay = decay::spawn();
    /// let cache = CachingAllocator::builder()
    ///     .release_after(Duration::from_millis(50))
    ///     .build();
    /// drop(Vec::<u8, _>::with_capacity_in(1 << 20, cache.clone()));
    /// std::thread::sleep(Duration::from_millis(300)); // idle: no call at all
    /// assert_eq!(cache.stats().bytes_cached, 0);
    /// ```
    pub fn spawn() -> Decay {
        let signal = Arc::new(Signal::default());
        {
            let mut threads = THREADS
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            threads.retain(|thread| thread.strong_count() > 0);
            threads.push(Arc::downgrade(&signal));
        }
        let theirs = Arc::clone(&signal);
        let thread = std::thread::Builder::new()
            .name("caching-allocator-decay".into())
            .spawn(move || {
                let signal = theirs;
                let mut flags = signal.flags();
                while !flags.stopped {
                    flags.joined = false;
                    let members: Vec<Arc<dyn Member>> = {
                        let mut members = MEMBERS
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        members.retain(|member| member.strong_count() > 0);
                        members.iter().filter_map(Weak::upgrade).collect()
                    };
                    let shortest = members.iter().map(|member| member.window()).min();
                    drop(flags);
                    for member in &members {
                        // A backing allocator that panics stops no other cache's
                        // decay, nor the thread (the hook reported it).
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            member.decay()
                        }));
                    }
                    // The last counts may free caches: here, with no lock held.
                    drop(members);
                    let nap = shortest.map_or(Duration::from_secs(1), |window| {
                        Duration::from_nanos(window / 4)
                            .clamp(Duration::from_millis(1), Duration::from_secs(1))
                    });
                    flags = signal.flags();
                    if !flags.stopped && !flags.joined {
                        flags = signal
                            .wake
                            .wait_timeout(flags, nap)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                }
            })
            .ok();
        Decay { signal, thread }
    }

    impl Drop for Decay {
        fn drop(&mut self) {
            self.signal.flags().stopped = true;
            self.signal.wake.notify_all();
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

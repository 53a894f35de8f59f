//! The fixture the loom models in `tests/` share: [`model`] (loom's checker
//! with the preemption bound from `LOOM_MAX_PREEMPTIONS`), [`Counting`] (a
//! backing allocator with a loom-visible ledger and a refusal knob),
//! [`Hooked`] (a `Counting` that runs a check from inside every backing call)
//! and [`Block`] (a block pointer that may cross threads).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`.
#![cfg(loom)]

use std::collections::{BTreeMap, BTreeSet};
use std::ptr::NonNull;

use caching_allocator::{AllocError, Allocator, Global};
use core::alloc::Layout;
use loom::sync::{Arc, Mutex};

/// Runs `f` under loom, exploring every interleaving up to the preemption
/// bound (`LOOM_MAX_PREEMPTIONS`, default 2), and prints how many it ran.
pub fn model<F>(f: F)
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

/// Runs `f` under loom and returns the distinct outcomes it reported, so a
/// test can check that the races it is about were explored.
pub fn model_outcomes<T, F>(f: F) -> BTreeSet<T>
where
    T: Ord + Send + 'static,
    F: Fn() -> T + Sync + Send + 'static,
{
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let sink = seen.clone();
    model(move || {
        let outcome = f();
        sink.lock().unwrap().insert(outcome);
    });
    std::mem::take(&mut *seen.lock().unwrap())
}

#[derive(Default)]
struct Ledger {
    live: BTreeMap<usize, Layout>,
    allocs: u64,
    frees: u64,
    /// Backing allocations still to refuse.
    refuse: usize,
}

/// A backing allocator with a loom-visible ledger: panics on a double return,
/// a return with another layout, or a block it never handed out (a block
/// given back to the wrong cache's backing); can refuse the next allocations.
/// Clones share the ledger.
#[derive(Clone, Default)]
pub struct Counting {
    ledger: Arc<Mutex<Ledger>>,
}

impl Counting {
    /// Blocks handed out and not returned.
    pub fn live_blocks(&self) -> usize {
        self.ledger.lock().unwrap().live.len()
    }

    /// Bytes (sum of layout sizes) handed out and not returned.
    pub fn live_bytes(&self) -> usize {
        let ledger = self.ledger.lock().unwrap();
        ledger.live.values().map(Layout::size).sum()
    }

    /// Successful allocations.
    pub fn allocs(&self) -> u64 {
        self.ledger.lock().unwrap().allocs
    }

    /// Successful allocations and returns, read together.
    pub fn allocs_and_frees(&self) -> (u64, u64) {
        let ledger = self.ledger.lock().unwrap();
        (ledger.allocs, ledger.frees)
    }

    /// The next `n` allocations are refused.
    pub fn refuse_next(&self, n: usize) {
        self.ledger.lock().unwrap().refuse = n;
    }
}

// SAFETY: blocks come from `Global` and go back to it unchanged.
unsafe impl Allocator for Counting {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        {
            let mut ledger = self.ledger.lock().unwrap();
            if ledger.refuse > 0 {
                ledger.refuse -= 1;
                return Err(AllocError);
            }
        }
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

type Hook = std::sync::Arc<dyn Fn() + Send + Sync>;

/// A [`Counting`] backing that runs a hook (set by the test, typically one
/// reading its owner's state) from inside every call: loom reports a
/// deadlock if the owner called its backing with its own lock held.
#[derive(Clone, Default)]
pub struct Hooked {
    pub counting: Counting,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl Hooked {
    /// Sets the hook, run from inside every call from now on.
    pub fn set_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(std::sync::Arc::new(hook));
    }

    /// Removes the hook, breaking the cycle a hook holding its owner makes
    /// (so the owner can drop).
    pub fn clear_hook(&self) {
        *self.hook.lock().unwrap() = None;
    }

    fn run_hook(&self) {
        let hook = self.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook();
        }
    }
}

// SAFETY: delegates to `Counting`.
unsafe impl Allocator for Hooked {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.run_hook();
        self.counting.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        self.run_hook();
        // SAFETY: forwarded contract.
        unsafe { self.counting.deallocate(ptr, layout) }
    }
}

/// A block pointer that may cross threads (the cache hands blocks out to
/// whichever thread asks; ownership moves with the pointer).
pub struct Block(pub NonNull<u8>);

// SAFETY: a block is plain memory owned by whoever holds the pointer.
unsafe impl Send for Block {}

//! `--html FILE`: a trace replayed through a best-fit cache that records its
//! history, with a snapshot taken when a steady pass (one of the file's
//! second round) first reaches the trace's peak of live bytes, written as
//! the crate's own page (`Snapshot::write_html`) and as PyTorch's pickle
//! beside it (`FILE` with `.pickle`).

use std::alloc::Layout;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use caching_allocator::{CachingAllocator, SizePolicy, Snapshot};

use crate::engine::{self, Options, ReplayAlloc};
use crate::trace::Trace;

/// A best-fit cache that takes one snapshot, in a steady pass, when the
/// bytes in use first reach the trace's peak.
#[derive(Clone)]
pub struct Snapshotting {
    cache: CachingAllocator,
    shared: Arc<Shared>,
}

struct Shared {
    in_use: AtomicUsize,
    peak: usize,
    /// Passes before this one are not steady (the file's first round).
    steady: usize,
    pass: AtomicUsize,
    snapshot: Mutex<Option<Snapshot>>,
}

impl Snapshotting {
    fn new(trace: &Trace, passes: usize) -> Self {
        Self {
            cache: CachingAllocator::builder()
                .size_policy(SizePolicy::BestFit)
                .record_history(1 << 18)
                .build(),
            shared: Arc::new(Shared {
                in_use: AtomicUsize::new(0),
                peak: trace.peak_live_bytes,
                steady: trace.passes.len().min(passes - 1),
                pass: AtomicUsize::new(0),
                snapshot: Mutex::new(None),
            }),
        }
    }
}

impl ReplayAlloc for Snapshotting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let block = unsafe { ReplayAlloc::alloc(&self.cache, layout) };
        let shared = &*self.shared;
        let in_use = shared.in_use.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        if shared.pass.load(Ordering::Relaxed) >= shared.steady && in_use >= shared.peak {
            let mut snapshot = shared.snapshot.lock().unwrap_or_else(|e| e.into_inner());
            if snapshot.is_none() {
                *snapshot = Some(self.cache.snapshot());
            }
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        self.shared
            .in_use
            .fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { ReplayAlloc::dealloc(&self.cache, block, layout) }
    }

    fn begin_pass(&self, pass: usize) {
        self.shared.pass.store(pass, Ordering::Relaxed);
    }
}

/// Replays `trace` for `passes` passes and writes the page (and the
/// pickle); returns the snapshot.
pub fn write(trace: &Trace, passes: usize, path: &std::path::Path) -> Result<Snapshot, String> {
    let row = Snapshotting::new(trace, passes);
    engine::replay(
        trace,
        &row,
        &Options {
            passes,
            ..Options::default()
        },
    )?;
    let snapshot = row
        .shared
        .snapshot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_else(|| row.cache.snapshot());
    let title = format!(
        "{}: one best-fit cache at a steady pass's peak of live bytes",
        trace.name
    );
    let mut page = Vec::new();
    snapshot
        .write_html(&title, &mut page)
        .map_err(|error| error.to_string())?;
    std::fs::write(path, page).map_err(|error| format!("{}: {error}", path.display()))?;
    let mut pickle = Vec::new();
    snapshot
        .write_pytorch(&mut pickle)
        .map_err(|error| error.to_string())?;
    std::fs::write(path.with_extension("pickle"), pickle).map_err(|error| error.to_string())?;
    Ok(snapshot)
}

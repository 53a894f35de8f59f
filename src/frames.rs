//! The stacks of recorded events ([`Builder::record_frames`], the
//! `backtrace` feature), as PyTorch records Python and C++ frames with
//! `_record_memory_history(stacks="all")`.
//!
//! An event keeps only the return addresses of its stack, walked by the
//! `backtrace` crate without allocating (libgcc's unwinder); they are turned
//! into function names, files and lines when a snapshot is taken, each
//! address once. Frames inside this crate (and the walk's own) are left out:
//! a stack starts at the code that asked. Without the feature, or under Miri
//! and loom, no stack is walked and every event's list is empty.
//!
//! [`Builder::record_frames`]: crate::Builder::record_frames

use crate::sync::AtomicUsize;

/// One frame of a recorded stack: PyTorch's `Frame` (`name`, `filename`,
/// `line`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Frame {
    /// The function, demangled, without its hash (`"?"` when unknown).
    pub name: String,
    /// Its source file (`""` when unknown).
    pub filename: String,
    /// Its line (0 when unknown).
    pub line: u32,
}

/// The deepest stack an event keeps.
pub const MAX_FRAMES: usize = 64;

/// Frames walked beyond those asked for: the walk's and the cache's own,
/// left out when resolved (the deepest path, a grow under a limit that
/// evicts, is about 16 frames in a debug build).
pub(crate) const OWN_FRAMES: usize = 24;

/// Walks this thread's stack into `slots` (return addresses, 0 after the
/// last), innermost first.
#[cfg(all(feature = "backtrace", not(miri), not(loom)))]
#[inline(never)]
pub(crate) fn capture(slots: &[AtomicUsize]) {
    use core::sync::atomic::Ordering::Relaxed;
    // The walk allocates nothing itself; should the unwinder ever allocate,
    // it goes to the system, not into a cache being recorded.
    let _inside = crate::reentry::inside();
    let mut filled = 0;
    backtrace::trace(|frame| {
        let Some(slot) = slots.get(filled) else {
            return false;
        };
        slot.store(frame.ip() as usize, Relaxed);
        filled += 1;
        filled < slots.len()
    });
    for slot in &slots[filled..] {
        slot.store(0, Relaxed);
    }
}

/// No stacks here.
#[cfg(not(all(feature = "backtrace", not(miri), not(loom))))]
#[inline]
pub(crate) fn capture(slots: &[AtomicUsize]) {
    let _ = slots;
}

/// The frames of each stack of return addresses, each address resolved
/// once; the frames inside this crate and the walk left out at the top,
/// `depth` kept below them.
#[cfg(all(feature = "backtrace", not(miri), not(loom)))]
pub(crate) fn resolve(
    stacks: &[std::vec::Vec<usize>],
    depth: usize,
) -> std::vec::Vec<std::vec::Vec<Frame>> {
    use std::collections::HashMap;
    let mut known: HashMap<usize, std::vec::Vec<Frame>> = HashMap::new();
    stacks
        .iter()
        .map(|stack| {
            let mut frames = std::vec::Vec::new();
            for &ip in stack.iter().filter(|&&ip| ip != 0) {
                let resolved = known.entry(ip).or_insert_with(|| {
                    let mut frames = std::vec::Vec::new();
                    // The return address points after the call: look one
                    // byte back, inside the calling instruction.
                    backtrace::resolve(core::ptr::without_provenance_mut(ip - 1), |symbol| {
                        frames.push(Frame {
                            name: symbol
                                .name()
                                .map_or_else(|| "?".to_owned(), |name| format!("{name:#}")),
                            filename: symbol
                                .filename()
                                .map_or_else(String::new, |path| path.display().to_string()),
                            line: symbol.lineno().unwrap_or(0),
                        });
                    });
                    frames
                });
                frames.extend(resolved.iter().cloned());
            }
            let inside = frames
                .iter()
                .take_while(|frame| is_inside(&frame.name))
                .count();
            frames.drain(..inside);
            frames.truncate(depth);
            frames
        })
        .collect()
}

/// Whether a frame is the walk's or this crate's own.
#[cfg(all(feature = "backtrace", not(miri), not(loom)))]
fn is_inside(name: &str) -> bool {
    let name = name.trim_start_matches('<');
    ["backtrace::", "caching_allocator::"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        || name.starts_with("_Unwind")
}

/// No stacks here: an empty list for each.
#[cfg(not(all(feature = "backtrace", not(miri), not(loom))))]
pub(crate) fn resolve(
    stacks: &[std::vec::Vec<usize>],
    depth: usize,
) -> std::vec::Vec<std::vec::Vec<Frame>> {
    let _ = depth;
    stacks.iter().map(|_| std::vec::Vec::new()).collect()
}

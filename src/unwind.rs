//! Panics from user code: caught where they happen, resumed once the books
//! are consistent.
//!
//! **The panic policy.** A backing allocator (or an owner's `Drop`) is user
//! code and may panic. The crate never lets such a panic leave its books
//! half-updated:
//! - a panicking backing `allocate` fails the request: nothing was taken, so
//!   nothing changes (the cache may have released its free lists first, as
//!   for any failed allocation);
//! - a panicking backing `deallocate` is caught; the block handed to it counts
//!   as given back (its fate is the backing allocator's), and the operation
//!   goes on to its end: every other block is listed, in use or given back as
//!   the books say, and a budget's reservations match what its caches hold.
//!   Then the first panic is resumed to the caller, its payload intact;
//! - [`ScopedGlobal`](crate::ScopedGlobal) never unwinds (unwinding out of a
//!   global allocator is undefined behaviour): a panic inside a scope's owner
//!   is caught there, the panic hook has already reported it, and the request
//!   completes without the owner (see `global.rs`).

use std::any::Any;
use std::boxed::Box;
use std::panic::{self, AssertUnwindSafe};

/// The first panic caught during one operation, to be resumed at its end.
#[derive(Default)]
#[must_use = "a caught panic must be resumed"]
pub(crate) struct Deferred {
    first: Option<Box<dyn Any + Send>>,
}

impl Deferred {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Runs `f`; if it panics, keeps the panic (the first one of this
    /// operation) and returns `None`.
    ///
    /// `AssertUnwindSafe`: every caller leaves its state consistent whether
    /// `f` returns or not (that is what catching is for).
    #[inline]
    pub(crate) fn catch<R>(&mut self, f: impl FnOnce() -> R) -> Option<R> {
        match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(value) => Some(value),
            Err(payload) => {
                if self.first.is_none() {
                    self.first = Some(payload);
                }
                // A later payload is dropped: the hook already reported it.
                None
            }
        }
    }

    /// Whether a panic was caught.
    pub(crate) fn caught(&self) -> bool {
        self.first.is_some()
    }

    /// Resumes the first caught panic, if any.
    pub(crate) fn resume(self) {
        if let Some(payload) = self.first {
            panic::resume_unwind(payload);
        }
    }

    /// Resumes the first caught panic unless this thread is already
    /// unwinding (then a second panic would abort): for destructors.
    pub(crate) fn resume_unless_unwinding(self) {
        if !std::thread::panicking() {
            self.resume();
        }
    }
}

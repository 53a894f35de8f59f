//! A reserved address range whose bottom part is usable: best fit's segment
//! source when the cache owns its memory (Linux, `Builder::build`).
//!
//! The range is reserved once with no access and no commit charge
//! (`PROT_NONE`, `MAP_NORESERVE`); [`Reservation::commit`] makes more of its
//! bottom readable and writable as the cache grows, so growth extends the one
//! segment in place and coalesces with a free range at its top (PyTorch's
//! "expandable segments", on the CPU). [`Reservation::uncommit`] gives the top
//! back (its pages and commit charge go, the address space stays reserved) and
//! [`Reservation::decommit`] drops the pages of a free range in the middle
//! (`MADV_DONTNEED`: they read as zero when touched again).
//!
//! Huge pages: each page-table walk is costly on a VM, and a cache that idles
//! between passes finds its TLB cold (issue 12's experiment: resnet18 at a
//! 20 ms gap, 0.387 ms a pass over 4 KiB pages against 0.269 over 2 MiB
//! pages). The range is 2 MiB-aligned and advised `MADV_HUGEPAGE` from
//! [`HUGE_FROM`] up, and commits above it come in whole 2 MiB units, so the
//! kernel backs them with huge pages at first touch. Below [`HUGE_FROM`],
//! commits are page-granular: a small cache holds no 2 MiB slack.
//!
//! Everywhere else (other systems, Miri) there is no reservation and best fit
//! takes fixed segments from the backing allocator.

/// The system page size this module assumes for its rounding (a multiple of
/// every Linux page size that matters here would be safer, but 4 KiB is what
/// x86-64 and most aarch64 kernels use; a larger real page only means some
/// decommits are skipped, never wrong).
pub(crate) const PAGE: usize = 4096;

/// A transparent huge page.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Commits below this offset are page-granular; above it, whole huge pages.
pub(crate) const HUGE_FROM: usize = 8 << 20;

/// Address space reserved by the first reservation of a cache. Reserving costs
/// no memory; when it fills up, the next reservation doubles.
pub(crate) const FIRST_CAPACITY: usize = 4 << 30;

/// How far `committed` must reach to hold `needed` bytes: page-granular
/// below [`HUGE_FROM`], whole huge pages above it.
pub(crate) fn commit_target(needed: usize) -> Option<usize> {
    if needed <= HUGE_FROM {
        needed.checked_next_multiple_of(PAGE)
    } else {
        needed.checked_next_multiple_of(HUGE_PAGE)
    }
}

#[cfg(all(any(target_os = "linux", target_os = "android"), not(miri)))]
mod imp {
    use core::ffi::c_void;
    use core::ptr;

    use rustix::mm::{self, Advice, MapFlags, MprotectFlags, ProtFlags};

    use super::{HUGE_FROM, HUGE_PAGE, PAGE};

    /// A reserved range `[base, base + capacity)`, of which `[base, base +
    /// committed)` is readable and writable. Unmapped when dropped.
    #[derive(Debug)]
    pub(crate) struct Reservation {
        base: usize,
        capacity: usize,
        committed: usize,
    }

    impl Reservation {
        /// Reserves `capacity` bytes (rounded up to a huge page) of address
        /// space, 2 MiB-aligned; `None` if the system refuses.
        pub(crate) fn new(capacity: usize) -> Option<Self> {
            let capacity = capacity.checked_next_multiple_of(HUGE_PAGE)?;
            // Over-reserve by a huge page, then cut the ends so the base is
            // aligned to one.
            let span = capacity.checked_add(HUGE_PAGE)?;
            // SAFETY: a new anonymous mapping at an address of the kernel's
            // choosing: no existing memory is touched.
            let raw = unsafe {
                mm::mmap_anonymous(
                    ptr::null_mut(),
                    span,
                    ProtFlags::empty(),
                    MapFlags::PRIVATE | MapFlags::NORESERVE,
                )
            }
            .ok()? as usize;
            let base = raw.next_multiple_of(HUGE_PAGE);
            let (head, tail) = (base - raw, raw + span - (base + capacity));
            // SAFETY: both ends lie inside the mapping just made, which no one
            // else knows of; unmapping them leaves `[base, base + capacity)`.
            unsafe {
                if head > 0 {
                    let _ = mm::munmap(raw as *mut c_void, head);
                }
                if tail > 0 {
                    let _ = mm::munmap((base + capacity) as *mut c_void, tail);
                }
            }
            if capacity > HUGE_FROM {
                // SAFETY: advice on our own reserved range; it changes no
                // contents. Failure (THP compiled out) only costs speed.
                let _ = unsafe {
                    mm::madvise(
                        (base + HUGE_FROM) as *mut c_void,
                        capacity - HUGE_FROM,
                        Advice::LinuxHugepage,
                    )
                };
            }
            Some(Self {
                base,
                capacity,
                committed: 0,
            })
        }

        pub(crate) fn base(&self) -> usize {
            self.base
        }

        pub(crate) fn capacity(&self) -> usize {
            self.capacity
        }

        pub(crate) fn committed(&self) -> usize {
            self.committed
        }

        /// Makes `[base, base + to)` usable; `false` (and nothing changed) if
        /// the system refuses. `to` is page-aligned, above `committed` and at
        /// most `capacity`.
        pub(crate) fn commit(&mut self, to: usize) -> bool {
            debug_assert!(to > self.committed && to <= self.capacity && to.is_multiple_of(PAGE));
            // SAFETY: `[committed, to)` is inside our reservation and holds
            // no data (it has no access yet).
            let made = unsafe {
                mm::mprotect(
                    (self.base + self.committed) as *mut c_void,
                    to - self.committed,
                    MprotectFlags::READ | MprotectFlags::WRITE,
                )
            };
            if made.is_ok() {
                self.committed = to;
            }
            made.is_ok()
        }

        /// Gives `[base + to, base + committed)` back: its pages and commit
        /// charge go, the address space stays reserved. The range must hold
        /// nothing anyone uses.
        pub(crate) fn uncommit(&mut self, to: usize) {
            debug_assert!(to < self.committed && to.is_multiple_of(PAGE));
            // Mapping fresh no-access memory over the range drops its pages
            // and charge in one call.
            // SAFETY: the range is inside our reservation and unused (the
            // caller's contract), so replacing it loses nothing.
            let remapped = unsafe {
                mm::mmap_anonymous(
                    (self.base + to) as *mut c_void,
                    self.committed - to,
                    ProtFlags::empty(),
                    MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
                )
            };
            if remapped.is_ok() {
                if to < HUGE_FROM && self.capacity > HUGE_FROM {
                    // The new mapping lost the huge-page advice: restore it
                    // above `HUGE_FROM`.
                    // SAFETY: advice on our own range.
                    let _ = unsafe {
                        mm::madvise(
                            (self.base + HUGE_FROM) as *mut c_void,
                            self.committed.max(HUGE_FROM) - HUGE_FROM,
                            Advice::LinuxHugepage,
                        )
                    };
                } else if to >= HUGE_FROM {
                    // SAFETY: as above.
                    let _ = unsafe {
                        mm::madvise(
                            (self.base + to) as *mut c_void,
                            self.committed - to,
                            Advice::LinuxHugepage,
                        )
                    };
                }
                self.committed = to;
            } else {
                // Keep the range committed but drop its pages at least.
                self.decommit(self.base + to, self.committed - to);
            }
        }

        /// Drops the pages of `[start, start + len)` (page-aligned, committed,
        /// unused): they read as zero when touched again.
        pub(crate) fn decommit(&self, start: usize, len: usize) {
            debug_assert!(start.is_multiple_of(PAGE) && len.is_multiple_of(PAGE));
            debug_assert!(start >= self.base && start + len <= self.base + self.committed);
            // SAFETY: the range is committed memory of ours that holds nothing
            // anyone uses (the caller's contract).
            let _ = unsafe { mm::madvise(start as *mut c_void, len, Advice::LinuxDontNeed) };
        }
    }

    impl Drop for Reservation {
        fn drop(&mut self) {
            // SAFETY: the whole range is ours, and the cache drops its
            // reservations only once nothing in them is in use.
            let _ = unsafe { mm::munmap(self.base as *mut c_void, self.capacity) };
        }
    }
}

#[cfg(not(all(any(target_os = "linux", target_os = "android"), not(miri))))]
mod imp {
    /// No reservations here: best fit takes fixed segments from the backing
    /// allocator. This type is never constructed.
    #[derive(Debug)]
    pub(crate) struct Reservation(core::convert::Infallible);

    impl Reservation {
        pub(crate) fn new(_capacity: usize) -> Option<Self> {
            None
        }

        pub(crate) fn base(&self) -> usize {
            match self.0 {}
        }

        pub(crate) fn capacity(&self) -> usize {
            match self.0 {}
        }

        pub(crate) fn committed(&self) -> usize {
            match self.0 {}
        }

        pub(crate) fn commit(&mut self, _to: usize) -> bool {
            match self.0 {}
        }

        pub(crate) fn uncommit(&mut self, _to: usize) {
            match self.0 {}
        }

        pub(crate) fn decommit(&self, _start: usize, _len: usize) {
            match self.0 {}
        }
    }
}

pub(crate) use imp::Reservation;

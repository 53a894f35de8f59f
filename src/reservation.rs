//! A reserved address range whose bottom part is usable: best fit's segment
//! source when the cache owns its memory (Linux, `Builder::build`).
//!
//! The range is reserved once with no access and no commit charge
//! (`PROT_NONE`, `MAP_NORESERVE`); [`Reservation::commit`] makes more of its
//! bottom readable and writable as the cache grows, page by page, so growth
//! extends the one segment in place and coalesces with a free range at its
//! top (PyTorch's "expandable segments", on the CPU).
//! [`Reservation::uncommit`] gives the top back (its pages and commit charge
//! go, the address space stays reserved) and [`Reservation::decommit`] drops
//! the pages of a free range in the middle (`MADV_DONTNEED`: they read as zero
//! when touched again).
//!
//! Huge pages: a page-table walk is costly on a VM, and a cache that idles
//! between passes finds its TLB cold (issue 12's experiment: resnet18 at a
//! 20 ms gap, 0.387 ms a pass over 4 KiB pages against 0.269 over 2 MiB
//! pages). The range is 2 MiB-aligned and advised `MADV_HUGEPAGE`, so a 2 MiB
//! chunk that is wholly committed when first touched is backed by one huge
//! page. A chunk that was touched while only partly committed (the top, as
//! the cache grows in small steps) got small pages; the commit that completes
//! it may collapse it ([`Reservation::collapse`], `MADV_COLLAPSE`, Linux
//! 6.1+; ignored where unsupported). Collapsing makes every page of the chunk
//! resident, so the arena collapses a chunk only if none of its pages were
//! decommitted: then only committed bytes the books count become resident,
//! and resident memory never exceeds `bytes_reserved`. A cache smaller than
//! a huge page keeps small pages and no 2 MiB slack.
//!
//! The page size is the system's ([`page_size`], asked once): arm64
//! kernels with 16 or 64 KiB pages round `madvise` and `mprotect` to their
//! own pages, so every commit, decommit and uncommit is computed in them
//! (a decommit rounded to a smaller page would drop part of a live
//! neighbour's page).
//!
//! The system calls go through `libc`: `rustix` has no `MADV_COLLAPSE`.
//! Everywhere else (other systems, Miri) there is no reservation and best
//! fit takes fixed segments from the backing allocator.

/// The system's page size, which commits and decommits are rounded to: asked
/// once (`sysconf(_SC_PAGESIZE)`), 4 KiB where there is no system to ask
/// (Miri, other systems: no reservations there).
pub(crate) fn page_size() -> usize {
    use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
    match PAGE_SIZE.load(Relaxed) {
        0 => {
            let page = imp::system_page_size()
                .filter(|page| page.is_power_of_two())
                .unwrap_or(4096);
            PAGE_SIZE.store(page, Relaxed);
            page
        }
        page => page,
    }
}

/// A transparent huge page.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Address space reserved by the first reservation of a cache. Reserving costs
/// no memory; when it fills up, the next reservation doubles.
/// (4 GiB on 64-bit targets, 1 GiB on 32-bit ones.)
pub(crate) const FIRST_CAPACITY: usize = if usize::BITS >= 64 {
    1 << (usize::BITS / 2)
} else {
    1 << (usize::BITS - 2)
};

/// How far `committed` must reach to hold `needed` bytes: the next page.
pub(crate) fn commit_target(needed: usize, page: usize) -> Option<usize> {
    needed.checked_next_multiple_of(page)
}

/// The huge-page chunk (its offset) that a commit from `from` to `to` bytes
/// completes, if the old top was inside it: the chunk that may have been
/// touched with small pages and can now be collapsed into a huge one.
pub(crate) fn completed_chunk(from: usize, to: usize) -> Option<usize> {
    let chunk = from / HUGE_PAGE * HUGE_PAGE;
    (!from.is_multiple_of(HUGE_PAGE) && chunk + HUGE_PAGE <= to).then_some(chunk)
}

#[cfg(all(target_os = "linux", not(miri)))]
mod imp {
    use libc::{c_int, c_void};

    use super::HUGE_PAGE;

    /// `MADV_COLLAPSE` (Linux 6.1): not every libc target defines it.
    const MADV_COLLAPSE: c_int = 25;

    /// A reserved range `[base, base + capacity)`, of which `[base, base +
    /// committed)` is readable and writable. Unmapped when dropped.
    #[derive(Debug)]
    pub(crate) struct Reservation {
        base: usize,
        capacity: usize,
        committed: usize,
        /// The page size commits and decommits are multiples of.
        page: usize,
    }

    pub(super) fn system_page_size() -> Option<usize> {
        // SAFETY: `sysconf` reads a system constant; no memory is passed.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page).ok()
    }

    /// Maps `len` bytes of fresh, no-access, uncharged memory at `at` (with
    /// `fixed`: replacing what is there) or anywhere.
    ///
    /// # Safety
    ///
    /// With `fixed`, `[at, at + len)` is ours and holds nothing anyone uses.
    unsafe fn map_reserved(at: usize, len: usize, fixed: bool) -> Option<usize> {
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_NORESERVE
            | if fixed { libc::MAP_FIXED } else { 0 };
        // SAFETY: an anonymous mapping; without `MAP_FIXED` the kernel picks
        // free addresses, with it the caller vouches for the range.
        let raw = unsafe { libc::mmap(at as *mut c_void, len, libc::PROT_NONE, flags, -1, 0) };
        (raw != libc::MAP_FAILED).then_some(raw as usize)
    }

    /// Advises huge pages (or, with `huge` false, no huge pages) for
    /// `[start, start + len)` of a reservation. Only speed and residency
    /// depend on it: failure (THP compiled out) is ignored.
    fn advise_huge(start: usize, len: usize, huge: bool) {
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        if len > 0 {
            // SAFETY: advice on memory of ours; it changes no contents.
            unsafe { libc::madvise(start as *mut c_void, len, advice) };
        }
    }

    impl Reservation {
        /// Reserves `capacity` bytes (rounded up to a huge page) of address
        /// space, aligned to a huge page and to `page`, whose commits are
        /// multiples of `page` (the system's page size, or a multiple of it);
        /// `None` if the system refuses.
        pub(crate) fn new(capacity: usize, page: usize) -> Option<Self> {
            let align = HUGE_PAGE.max(page);
            let capacity = capacity.checked_next_multiple_of(align)?;
            // Over-reserve by the alignment, then cut the ends so the base
            // is aligned.
            let span = capacity.checked_add(align)?;
            // SAFETY: not fixed: the kernel picks free addresses.
            let raw = unsafe { map_reserved(0, span, false) }?;
            let base = raw.next_multiple_of(align);
            let (head, tail) = (base - raw, raw + span - (base + capacity));
            // SAFETY: both ends lie inside the mapping just made, which no one
            // else knows of; unmapping them leaves `[base, base + capacity)`.
            unsafe {
                if head > 0 {
                    libc::munmap(raw as *mut c_void, head);
                }
                if tail > 0 {
                    libc::munmap((base + capacity) as *mut c_void, tail);
                }
            }
            advise_huge(base, capacity, true);
            Some(Self {
                base,
                capacity,
                committed: 0,
                page,
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
            debug_assert!(
                to > self.committed && to <= self.capacity && to.is_multiple_of(self.page)
            );
            let from = self.committed;
            // SAFETY: `[committed, to)` is inside our reservation and holds
            // no data (it has no access yet).
            let made = unsafe {
                libc::mprotect(
                    (self.base + from) as *mut c_void,
                    to - from,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if made != 0 {
                return false;
            }
            self.committed = to;
            true
        }

        /// Makes the wholly committed huge-page chunk at offset `chunk` one
        /// huge page (every page of it becomes resident). Failure (an older
        /// kernel, THP off) only costs speed.
        pub(crate) fn collapse(&self, chunk: usize) {
            debug_assert!(chunk.is_multiple_of(HUGE_PAGE) && chunk + HUGE_PAGE <= self.committed);
            // SAFETY: the chunk is committed memory of ours; collapsing keeps
            // its contents.
            unsafe { libc::madvise((self.base + chunk) as *mut c_void, HUGE_PAGE, MADV_COLLAPSE) };
        }

        /// Gives `[base + to, base + committed)` back: its pages and commit
        /// charge go, the address space stays reserved.
        ///
        /// # Safety
        ///
        /// The range holds nothing anyone uses. `to` is page-aligned and below
        /// `committed`.
        pub(crate) unsafe fn uncommit(&mut self, to: usize) {
            debug_assert!(to < self.committed && to.is_multiple_of(self.page));
            let (start, len) = (self.base + to, self.committed - to);
            // Mapping fresh no-access memory over the range drops its pages
            // and charge in one call.
            // SAFETY: the range is ours and unused (the caller's contract).
            if unsafe { map_reserved(start, len, true) }.is_some() {
                // The new mapping lost the huge-page advice.
                advise_huge(start, len, true);
                self.committed = to;
            } else {
                // Keep the range committed but drop its pages at least.
                // SAFETY: the caller's contract.
                unsafe { self.decommit(start, len) };
            }
        }

        /// Lets the huge-page chunks `[from, to)` (offsets, chunk-aligned)
        /// be backed by huge pages, or (with `huge` false) keeps them on
        /// small pages. A chunk holding decommitted pages must stay on small
        /// pages: the kernel's `khugepaged` collapses any chunk of an area
        /// advised `MADV_HUGEPAGE` that has a few pages resident, filling
        /// the decommitted ones again behind the books' back.
        pub(crate) fn advise_huge_chunks(&self, from: usize, to: usize, huge: bool) {
            debug_assert!(from.is_multiple_of(HUGE_PAGE) && to.is_multiple_of(HUGE_PAGE));
            let to = to.min(self.capacity);
            if from < to {
                advise_huge(self.base + from, to - from, huge);
            }
        }

        /// Drops the pages of `[start, start + len)`: they read as zero when
        /// touched again.
        ///
        /// # Safety
        ///
        /// The range is page-aligned, committed, ours, and holds nothing
        /// anyone uses.
        pub(crate) unsafe fn decommit(&self, start: usize, len: usize) {
            debug_assert!(start.is_multiple_of(self.page) && len.is_multiple_of(self.page));
            debug_assert!(start >= self.base && start + len <= self.base + self.committed);
            // SAFETY: the caller's contract.
            unsafe { libc::madvise(start as *mut c_void, len, libc::MADV_DONTNEED) };
        }
    }

    impl Drop for Reservation {
        fn drop(&mut self) {
            // SAFETY: the whole range is ours, and the cache drops its
            // reservations only once nothing in them is in use.
            unsafe { libc::munmap(self.base as *mut c_void, self.capacity) };
        }
    }
}

#[cfg(not(all(target_os = "linux", not(miri))))]
mod imp {
    /// No reservations here: best fit takes fixed segments from the backing
    /// allocator. This type is never constructed.
    #[derive(Debug)]
    pub(crate) struct Reservation(core::convert::Infallible);

    pub(super) fn system_page_size() -> Option<usize> {
        None
    }

    impl Reservation {
        pub(crate) fn new(_capacity: usize, _page: usize) -> Option<Self> {
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

        pub(crate) fn collapse(&self, _chunk: usize) {
            match self.0 {}
        }

        pub(crate) fn advise_huge_chunks(&self, _from: usize, _to: usize, _huge: bool) {
            match self.0 {}
        }

        /// # Safety
        ///
        /// Never callable: the type has no values.
        pub(crate) unsafe fn uncommit(&mut self, _to: usize) {
            match self.0 {}
        }

        /// # Safety
        ///
        /// Never callable: the type has no values.
        pub(crate) unsafe fn decommit(&self, _start: usize, _len: usize) {
            match self.0 {}
        }
    }
}

pub(crate) use imp::Reservation;

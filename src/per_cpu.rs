//! Per-CPU fronts: a small magazine of freed blocks per CPU, in front of a
//! shared cache, reached without a lock or an atomic read-modify-write
//! through restartable sequences (`rseq.rs`).
//!
//! Each CPU has a slab of [`SLAB_BINS`] bins (`rseq::layout`); a block's key
//! picks its bin by hash, and a bin holds up to [`cap`] blocks of one key
//! (fewer for larger blocks), most recent last. A free pushes onto its bin
//! on the CPU the thread runs on, a request pops from it: both are one
//! restartable sequence. What a front holds is bounded by the CPUs, not the
//! threads: eight threads on two CPUs keep no more in fronts than two, and
//! a parked thread holds nothing (its CPU's slab serves the next thread).
//!
//! Only blocks of at most [`MAX_BLOCK`] bytes: a block in a front does not
//! merge with its free neighbours, so a large one kept there for a pass is
//! memory the arena cannot use (measured on the bundled traces: fronts up to
//! 1 MiB held resnet18 at 1.48x its peak live bytes instead of 1.02x, and
//! gpt_decode_small at 1.78x instead of 1.45x; larger blocks are few in a
//! pass and take the shared path). A slab holds at most [`MAX_SLAB_BYTES`].
//!
//! The owner of a block pushes and pops it; everything else (a release, a
//! trim, the cache's drop, a budget) takes a slab's blocks with [`drain`]
//! (`PerCpu::drain`), which stops each slab in turn (see `rseq.rs`).

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use allocator_api2::vec::Vec;

use crate::policy::Key;
use crate::reentry::{self, Bookkeeping};
use crate::rseq::{self, layout::*};
use crate::sync::Mutex;

/// The largest block a per-CPU front keeps; larger ones take the shared
/// path.
pub const MAX_BLOCK: usize = 16 << 10;
/// Bytes a bin holds at most (a cap of `DEPTH` blocks, or fewer so their
/// bytes stay within this).
const BIN_LIMIT: usize = 16 << 10;
/// The most one CPU's front can hold (8 MiB: every bin full of blocks of
/// its limit, which a pass rarely comes near; a release, a trim or an arena
/// that would otherwise grow takes it back).
pub const MAX_SLAB_BYTES: usize = SLAB_BINS * BIN_LIMIT;

/// A key as a bin stores it (`size / 64 | align_log << 40`), or `None` if no
/// front keeps such blocks.
#[inline]
fn code(key: Key) -> Option<u64> {
    let size = key.size();
    if size > MAX_BLOCK || !size.is_multiple_of(64) {
        return None;
    }
    let align = key.block_layout().align().trailing_zeros() as u64;
    Some((size as u64 / 64) | (align << 40))
}

#[inline]
fn decode(code: u64) -> Option<Key> {
    let size = (code & ((1 << 40) - 1)) as usize * 64;
    let align = 1usize.checked_shl((code >> 40) as u32)?;
    Key::for_block(Layout::from_size_align(size, align).ok()?)
}

/// The byte offset of `code`'s bin in a slab.
#[inline]
fn bin_of(code: u64) -> usize {
    let bin = code.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLAB_BINS.trailing_zeros());
    HEADER_BYTES + bin as usize * BIN_BYTES
}

/// How many blocks of `size` bytes a bin holds: `BIN_LIMIT` bytes' worth,
/// counted in the power of two at or above `size` (a shift, not a
/// division), 1 to `DEPTH`.
#[inline]
fn cap(size: usize) -> usize {
    let log = usize::BITS - size.max(1).saturating_sub(1).leading_zeros();
    (BIN_LIMIT >> log.min(usize::BITS - 1)).clamp(1, DEPTH)
}

/// A request or a free, ready for the sequences: the bin, the key as the bin
/// stores it, the cap, and the block's length.
#[derive(Clone, Copy)]
pub(crate) struct Class {
    bin: usize,
    key_word: u64,
    cap: usize,
    len: usize,
}

impl Class {
    /// `None` if no front keeps blocks of `key`.
    #[inline]
    pub(crate) fn of(key: Key) -> Option<Class> {
        let code = code(key)?;
        Some(Class {
            bin: bin_of(code),
            key_word: code << 8,
            cap: cap(key.size()),
            len: key.size(),
        })
    }

    /// The slot of a best-fit block for `layout` (its key is
    /// `Key::for_layout(layout, SizePolicy::BestFit)`, computed without
    /// going through the policy): `None` if no front keeps it.
    #[inline(always)]
    pub(crate) fn for_best_fit(layout: Layout) -> Option<Class> {
        if layout.size() > MAX_BLOCK {
            return None;
        }
        let len = layout.size().next_multiple_of(64);
        let align = layout.align().max(64).trailing_zeros() as u64;
        let code = (len as u64 / 64) | (align << 40);
        Some(Class {
            bin: bin_of(code),
            key_word: code << 8,
            cap: cap(len),
            len,
        })
    }

    /// The length of the block.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Every CPU's slab for one cache.
pub(crate) struct PerCpu {
    /// `cpus` slabs in one anonymous mapping (zero pages: every bin empty).
    base: NonNull<u8>,
    cpus: usize,
    /// Held by whoever stops a slab, so two never stop one at once.
    stoppers: Vec<Mutex<()>, Bookkeeping>,
}

// SAFETY: the slabs are reached only through the sequences (which act on
// the running CPU's slab alone) and by a thread that stopped the slab under
// its `stoppers` lock; the blocks they hold are the cache's, for any thread.
unsafe impl Send for PerCpu {}
// SAFETY: as above.
unsafe impl Sync for PerCpu {}

impl PerCpu {
    /// The slabs, if this system has restartable sequences (`None`: per-thread
    /// fronts instead) and the memory for them.
    pub(crate) fn new() -> Option<Self> {
        if !rseq::available() {
            return None;
        }
        let cpus = imp::cpus()?;
        let base = imp::map(cpus.checked_mul(SLAB_BYTES)?)?;
        let mut stoppers = Vec::new_in(Bookkeeping);
        let _inside = reentry::inside();
        if stoppers.try_reserve_exact(cpus).is_err() {
            // SAFETY: just mapped, nobody else knows it.
            unsafe { imp::unmap(base, cpus * SLAB_BYTES) };
            return None;
        }
        stoppers.extend((0..cpus).map(|_| Mutex::new(())));
        Some(Self {
            base,
            cpus,
            stoppers,
        })
    }

    /// Takes the most recently freed block of `slot`'s key on this CPU.
    #[inline]
    pub(crate) fn pop(&self, slot: Class) -> Option<NonNull<u8>> {
        // SAFETY: `base` holds `cpus` slabs laid out as `rseq::layout` says
        // for as long as `self` lives, written only by the sequences and by
        // a thread that stopped the slab; `slot.bin` is a bin's offset.
        NonNull::new(unsafe { rseq::pop(self.base.as_ptr(), self.cpus, slot.bin, slot.key_word) })
    }

    /// Keeps `block` on this CPU if its bin holds its key (or nothing) and
    /// has room.
    #[inline]
    pub(crate) fn push(&self, slot: Class, block: NonNull<u8>) -> bool {
        // SAFETY: as in `pop`; `cap` is at most `DEPTH`.
        unsafe {
            rseq::push(
                self.base.as_ptr(),
                self.cpus,
                slot.bin,
                slot.key_word,
                slot.cap,
                block.as_ptr(),
            )
        }
    }

    /// A free found `slot`'s bin full or holding another key: takes out of
    /// the bin (on whatever CPU this thread runs now) the older half of its
    /// blocks of `slot`'s key, or every block of another key, into `out`.
    pub(crate) fn make_room(&self, slot: Class, out: &mut impl Extend<(Key, NonNull<u8>)>) {
        let mut taken = 0;
        while taken < DEPTH {
            // SAFETY: as in `pop`.
            let (block, code) = unsafe { rseq::pop_any(self.base.as_ptr(), self.cpus, slot.bin) };
            let (Some(block), Some(key)) = (NonNull::new(block), decode(code)) else {
                return;
            };
            out.extend(Some((key, block)));
            taken += 1;
            if code << 8 == slot.key_word && taken >= slot.cap.div_ceil(2) {
                return;
            }
        }
    }

    /// Takes every block out of every CPU's slab, stopping each in turn;
    /// `each` gets them with their keys. Slabs that look empty are skipped
    /// (a block pushed meanwhile stays: it is as if pushed after the drain;
    /// with no user left, as when the cache drops, nothing is missed).
    pub(crate) fn drain(&self, mut each: impl FnMut(Key, NonNull<u8>)) {
        for cpu in 0..self.cpus {
            if self.looks_empty(cpu) {
                continue;
            }
            let _stopping = self.stoppers[cpu].lock();
            let slab = self.slab(cpu);
            slab[0].store(1, Ordering::Relaxed);
            rseq::membarrier_rseq::fence(cpu);
            // Every sequence on `cpu` finished or will see `stopped`: the
            // bins are ours until it is cleared.
            for bin in 0..SLAB_BINS {
                let word = &slab[(HEADER_BYTES + bin * BIN_BYTES) / 8];
                let held = word.load(Ordering::Relaxed);
                let len = (held & 0xff) as usize;
                if let Some(key) = decode(held >> 8) {
                    for at in 0..len.min(DEPTH) {
                        let pointer = &slab[(HEADER_BYTES + bin * BIN_BYTES) / 8 + 1 + at];
                        if let Some(block) =
                            NonNull::new(pointer.load(Ordering::Relaxed) as *mut u8)
                        {
                            each(key, block);
                        }
                    }
                }
                word.store(0, Ordering::Relaxed);
            }
            slab[0].store(0, Ordering::Release);
        }
    }

    /// Bytes and blocks the slabs hold now, read without stopping them: exact
    /// when no thread is pushing or popping.
    pub(crate) fn held(&self) -> (usize, usize) {
        let (mut bytes, mut blocks) = (0, 0);
        for cpu in 0..self.cpus {
            let slab = self.slab(cpu);
            for bin in 0..SLAB_BINS {
                let held = slab[(HEADER_BYTES + bin * BIN_BYTES) / 8].load(Ordering::Relaxed);
                let len = (held & 0xff) as usize;
                if let Some(key) = decode(held >> 8) {
                    bytes += key.size() * len;
                    blocks += len;
                }
            }
        }
        (bytes, blocks)
    }

    /// Every block the slabs hold, read without stopping them (exact when
    /// no thread is pushing or popping): `each(cpu, key, block)`.
    pub(crate) fn for_each_block(&self, mut each: impl FnMut(usize, Key, usize)) {
        for cpu in 0..self.cpus {
            let slab = self.slab(cpu);
            for bin in 0..SLAB_BINS {
                let word = (HEADER_BYTES + bin * BIN_BYTES) / 8;
                let held = slab[word].load(Ordering::Relaxed);
                let Some(key) = decode(held >> 8) else {
                    continue;
                };
                for at in 0..((held & 0xff) as usize).min(DEPTH) {
                    let block = slab[word + 1 + at].load(Ordering::Relaxed) as usize;
                    if block != 0 {
                        each(cpu, key, block);
                    }
                }
            }
        }
    }

    fn looks_empty(&self, cpu: usize) -> bool {
        let slab = self.slab(cpu);
        (0..SLAB_BINS).all(|bin| {
            slab[(HEADER_BYTES + bin * BIN_BYTES) / 8].load(Ordering::Relaxed) & 0xff == 0
        })
    }

    /// CPU `cpu`'s slab as words.
    fn slab(&self, cpu: usize) -> &[AtomicU64] {
        debug_assert!(cpu < self.cpus);
        // SAFETY: the slab lies inside the mapping, which lives as long as
        // `self` and is 8-byte aligned (page-aligned, slabs a multiple of
        // 64 bytes); the sequences write its words with plain stores of
        // whole words, the same accesses atomics make on this target.
        unsafe {
            core::slice::from_raw_parts(
                self.base.as_ptr().add(cpu * SLAB_BYTES).cast::<AtomicU64>(),
                SLAB_BYTES / 8,
            )
        }
    }
}

impl Drop for PerCpu {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; the cache drops it only when no user
        // is left, so no thread runs a sequence on it.
        unsafe { imp::unmap(self.base, self.cpus * SLAB_BYTES) };
    }
}

impl core::fmt::Debug for PerCpu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PerCpu")
            .field("cpus", &self.cpus)
            .finish_non_exhaustive()
    }
}

#[cfg(all(target_os = "linux", not(miri), not(loom)))]
mod imp {
    use core::ptr::NonNull;

    /// The CPUs the kernel may run this process on (the sequences check the
    /// CPU number against it anyway).
    pub(super) fn cpus() -> Option<usize> {
        // SAFETY: `sysconf` reads a system constant.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
        usize::try_from(cpus).ok().filter(|&cpus| cpus > 0)
    }

    /// `len` bytes of zeroed, readable and writable memory.
    pub(super) fn map(len: usize) -> Option<NonNull<u8>> {
        // SAFETY: an anonymous private mapping at an address the kernel
        // picks.
        let raw = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(raw.cast())
    }

    /// # Safety
    ///
    /// `[base, base + len)` is a mapping `map` made, no longer used.
    pub(super) unsafe fn unmap(base: NonNull<u8>, len: usize) {
        // SAFETY: the caller's contract.
        unsafe { libc::munmap(base.as_ptr().cast(), len) };
    }
}

#[cfg(not(all(target_os = "linux", not(miri), not(loom))))]
mod imp {
    use core::ptr::NonNull;

    pub(super) fn cpus() -> Option<usize> {
        None
    }

    pub(super) fn map(_len: usize) -> Option<NonNull<u8>> {
        None
    }

    /// # Safety
    ///
    /// Never called: `map` never maps.
    pub(super) unsafe fn unmap(_base: NonNull<u8>, _len: usize) {}
}

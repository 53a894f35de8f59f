//! Restartable sequences (Linux `rseq`): the system interface the per-CPU
//! fronts (`front/per_cpu.rs`) stand on, and the three critical sections
//! they run.
//!
//! A restartable sequence is a short run of instructions that the kernel
//! restarts (jumps to its abort handler) if the thread is preempted,
//! migrated or signalled inside it. So a thread that reads its CPU number
//! and then changes that CPU's data with plain loads and stores, ending in
//! one committing store, does it as if alone on the CPU: no lock, no atomic
//! read-modify-write. glibc 2.35+ registers an `rseq` area for every thread
//! and publishes where it is (`__rseq_offset` from the thread pointer) and
//! how large (`__rseq_size`); this module finds them at run time (`dlsym`,
//! so older glibc still links) and uses glibc's registration.
//!
//! A thread of another CPU reaches a CPU's data only through
//! [`stop_cpu`]: it sets the slab's `stopped` word, then
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)` on that CPU restarts
//! any sequence running there (a preempted one restarts when it resumes);
//! every sequence checks `stopped` first and fails while it is set. That is
//! tcmalloc's per-CPU cache protocol (`percpu_rseq_x86_64.S` and its
//! `FenceCpu`).
//!
//! Only x86-64 Linux outside Miri, loom and ThreadSanitizer (which cannot see
//! inside the sequences) has them: everywhere else [`available`] is false
//! and the fronts are per thread (`front.rs`), checked by those tools
//! instead.

/// The per-CPU slab layout the sequences read and write: the one contract
/// between them and `per_cpu.rs`.
///
/// A slab is `SLAB_BYTES`: a cache line of header (its first word is
/// `stopped`), then `SLAB_BINS` bins of `BIN_BYTES`. A bin is a word (`key << 8 |
/// len`; 0 when empty) and `DEPTH` block pointers, most recent last.
pub(crate) mod layout {
    /// Blocks a bin holds at most.
    pub(crate) const DEPTH: usize = 15;
    /// A bin: its word and its pointers.
    pub(crate) const BIN_BYTES: usize = 8 * (1 + DEPTH);
    /// Bins of a slab.
    pub(crate) const SLAB_BINS: usize = 512;
    /// The header: `stopped`, alone on its cache line.
    pub(crate) const HEADER_BYTES: usize = 64;
    /// A slab: its header and bins.
    pub(crate) const SLAB_BYTES: usize = HEADER_BYTES + SLAB_BINS * BIN_BYTES;
    const _: () = assert!(DEPTH < 256 && SLAB_BYTES < 1 << 31);
}

#[cfg(all(
    target_os = "linux",
    target_arch = "x86_64",
    not(miri),
    not(loom),
    not(tsan)
))]
mod imp {
    use core::arch::asm;
    use core::sync::atomic::{AtomicIsize, Ordering::Relaxed};

    use super::layout::SLAB_BYTES;

    /// The kernel checks these four bytes before an abort handler.
    /// (`RSEQ_SIG` on x86: the operand of a trapping `ud1`.)
    macro_rules! rseq_sig {
        () => {
            "0x53053053"
        };
    }

    /// `struct rseq`'s `cpu_id` offset.
    #[cfg(test)]
    const CPU_ID: isize = 4;

    const UNKNOWN: isize = isize::MIN;
    const MISSING: isize = isize::MIN + 1;

    /// `__rseq_offset` once found; `MISSING` when the system has no usable
    /// registration.
    static OFFSET: AtomicIsize = AtomicIsize::new(UNKNOWN);

    /// glibc's registration: its area's offset from the thread pointer,
    /// if it registered one for every thread and the kernel can fence a
    /// CPU's sequences.
    #[cold]
    fn find() -> isize {
        // SAFETY: `dlsym` with `RTLD_DEFAULT` looks a symbol up in the
        // loaded objects; the names are NUL-terminated.
        let (size, offset) = unsafe {
            (
                libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()),
                libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()),
            )
        };
        if size.is_null() || offset.is_null() {
            return MISSING;
        }
        // SAFETY: glibc defines `__rseq_size` as an `unsigned int` and
        // `__rseq_offset` as a `ptrdiff_t`, both constant once the process
        // runs.
        let (size, offset) = unsafe { (*size.cast::<u32>(), *offset.cast::<isize>()) };
        // 20 bytes reach `cpu_id` and `rseq_cs`; 0: registration turned
        // off (`glibc.pthread.rseq=0`).
        if size < 20 || !super::membarrier_rseq::register() {
            return MISSING;
        }
        offset
    }

    #[inline]
    fn offset() -> Option<isize> {
        match OFFSET.load(Relaxed) {
            UNKNOWN => {
                let found = find();
                OFFSET.store(found, Relaxed);
                (found != MISSING).then_some(found)
            }
            MISSING => None,
            offset => Some(offset),
        }
    }

    /// Whether this process has restartable sequences (and the kernel can
    /// fence a CPU's).
    pub(crate) fn available() -> bool {
        offset().is_some()
    }

    /// The CPU this thread runs on now (it may move at any moment): for
    /// tests. `None` if this thread has no registration.
    #[cfg(test)]
    pub(crate) fn current_cpu() -> Option<usize> {
        let offset = offset()?;
        let cpu: u32;
        // SAFETY: reads the `cpu_id` field of this thread's rseq area,
        // which glibc keeps at `offset` from the thread pointer (`fs`) for
        // the thread's life.
        unsafe {
            asm!(
                "mov {cpu:e}, dword ptr fs:[{offset} + {cpu_id}]",
                offset = in(reg) offset,
                cpu_id = const CPU_ID,
                cpu = out(reg) cpu,
                options(nostack, readonly, preserves_flags),
            );
        }
        i32::try_from(cpu).ok().map(|cpu| cpu as usize)
    }

    // The three sequences share their frame: a descriptor (`struct
    // rseq_cs`: version, flags, start, length, abort handler) in
    // `__rseq_cs`, the store of its address into the area's `rseq_cs`, the
    // CPU number checked against the slab count, the slab's `stopped`
    // word, and an abort handler (after the signature, in `__rseq_failure`)
    // that starts over. Labels: 20 the descriptor, 21 the retry point, 22
    // the start, 23 the end of the commit, 24 the abort handler, 25
    // failure, 26 done.
    macro_rules! prologue {
        () => {
            concat!(
                ".pushsection __rseq_cs, \"aw\"\n",
                ".balign 32\n",
                "20:\n",
                ".long 0, 0\n",
                ".quad 22f, (23f - 22f), 24f\n",
                ".popsection\n",
                "21:\n",
                "lea {slab}, [rip + 20b]\n",
                "mov qword ptr fs:[{offset} + 8], {slab}\n",
                "22:\n",
                "mov {slab:e}, dword ptr fs:[{offset} + 4]\n",
                "cmp {slab:e}, {cpus:e}\n",
                "jae 25f\n",
                "imul {slab}, {slab}, {slab_bytes}\n",
                "add {slab}, {base}\n",
                "cmp qword ptr [{slab}], 0\n",
                "jne 25f\n",
                "add {slab}, {bin}\n",
            )
        };
    }

    macro_rules! abort_handler {
        () => {
            concat!(
                ".pushsection __rseq_failure, \"ax\"\n",
                ".long ",
                rseq_sig!(),
                "\n",
                "24:\n",
                "jmp 21b\n",
                ".popsection\n",
            )
        };
    }

    /// Pops the most recent block of the bin at byte `bin` of this CPU's
    /// slab if the bin holds `key` (`key << 8` in `key_word`); null if it
    /// does not, is empty, or the slab is stopped.
    ///
    /// # Safety
    ///
    /// - `base` is the start of `cpus` slabs laid out as [`layout`] says,
    ///   alive for the call, written only by these sequences and by a
    ///   thread that stopped the slab ([`stop_cpu`]);
    /// - `bin` is the byte offset of a bin in a slab.
    #[inline]
    pub(crate) unsafe fn pop(base: *mut u8, cpus: usize, bin: usize, key_word: u64) -> *mut u8 {
        let Some(offset) = offset() else {
            return core::ptr::null_mut();
        };
        let block: *mut u8;
        // SAFETY: the caller's contract for the slab memory; the rseq area
        // is this thread's (see `current_cpu`). The sequence changes the
        // bin only by its last store: a restart before it leaves the bin
        // as it was.
        unsafe {
            asm!(
                prologue!(),
                "mov {word}, qword ptr [{slab}]",
                "mov {len}, {word}",
                "and {len}, -256",
                "cmp {len}, {key_word}",
                "jne 25f",
                "movzx {len:e}, {word:l}",
                "test {len:e}, {len:e}",
                "jz 25f",
                "mov {block}, qword ptr [{slab} + {len}*8]",
                "dec {word}",
                "mov qword ptr [{slab}], {word}",
                "23:",
                "jmp 26f",
                abort_handler!(),
                "25:",
                "xor {block:e}, {block:e}",
                "26:",
                offset = in(reg) offset,
                base = in(reg) base,
                cpus = in(reg) cpus,
                bin = in(reg) bin,
                key_word = in(reg) key_word,
                slab_bytes = const SLAB_BYTES,
                slab = out(reg) _,
                word = out(reg) _,
                len = out(reg) _,
                block = out(reg) block,
                options(nostack),
            );
        }
        block
    }

    /// Pops the most recent block of the bin at byte `bin` of this CPU's
    /// slab, whatever its key: `(block, key)`, or a null block if the bin is
    /// empty or the slab stopped.
    ///
    /// # Safety
    ///
    /// As for [`pop`].
    #[inline]
    pub(crate) unsafe fn pop_any(base: *mut u8, cpus: usize, bin: usize) -> (*mut u8, u64) {
        let Some(offset) = offset() else {
            return (core::ptr::null_mut(), 0);
        };
        let block: *mut u8;
        let word: u64;
        // SAFETY: as in `pop`.
        unsafe {
            asm!(
                prologue!(),
                "mov {word}, qword ptr [{slab}]",
                "movzx {len:e}, {word:l}",
                "test {len:e}, {len:e}",
                "jz 25f",
                "mov {block}, qword ptr [{slab} + {len}*8]",
                "dec {word}",
                "mov qword ptr [{slab}], {word}",
                "23:",
                "jmp 26f",
                abort_handler!(),
                "25:",
                "xor {block:e}, {block:e}",
                "26:",
                offset = in(reg) offset,
                base = in(reg) base,
                cpus = in(reg) cpus,
                bin = in(reg) bin,
                slab_bytes = const SLAB_BYTES,
                slab = out(reg) _,
                word = out(reg) word,
                len = out(reg) _,
                block = out(reg) block,
                options(nostack),
            );
        }
        (block, word >> 8)
    }

    /// Pushes `block` onto the bin at byte `bin` of this CPU's slab if the
    /// bin holds `key` (`key << 8` in `key_word`) or nothing, and fewer than
    /// `cap` blocks; whether it did.
    ///
    /// # Safety
    ///
    /// As for [`pop`], and `cap` is at most [`DEPTH`](super::layout::DEPTH).
    #[inline]
    pub(crate) unsafe fn push(
        base: *mut u8,
        cpus: usize,
        bin: usize,
        key_word: u64,
        cap: usize,
        block: *mut u8,
    ) -> bool {
        let Some(offset) = offset() else {
            return false;
        };
        let pushed: u32;
        // SAFETY: as in `pop`; the pointer store lands in a slot above the
        // bin's length, which no reader looks at until the committing store
        // of the new length.
        unsafe {
            asm!(
                prologue!(),
                "mov {word}, qword ptr [{slab}]",
                "movzx {len:e}, {word:l}",
                "test {len:e}, {len:e}",
                "jz 27f",
                "and {word}, -256",
                "cmp {word}, {key_word}",
                "jne 25f",
                "cmp {len}, {cap}",
                "jae 25f",
                "27:",
                "mov qword ptr [{slab} + {len}*8 + 8], {block}",
                "lea {word}, [{key_word} + {len} + 1]",
                "mov qword ptr [{slab}], {word}",
                "23:",
                "mov {pushed:e}, 1",
                "jmp 26f",
                abort_handler!(),
                "25:",
                "xor {pushed:e}, {pushed:e}",
                "26:",
                offset = in(reg) offset,
                base = in(reg) base,
                cpus = in(reg) cpus,
                bin = in(reg) bin,
                key_word = in(reg) key_word,
                cap = in(reg) cap,
                block = in(reg) block,
                slab_bytes = const SLAB_BYTES,
                slab = out(reg) _,
                word = out(reg) _,
                len = out(reg) _,
                pushed = out(reg) pushed,
                options(nostack),
            );
        }
        pushed != 0
    }
}

#[cfg(not(all(
    target_os = "linux",
    target_arch = "x86_64",
    not(miri),
    not(loom),
    not(tsan)
)))]
mod imp {
    /// No restartable sequences here: fronts are per thread.
    pub(crate) fn available() -> bool {
        false
    }

    #[cfg(test)]
    pub(crate) fn current_cpu() -> Option<usize> {
        None
    }

    /// # Safety
    ///
    /// None needed: it touches nothing.
    pub(crate) unsafe fn pop(_: *mut u8, _: usize, _: usize, _: u64) -> *mut u8 {
        core::ptr::null_mut()
    }

    /// # Safety
    ///
    /// None needed: it touches nothing.
    pub(crate) unsafe fn pop_any(_: *mut u8, _: usize, _: usize) -> (*mut u8, u64) {
        (core::ptr::null_mut(), 0)
    }

    /// # Safety
    ///
    /// None needed: it touches nothing.
    pub(crate) unsafe fn push(
        _: *mut u8,
        _: usize,
        _: usize,
        _: u64,
        _: usize,
        _: *mut u8,
    ) -> bool {
        false
    }
}

#[cfg(test)]
pub(crate) use imp::current_cpu;
pub(crate) use imp::{available, pop, pop_any, push};

/// Fencing one CPU's sequences: `membarrier`'s RSEQ commands (Linux 5.10).
#[cfg(all(
    target_os = "linux",
    target_arch = "x86_64",
    not(miri),
    not(loom),
    not(tsan)
))]
pub(crate) mod membarrier_rseq {
    const QUERY: libc::c_long = 0;
    const PRIVATE_EXPEDITED_RSEQ: libc::c_long = 1 << 7;
    const REGISTER_PRIVATE_EXPEDITED_RSEQ: libc::c_long = 1 << 8;
    const FLAG_CPU: libc::c_long = 1;

    /// Whether the kernel has the RSEQ fence and this process registered
    /// for it.
    pub(crate) fn register() -> bool {
        // SAFETY: `membarrier` takes integers and touches no memory of ours.
        let supported = unsafe { libc::syscall(libc::SYS_membarrier, QUERY, 0, 0) };
        if supported < 0 || supported & PRIVATE_EXPEDITED_RSEQ == 0 {
            return false;
        }
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_membarrier, REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0) == 0 }
    }

    /// Restarts every sequence running on `cpu` (a preempted one restarts
    /// when it resumes), with a full fence there: after it returns, every
    /// sequence on that CPU either finished before or sees the stores made
    /// before this call. Aborts the process if it fails, since a drain that
    /// went on anyway could hand a block out twice.
    pub(crate) fn fence(cpu: usize) {
        // SAFETY: as above.
        let done = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                PRIVATE_EXPEDITED_RSEQ,
                FLAG_CPU,
                cpu as libc::c_long,
            )
        };
        if done != 0
            && !(register() && {
                // A child after `fork` may have to register again.
                // SAFETY: as above.
                unsafe {
                    libc::syscall(
                        libc::SYS_membarrier,
                        PRIVATE_EXPEDITED_RSEQ,
                        FLAG_CPU,
                        cpu as libc::c_long,
                    ) == 0
                }
            })
        {
            std::process::abort();
        }
    }
}

#[cfg(not(all(
    target_os = "linux",
    target_arch = "x86_64",
    not(miri),
    not(loom),
    not(tsan)
)))]
pub(crate) mod membarrier_rseq {
    /// Never called: without sequences there are no per-CPU slabs.
    pub(crate) fn fence(_cpu: usize) {}
}

#[cfg(all(
    test,
    target_os = "linux",
    target_arch = "x86_64",
    not(miri),
    not(tsan)
))]
mod tests {
    use super::layout::{BIN_BYTES, DEPTH, HEADER_BYTES, SLAB_BYTES};
    use super::*;

    /// Slabs for `cpus` CPUs, zeroed, 16-byte aligned.
    fn slabs(cpus: usize) -> std::vec::Vec<u128> {
        std::vec![0u128; (cpus * SLAB_BYTES).div_ceil(16)]
    }

    fn cpus() -> usize {
        // SAFETY: `sysconf` reads a constant.
        unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) as usize }
    }

    #[test]
    fn a_thread_pops_what_it_pushed_on_its_cpu() {
        if !available() {
            return;
        }
        let cpus = cpus();
        let mut memory = slabs(cpus);
        let base = memory.as_mut_ptr().cast::<u8>();
        let bin = HEADER_BYTES + 5 * BIN_BYTES;
        let key = 7u64 << 8;
        let blocks: std::vec::Vec<*mut u8> = (1..=DEPTH).map(|i| (i * 64) as *mut u8).collect();
        // SAFETY: `base` holds `cpus` zeroed slabs and only this thread
        // touches them.
        unsafe {
            let pinned = current_cpu().expect("a registered thread");
            let mut pushed = 0;
            for &block in &blocks {
                pushed += usize::from(push(base, cpus, bin, key, DEPTH, block));
            }
            if current_cpu() != Some(pinned) {
                return; // migrated: the blocks are on two CPUs' slabs
            }
            assert_eq!(pushed, DEPTH);
            assert!(!push(base, cpus, bin, key, DEPTH, 0x40 as *mut u8), "full");
            assert!(
                !push(base, cpus, bin, 8 << 8, DEPTH, 0x40 as *mut u8),
                "another key's"
            );
            assert!(pop(base, cpus, bin, 8 << 8).is_null(), "another key's");
            for &block in blocks.iter().rev() {
                assert_eq!(pop(base, cpus, bin, key), block);
            }
            assert!(pop(base, cpus, bin, key).is_null(), "empty");
            assert!(
                push(base, cpus, bin, 9 << 8, 2, 3 as *mut u8),
                "an empty bin takes any key"
            );
            assert_eq!(pop_any(base, cpus, bin), (3 as *mut u8, 9));
            // A stopped slab refuses everything.
            let slab = base.add(pinned * SLAB_BYTES).cast::<u64>();
            slab.write(1);
            assert!(!push(base, cpus, bin, key, DEPTH, 0x40 as *mut u8));
            slab.write(0);
        }
    }
}

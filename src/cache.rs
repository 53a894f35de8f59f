//! The state behind the lock: free lists, counters, and every call to the
//! backing allocator.
//!
//! Locking discipline: the lock is held only while free lists and counters
//! change. The backing allocator is always called with the lock released, so a
//! backing allocator that allocates (or frees into this very cache) cannot
//! deadlock, and a slow `malloc`/`munmap` does not stall other threads' hits.

use core::alloc::Layout;
use core::mem;
use core::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator, Global};
use allocator_api2::vec::Vec;
use foldhash::fast::FixedState;
use hashbrown::HashMap;

use crate::policy::Key;
use crate::reentry;
use crate::stats::Stats;
use crate::sync::Mutex;

/// Where the cache's own bookkeeping (free-list vectors, the map) lives: the
/// global allocator, marked as "inside the allocator" so that a scoped global
/// allocator serves it from its inner allocator, never from a cache (this
/// cache's lock may be held). Never the backing allocator: that one sees
/// exactly the blocks handed to users.
#[derive(Clone, Copy, Default)]
struct Bookkeeping;

// SAFETY: every method forwards to `Global` unchanged; marking the thread
// does not touch the memory.
unsafe impl Allocator for Bookkeeping {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let _inside = reentry::inside();
        Global.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        let _inside = reentry::inside();
        // SAFETY: the caller's contract: `ptr` came from `allocate` above,
        // that is from `Global`, with `layout`.
        unsafe { Global.deallocate(ptr, layout) }
    }
}

/// Cached blocks of one key, most recently freed last (handed out first: its
/// cache lines and pages are the warmest).
type FreeList = Vec<NonNull<u8>, Bookkeeping>;

/// A fixed-seed hasher: no lazy random seed, and cheap on two-word keys.
type FreeLists = HashMap<Key, FreeList, FixedState, Bookkeeping>;

/// A cache over a backing allocator `A`; shared by all handles through an `Arc`.
pub(crate) struct Cache<A: Allocator> {
    state: Mutex<State>,
    backing: A,
}

struct State {
    free_lists: FreeLists,
    stats: Stats,
}

// SAFETY: the `NonNull`s on the free lists are blocks this cache owns
// exclusively (no user holds them while they are listed); moving the state to
// another thread moves that ownership with it, like a `Vec<Box<[u8]>>` would.
unsafe impl Send for State {}

impl State {
    fn new() -> Self {
        Self {
            free_lists: empty_free_lists(),
            stats: Stats::default(),
        }
    }

    /// Takes a cached block of `key`, if any.
    #[inline]
    fn pop(&mut self, key: Key) -> Option<NonNull<u8>> {
        self.free_lists.get_mut(&key)?.pop()
    }

    /// Lists `block` under `key`. Fails only if the bookkeeping cannot grow;
    /// the caller then gives the block back to the backing allocator.
    #[inline]
    fn push(&mut self, key: Key, block: NonNull<u8>) -> Result<(), ()> {
        self.free_lists.try_reserve(1).map_err(|_| ())?;
        let list = self
            .free_lists
            .entry(key)
            .or_insert_with(|| Vec::new_in(Bookkeeping));
        list.try_reserve(1).map_err(|_| ())?;
        list.push(block);
        Ok(())
    }
}

fn empty_free_lists() -> FreeLists {
    HashMap::with_hasher_in(FixedState::default(), Bookkeeping)
}

/// A non-null pointer aligned to `layout.align()`, for zero-sized requests.
#[inline]
pub(crate) fn dangling(layout: Layout) -> NonNull<[u8]> {
    // An alignment is never zero; the fallback only satisfies the type.
    let addr = core::num::NonZeroUsize::new(layout.align()).unwrap_or(core::num::NonZeroUsize::MIN);
    NonNull::slice_from_raw_parts(NonNull::without_provenance(addr), 0)
}

impl<A: Allocator> Cache<A> {
    pub(crate) fn new(backing: A) -> Self {
        Self {
            state: Mutex::new(State::new()),
            backing,
        }
    }

    pub(crate) fn backing(&self) -> &A {
        &self.backing
    }

    pub(crate) fn stats(&self) -> Stats {
        self.state.lock().stats
    }

    /// A block for `layout`: a cached one of its key if any, else a new one.
    /// With `zeroed`, its first `layout.size()` bytes are zero.
    pub(crate) fn allocate(
        &self,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let Some(key) = Key::for_layout(layout) else {
            self.state.lock().stats.failures += 1;
            return Err(AllocError);
        };
        let popped = {
            let mut state = self.state.lock();
            let popped = state.pop(key);
            if popped.is_some() {
                state.stats.on_hit(layout.size());
            }
            popped
        };
        let block = match popped {
            Some(block) => {
                if zeroed {
                    // SAFETY: the block was just taken off a free list, so
                    // nobody else references it, and it holds `key.size ==
                    // layout.size()` writable bytes.
                    unsafe { ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
                }
                block
            }
            None => {
                let block = self.allocate_block(key, zeroed)?;
                self.state.lock().stats.on_miss(layout.size());
                block
            }
        };
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    /// A new block of `key` from the backing allocator. If it fails, the
    /// cache is released and the allocation tried once more (the seed's
    /// out-of-memory path).
    fn allocate_block(&self, key: Key, zeroed: bool) -> Result<NonNull<u8>, AllocError> {
        let layout = key.block_layout();
        let _inside = reentry::inside();
        let attempt = || {
            if zeroed {
                self.backing.allocate_zeroed(layout)
            } else {
                self.backing.allocate(layout)
            }
        };
        if let Ok(block) = attempt() {
            return Ok(block.cast());
        }
        self.state.lock().stats.retries += 1;
        self.release_cached();
        match attempt() {
            Ok(block) => Ok(block.cast()),
            Err(error) => {
                self.state.lock().stats.failures += 1;
                Err(error)
            }
        }
    }

    /// Puts a block on its free list.
    ///
    /// # Safety
    ///
    /// - `block` was returned by `allocate`/`grow`/`shrink` of this cache for
    ///   `layout` (same size, an alignment of the same class) and not freed
    ///   since;
    /// - nobody uses the block after this call.
    pub(crate) unsafe fn deallocate(&self, block: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // A block handed out for `layout` proves the key exists.
        let Some(key) = Key::for_layout(layout) else {
            return;
        };
        let listed = {
            let mut state = self.state.lock();
            let listed = state.push(key, block);
            // Counted as a free either way: a block the bookkeeping could not
            // hold is counted as cached and released at once.
            state.stats.on_free(layout.size());
            if listed.is_err() {
                state.stats.on_release(1, key.size);
            }
            listed
        };
        if listed.is_err() {
            let _inside = reentry::inside();
            // SAFETY: per this function's contract the block is ours, unused,
            // and was taken from the backing allocator with `key`'s layout.
            unsafe { self.backing.deallocate(block, key.block_layout()) };
        }
    }

    /// Moves a block to a layout of at least its size, keeping its contents;
    /// with `zeroed` the bytes past `old.size()` are zero.
    ///
    /// # Safety
    ///
    /// - `block` is live and was handed out by this cache for `old`;
    /// - `new.size() >= old.size()`.
    ///
    /// On success the old block must no longer be used; on error it is
    /// untouched and still live.
    pub(crate) unsafe fn grow(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.resize(block, old, new, zeroed) }
    }

    /// Moves a block to a layout of at most its size, keeping the first
    /// `new.size()` bytes.
    ///
    /// # Safety
    ///
    /// - `block` is live and was handed out by this cache for `old`;
    /// - `new.size() <= old.size()`.
    ///
    /// On success the old block must no longer be used; on error it is
    /// untouched and still live.
    pub(crate) unsafe fn shrink(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.resize(block, old, new, false) }
    }

    /// `grow` and `shrink`: in place when both layouts map to the same free
    /// list, else through a block of the new key (cached if one is), copying.
    ///
    /// # Safety
    ///
    /// `block` is live and was handed out by this cache for `old`.
    unsafe fn resize(
        &self,
        block: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() != 0 && new.size() != 0 && Key::for_layout(old) == Key::for_layout(new) {
            // Same key: the block already has the new layout's size and
            // alignment class.
            self.state
                .lock()
                .stats
                .on_resize_in_place(old.size(), new.size());
            if zeroed && new.size() > old.size() {
                // SAFETY: the block is live, ours to write, and holds at least
                // `new.size()` bytes (its key's size).
                unsafe {
                    ptr::write_bytes(block.as_ptr().add(old.size()), 0, new.size() - old.size())
                };
            }
            return Ok(NonNull::slice_from_raw_parts(block, new.size()));
        }
        let moved = self.allocate(new, zeroed)?;
        let kept = old.size().min(new.size());
        // SAFETY: `block` is live with `old.size()` readable bytes and `moved`
        // is a different live block (a free list never holds a live block) with
        // `new.size()` writable bytes; both hold at least `kept`.
        unsafe { ptr::copy_nonoverlapping(block.as_ptr(), moved.cast::<u8>().as_ptr(), kept) };
        // SAFETY: `block` was handed out for `old` (contract), and the caller
        // stops using it once we return the new one.
        unsafe { self.deallocate(block, old) };
        Ok(moved)
    }

    /// Gives every cached block back to the backing allocator; returns the
    /// bytes given back.
    pub(crate) fn release_cached(&self) -> usize {
        let (lists, bytes) = {
            let mut state = self.state.lock();
            let lists = mem::replace(&mut state.free_lists, empty_free_lists());
            let (blocks, bytes) = (state.stats.blocks_cached, state.stats.bytes_cached);
            state.stats.on_release(blocks, bytes);
            (lists, bytes)
        };
        // The blocks left the free lists under the lock, so no other thread
        // can hand them out; give them back without holding it.
        let _inside = reentry::inside();
        for (key, list) in lists {
            for block in list {
                // SAFETY: every listed block was taken from the backing
                // allocator with `key.block_layout()`, is owned by the cache
                // alone, and is no longer listed, so it is given back once.
                unsafe { self.backing.deallocate(block, key.block_layout()) };
            }
        }
        bytes
    }
}

impl<A: Allocator> Drop for Cache<A> {
    fn drop(&mut self) {
        // The last handle is gone, so no block is in use (collections hold
        // handles); everything cached goes back.
        self.release_cached();
    }
}

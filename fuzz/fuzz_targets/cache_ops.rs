//! Operation sequences on one or two caches (optionally sharing a budget)
//! over a checking backing allocator that may fail on a schedule. Every
//! block holds a pattern derived from its id, checked before it is freed or
//! resized and after a resize; the model's invariants are checked after
//! every step; at the end everything is freed and the backing must hold
//! nothing.
#![no_main]

use std::alloc::Layout;
use std::ptr::NonNull;

use allocator_api2::alloc::Allocator;
use arbitrary::Arbitrary;
use caching_allocator::{Budget, CachingAllocator, SizePolicy};
use fuzz_support::{Backing, Ledgers, Size, align_from, assert_disjoint, check, check_zero, fill};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Policy {
    Exact,
    /// 1..=8 divisions.
    PowerOfTwoDivisions(u8),
}

#[derive(Debug, Arbitrary)]
struct CacheConfig {
    policy: Policy,
    /// A cap below 1 MiB.
    cap: Option<u32>,
    stop_caching_after_failure: bool,
}

#[derive(Debug, Arbitrary)]
struct Config {
    caches: [CacheConfig; 2],
    /// Two caches (always with a budget).
    two: bool,
    /// A budget below 1 MiB shared by both caches.
    budget: Option<u32>,
    palette: [u16; 6],
    /// Bit n set: the n-th backing allocation fails.
    failures: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Allocate {
        cache: u8,
        handle: u8,
        size: Size,
        align_log2: u8,
        zeroed: bool,
    },
    Deallocate {
        index: u8,
        handle: u8,
    },
    Grow {
        index: u8,
        handle: u8,
        by: Size,
        align_log2: Option<u8>,
        zeroed: bool,
    },
    Shrink {
        index: u8,
        handle: u8,
        to: Size,
        align_log2: Option<u8>,
    },
    ReleaseCached {
        cache: u8,
    },
    Trim {
        cache: u8,
        target: u32,
    },
    CloneHandle {
        cache: u8,
    },
    DropHandle {
        cache: u8,
        handle: u8,
    },
    /// Checks every live block's pattern.
    CheckAll,
}

#[derive(Debug, Arbitrary)]
struct Input {
    config: Config,
    ops: Vec<Op>,
}

struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
    cache: usize,
    id: u64,
}

struct Slot {
    handles: Vec<CachingAllocator<Backing>>,
    owner: usize,
    policy: SizePolicy,
    cap: Option<usize>,
    stop: bool,
}

struct World {
    ledgers: Ledgers,
    budget: Option<Budget>,
    slots: Vec<Slot>,
    blocks: Vec<Block>,
    next_id: u64,
    next_owner: usize,
}

impl World {
    fn build(&mut self, config: &CacheConfig) -> Slot {
        let policy = match config.policy {
            Policy::Exact => SizePolicy::Exact,
            Policy::PowerOfTwoDivisions(n) => SizePolicy::PowerOfTwoDivisions(u32::from(n % 8) + 1),
        };
        let cap = config.cap.map(|c| c as usize % (1 << 20));
        let mut builder = CachingAllocator::builder()
            .size_policy(policy)
            .stop_caching_after_failure(config.stop_caching_after_failure);
        if let Some(cap) = cap {
            builder = builder.max_cached_bytes(cap);
        }
        if let Some(budget) = &self.budget {
            builder = builder.budget(budget);
        }
        let owner = self.next_owner;
        self.next_owner += 1;
        let cache = builder.build_in(self.ledgers.backing(owner));
        assert_eq!(cache.size_policy(), policy);
        assert_eq!(cache.max_cached_bytes(), cap);
        Slot {
            handles: vec![cache],
            owner,
            policy,
            cap,
            stop: config.stop_caching_after_failure,
        }
    }

    fn handle(&self, cache: usize, handle: u8) -> &CachingAllocator<Backing> {
        let handles = &self.slots[cache].handles;
        &handles[handle as usize % handles.len()]
    }

    /// The model's invariants, for every cache and the budget.
    fn check(&self) {
        let mut budget_cached = 0;
        for (index, slot) in self.slots.iter().enumerate() {
            let s = slot.handles[0].stats();
            assert_eq!(
                s.bytes_reserved,
                s.bytes_in_use + s.bytes_lost_to_rounding + s.bytes_cached,
                "cache {index}: reserved != in use + rounding + cached: {s:?}"
            );
            assert_eq!(
                self.ledgers.live_bytes(slot.owner),
                s.bytes_reserved,
                "cache {index}: backing holds other than bytes_reserved: {s:?}"
            );
            assert_eq!(
                self.ledgers.live_blocks(slot.owner),
                s.blocks_in_use + s.blocks_cached,
                "cache {index}: backing blocks != in use + cached: {s:?}"
            );
            let mine = self
                .blocks
                .iter()
                .filter(|b| b.cache == index && b.layout.size() > 0);
            let (mut blocks, mut bytes, mut lost) = (0, 0, 0);
            for block in mine {
                blocks += 1;
                bytes += block.layout.size();
                lost += slot.policy.block_size(block.layout.size()).unwrap() - block.layout.size();
            }
            assert_eq!(
                s.blocks_in_use, blocks,
                "cache {index}: blocks in use: {s:?}"
            );
            assert_eq!(s.bytes_in_use, bytes, "cache {index}: bytes in use: {s:?}");
            assert_eq!(
                s.bytes_lost_to_rounding, lost,
                "cache {index}: rounding: {s:?}"
            );
            if let Some(cap) = slot.cap {
                assert!(
                    s.bytes_cached <= cap,
                    "cache {index}: cap {cap} exceeded: {s:?}"
                );
            }
            if slot.handles[0].is_caching_stopped() {
                assert!(
                    slot.stop,
                    "cache {index}: caching stopped without the setting"
                );
                assert_eq!(
                    s.bytes_cached, 0,
                    "cache {index}: caches after it stopped: {s:?}"
                );
            }
            assert!(s.peak_bytes_reserved >= s.bytes_reserved);
            assert!(s.peak_bytes_cached >= s.bytes_cached);
            assert!(s.peak_bytes_in_use >= s.bytes_in_use);
            budget_cached += s.bytes_cached;
        }
        if let Some(budget) = &self.budget {
            assert!(
                budget.bytes_cached() <= budget.limit(),
                "budget exceeded: {budget:?}"
            );
            assert_eq!(
                budget.bytes_cached(),
                budget_cached,
                "budget's count differs from its caches' cached bytes"
            );
        }
        // Live blocks: aligned, disjoint, inside a backing block of their cache.
        for block in &self.blocks {
            let addr = block.ptr.as_ptr() as usize;
            assert_eq!(
                addr % block.layout.align(),
                0,
                "misaligned block {}",
                block.id
            );
            if block.layout.size() == 0 {
                continue;
            }
            let Some((_, _, owner)) = self.ledgers.containing(addr, block.layout.size()) else {
                panic!("block {} is not inside a live backing block", block.id);
            };
            assert_eq!(
                owner, self.slots[block.cache].owner,
                "block {} in another cache's memory",
                block.id
            );
        }
        assert_disjoint(
            self.blocks
                .iter()
                .map(|b| (b.ptr.as_ptr() as usize, b.layout.size())),
            "cache_ops",
        );
    }

    fn free(&mut self, index: usize, handle: u8) {
        let block = self.blocks.swap_remove(index);
        // SAFETY: a live block of ours with its layout.
        unsafe {
            check(
                block.ptr.as_ptr(),
                block.id,
                0..block.layout.size(),
                "before free",
            );
            self.handle(block.cache, handle)
                .deallocate(block.ptr, block.layout);
        }
    }

    fn run(&mut self, op: &Op, palette: &[u16]) {
        let caches = self.slots.len();
        match *op {
            Op::Allocate {
                cache,
                handle,
                size,
                align_log2,
                zeroed,
            } => {
                let cache = cache as usize % caches;
                let layout =
                    Layout::from_size_align(size.bytes(palette), align_from(align_log2)).unwrap();
                let alloc = self.handle(cache, handle);
                let before = alloc.stats();
                let result = if zeroed {
                    alloc.allocate_zeroed(layout)
                } else {
                    alloc.allocate(layout)
                };
                let after = alloc.stats();
                match result {
                    Ok(block) => {
                        assert!(block.len() >= layout.size());
                        let ptr = block.cast::<u8>();
                        if layout.size() > 0 {
                            assert_eq!(
                                after.hits + after.misses,
                                before.hits + before.misses + 1,
                                "an allocation is a hit or a miss"
                            );
                        }
                        let id = self.next_id;
                        self.next_id += 1;
                        // SAFETY: a fresh block of `layout.size()` bytes.
                        unsafe {
                            if zeroed {
                                check_zero(ptr.as_ptr(), 0..layout.size(), "allocate_zeroed");
                            }
                            fill(ptr.as_ptr(), id, 0..layout.size());
                        }
                        self.blocks.push(Block {
                            ptr,
                            layout,
                            cache,
                            id,
                        });
                    }
                    Err(_) => {
                        assert!(
                            self.ledgers.may_fail(),
                            "allocation failed with no failure scheduled"
                        );
                        assert!(layout.size() > 0);
                        assert_eq!(after.failures, before.failures + 1);
                    }
                }
            }
            Op::Deallocate { index, handle } => {
                if !self.blocks.is_empty() {
                    let index = index as usize % self.blocks.len();
                    self.free(index, handle);
                }
            }
            Op::Grow {
                index,
                handle,
                by,
                align_log2,
                zeroed,
            } => {
                if self.blocks.is_empty() {
                    return;
                }
                let index = index as usize % self.blocks.len();
                let (ptr, old, id, cache) = {
                    let b = &self.blocks[index];
                    (b.ptr, b.layout, b.id, b.cache)
                };
                let size = (old.size() + by.bytes(palette))
                    .min(u16::MAX as usize)
                    .max(old.size());
                let align = align_log2.map_or(old.align(), align_from);
                let new = Layout::from_size_align(size, align).unwrap();
                let alloc = self.handle(cache, handle);
                // SAFETY: a live block of this cache, allocated for `old`;
                // `new` is at least as large.
                let result = unsafe {
                    check(ptr.as_ptr(), id, 0..old.size(), "before grow");
                    if zeroed {
                        alloc.grow_zeroed(ptr, old, new)
                    } else {
                        alloc.grow(ptr, old, new)
                    }
                };
                self.resized(index, result, new, zeroed, "grow");
            }
            Op::Shrink {
                index,
                handle,
                to,
                align_log2,
            } => {
                if self.blocks.is_empty() {
                    return;
                }
                let index = index as usize % self.blocks.len();
                let (ptr, old, id, cache) = {
                    let b = &self.blocks[index];
                    (b.ptr, b.layout, b.id, b.cache)
                };
                let size = to.bytes(palette) % (old.size() + 1);
                let align = align_log2.map_or(old.align(), align_from);
                let new = Layout::from_size_align(size, align).unwrap();
                let alloc = self.handle(cache, handle);
                // SAFETY: a live block of this cache, allocated for `old`;
                // `new` is at most as large.
                let result = unsafe {
                    check(ptr.as_ptr(), id, 0..old.size(), "before shrink");
                    alloc.shrink(ptr, old, new)
                };
                self.resized(index, result, new, false, "shrink");
            }
            Op::ReleaseCached { cache } => {
                let alloc = &self.slots[cache as usize % caches].handles[0];
                let before = alloc.stats();
                let released = alloc.release_cached();
                let after = alloc.stats();
                assert_eq!(released, before.bytes_cached);
                assert_eq!((after.bytes_cached, after.blocks_cached), (0, 0));
            }
            Op::Trim { cache, target } => {
                let target = target as usize % (1 << 20);
                let alloc = &self.slots[cache as usize % caches].handles[0];
                let before = alloc.stats();
                let trimmed = alloc.trim(target);
                let after = alloc.stats();
                assert!(
                    after.bytes_cached <= target,
                    "trim left {} > {target}",
                    after.bytes_cached
                );
                assert_eq!(trimmed, before.bytes_cached - after.bytes_cached);
            }
            Op::CloneHandle { cache } => {
                let slot = &mut self.slots[cache as usize % caches];
                if slot.handles.len() < 8 {
                    let clone = slot.handles[0].clone();
                    assert!(clone.same_cache(&slot.handles[0]));
                    slot.handles.push(clone);
                }
            }
            Op::DropHandle { cache, handle } => {
                let cache = cache as usize % caches;
                let slot = &mut self.slots[cache];
                if slot.handles.len() > 1 {
                    let handle = handle as usize % slot.handles.len();
                    slot.handles.swap_remove(handle);
                } else if !self.blocks.iter().any(|b| b.cache == cache) {
                    // The last handle of a cache with nothing in use: drop it
                    // (its cached blocks go back) and start a fresh one.
                    let owner = slot.owner;
                    let config = CacheConfig {
                        policy: match slot.policy {
                            SizePolicy::Exact => Policy::Exact,
                            SizePolicy::PowerOfTwoDivisions(n) => {
                                Policy::PowerOfTwoDivisions(n as u8 - 1)
                            }
                            // Best fit has its own target (best_fit.rs).
                            SizePolicy::BestFit => {
                                unreachable!("cache_ops builds no best-fit cache")
                            }
                        },
                        cap: slot.cap.map(|c| c as u32),
                        stop_caching_after_failure: slot.stop,
                    };
                    slot.handles.clear();
                    assert_eq!(
                        self.ledgers.live_bytes(owner),
                        0,
                        "a dropped cache kept memory"
                    );
                    assert_eq!(self.ledgers.live_blocks(owner), 0);
                    let fresh = self.build(&config);
                    self.slots[cache] = fresh;
                }
            }
            Op::CheckAll => {
                for block in &self.blocks {
                    // SAFETY: live blocks of ours.
                    unsafe {
                        check(
                            block.ptr.as_ptr(),
                            block.id,
                            0..block.layout.size(),
                            "check all",
                        )
                    };
                }
            }
        }
    }

    fn resized(
        &mut self,
        index: usize,
        result: Result<NonNull<[u8]>, allocator_api2::alloc::AllocError>,
        new: Layout,
        zeroed: bool,
        what: &str,
    ) {
        let block = &mut self.blocks[index];
        let old = block.layout;
        match result {
            Ok(moved) => {
                assert!(moved.len() >= new.size());
                let ptr = moved.cast::<u8>();
                let kept = old.size().min(new.size());
                // SAFETY: the resized block, `new.size()` bytes, ours.
                unsafe {
                    check(ptr.as_ptr(), block.id, 0..kept, what);
                    if zeroed {
                        check_zero(ptr.as_ptr(), kept..new.size(), what);
                    }
                    fill(ptr.as_ptr(), block.id, kept..new.size());
                }
                block.ptr = ptr;
                block.layout = new;
            }
            Err(_) => {
                assert!(
                    self.ledgers.may_fail(),
                    "{what} failed with no failure scheduled"
                );
                // SAFETY: on failure the old block stays live and untouched.
                unsafe {
                    check(
                        block.ptr.as_ptr(),
                        block.id,
                        0..old.size(),
                        "after a failed resize",
                    )
                };
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let config = &input.config;
    let ledgers = Ledgers::new(config.failures.iter().take(64).copied().collect());
    let two = config.two || config.budget.is_some();
    let mut world = World {
        ledgers: ledgers.clone(),
        budget: config
            .budget
            .map(|limit| Budget::new(limit as usize % (1 << 20))),
        slots: Vec::new(),
        blocks: Vec::new(),
        next_id: 1,
        next_owner: 0,
    };
    for cache in &config.caches[..if two { 2 } else { 1 }] {
        let slot = world.build(cache);
        world.slots.push(slot);
    }
    world.check();
    for op in input.ops.iter().take(512) {
        world.run(op, &config.palette);
        world.check();
    }

    // Free everything, release, drop: the backing must hold nothing.
    while !world.blocks.is_empty() {
        let last = world.blocks.len() - 1;
        world.free(last, 0);
        world.check();
    }
    for slot in &world.slots {
        slot.handles[0].release_cached();
        assert_eq!(ledgers.live_bytes(slot.owner), 0);
    }
    world.check();
    drop(world);
    assert_eq!(
        ledgers.total_live_blocks(),
        0,
        "the backing still holds blocks"
    );
});

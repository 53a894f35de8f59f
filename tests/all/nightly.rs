//! std's own collections over the cache (`core::alloc::Allocator`, nightly),
//! next to hashbrown and allocator-api2 (the allocator-api2 trait) in the
//! same build.

use core::alloc::{Allocator, Layout};

use crate::fixture::{Counting, zeros};
use caching_allocator::CachingAllocator;

#[test]
fn std_vec_and_box_reuse_blocks() {
    let backing = Counting::new();
    let cache = CachingAllocator::new_in(backing.clone());
    for pass in 0..4u64 {
        let mut v: Vec<u64, _> = Vec::with_capacity_in(512, cache.clone());
        v.extend((0..512).map(|i| i * pass));
        let b = Box::new_in([pass; 64], cache.clone());
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * pass));
        assert!(b.iter().all(|&x| x == pass));
    }
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.frees), (2, 6, 8));
    assert_eq!((stats.bytes_in_use, stats.bytes_cached), (0, 4096 + 512));
    assert_eq!(backing.allocs(), 2);
}

#[test]
fn std_and_allocator_api2_collections_share_blocks() {
    let backing = Counting::new();
    let cache = CachingAllocator::new_in(backing.clone());
    let std_vec: Vec<u32, _> = Vec::with_capacity_in(1000, cache.clone());
    let std_addr = std_vec.as_ptr() as usize;
    drop(std_vec);
    let api2_vec: allocator_api2::vec::Vec<u32, _> =
        allocator_api2::vec::Vec::with_capacity_in(1000, cache.clone());
    assert_eq!(api2_vec.as_ptr() as usize, std_addr);
    drop(api2_vec);

    let mut map = hashbrown::HashMap::new_in(cache.clone());
    let mut std_growing: Vec<u64, _> = Vec::new_in(cache.clone());
    for i in 0..3000u64 {
        map.insert(i, i + 1);
        std_growing.push(i * 2);
    }
    assert!(
        std_growing
            .iter()
            .enumerate()
            .all(|(i, &x)| x == 2 * i as u64)
    );
    std_growing.truncate(10);
    std_growing.shrink_to_fit();
    assert_eq!(&std_growing[..3], [0, 2, 4]);
    assert!((0..3000).all(|i| map[&i] == i + 1));
    drop((map, std_growing));
    let first = cache.stats();
    assert_eq!(first.bytes_in_use, 0);

    // The same workload again: every block from the cache.
    let mut map = hashbrown::HashMap::new_in(cache.clone());
    let mut std_growing: Vec<u64, _> = Vec::new_in(cache.clone());
    for i in 0..3000u64 {
        map.insert(i, i);
        std_growing.push(i);
    }
    std_growing.truncate(10);
    std_growing.shrink_to_fit();
    drop((map, std_growing));
    let second = cache.stats();
    assert_eq!(second.misses, first.misses);
    // The first pass also counted the two 1000-element vectors.
    assert_eq!(second.hits - first.hits, first.hits + first.misses - 2);
    assert_eq!(backing.allocs(), second.misses);
    drop(cache);
    assert_eq!(backing.live_blocks(), 0);
}

#[test]
fn core_allocate_zeroed_on_a_dirty_block() {
    let cache = CachingAllocator::new_in(Counting::new());
    let layout = Layout::from_size_align(2048, 8).unwrap();
    let block = Allocator::allocate(&cache, layout).unwrap();
    // SAFETY: a live block of 2048 bytes.
    unsafe { block.cast::<u8>().write_bytes(0xCD, 2048) };
    // SAFETY: live for `layout`.
    unsafe { Allocator::deallocate(&cache, block.cast(), layout) };
    let zeroed = Allocator::allocate_zeroed(&cache, layout).unwrap();
    assert_eq!(zeroed.cast::<u8>(), block.cast::<u8>());
    // SAFETY: a live, zeroed block of 2048 bytes.
    assert_eq!(unsafe { zeroed.as_ref() }, zeros(2048));
    // Dirty it again and let a zeroed std box take it.
    // SAFETY: as above.
    unsafe { zeroed.cast::<u8>().write_bytes(0xEF, 2048) };
    // SAFETY: live for `layout`.
    unsafe { Allocator::deallocate(&cache, zeroed.cast(), layout) };
    let boxed = Box::<[u64], _>::new_zeroed_slice_in(256, cache.clone());
    // SAFETY: zeroed memory is a valid [u64].
    let boxed = unsafe { boxed.assume_init() };
    assert_eq!(
        boxed.as_ptr() as usize,
        block.cast::<u8>().as_ptr() as usize
    );
    assert!(boxed.iter().all(|&x| x == 0));
    assert_eq!(cache.stats().hits, 2);
    assert_eq!(cache.backing().zeroed_allocs(), 0);
}

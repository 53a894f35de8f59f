//! Without `ScopedGlobal` as the global allocator (this test binary installs
//! none), `enter()` can have no effect: `ScopedGlobal::is_installed` says so,
//! and the first scope entered warns once on stderr.

use std::process::Command;

use allocator_api2::vec::Vec;
use caching_allocator::{CachingAllocator, ScopedGlobal};

const CHILD: &str = "CACHING_ALLOCATOR_INSTALLED_CHILD";

#[test]
fn no_scoped_global_is_installed_here() {
    assert!(!ScopedGlobal::is_installed());
    assert!(
        !ScopedGlobal::is_installed(),
        "asking twice changes nothing"
    );
}

#[test]
fn entering_a_scope_without_it_warns_once() {
    if std::env::var(CHILD).is_ok() {
        let cache = CachingAllocator::new();
        for _ in 0..3 {
            let _scope = cache.enter();
            drop(std::vec![0u8; 1 << 20]);
        }
        // Nothing reached the cache: the scopes had no effect.
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (0, 0));
        // The cache itself still works through its handle.
        drop(Vec::<u8, _>::with_capacity_in(4096, cache.clone()));
        assert_eq!(cache.stats().misses, 1);
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "installed::entering_a_scope_without_it_warns_once",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .matches("ScopedGlobal is not the #[global_allocator]")
            .count(),
        1,
        "{stderr}"
    );
}

//! Detects sanitizer builds: AddressSanitizer, so cached blocks can be
//! poisoned for it (`cfg(asan)`), and ThreadSanitizer, which cannot see
//! inside restartable sequences, so the fronts are per thread there
//! (`cfg(tsan)`). A build script, not `cfg(sanitize = ...)`, because stable
//! rejects that cfg.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(asan)");
    println!("cargo::rustc-check-cfg=cfg(tsan)");
    println!("cargo::rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    // `-Zsanitizer=address`, or `-Z sanitizer=address` as two flags.
    let sanitizer = |name: &str| {
        flags
            .split('\x1f')
            .any(|flag| flag.trim_start_matches("-Z").trim() == format!("sanitizer={name}"))
    };
    if sanitizer("address") {
        println!("cargo::rustc-cfg=asan");
    }
    if sanitizer("thread") {
        println!("cargo::rustc-cfg=tsan");
    }
}

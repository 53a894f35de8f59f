//! Detects an AddressSanitizer build, so cached blocks can be poisoned for
//! it: `cfg(asan)`. A build script, not `cfg(sanitize = "address")`, because
//! stable rejects that cfg.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(asan)");
    println!("cargo::rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    // `-Zsanitizer=address`, or `-Z sanitizer=address` as two flags.
    if flags
        .split('\x1f')
        .any(|flag| flag.trim_start_matches("-Z").trim() == "sanitizer=address")
    {
        println!("cargo::rustc-cfg=asan");
    }
}

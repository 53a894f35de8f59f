//! Inputs the fuzzer (`fuzz/`, target `trace_parser`) found to crash the
//! parser; each must now be a clean error.

use replay::trace::{HEADER, Trace};

/// Three blocks of the largest valid size: each fits a layout, their sum
/// overflowed the parser's running live-bytes total (a panic in debug, a
/// silent wrap in release).
#[test]
fn live_bytes_overflow_is_an_error_not_a_panic() {
    let max = isize::MAX as usize - 63;
    let text = format!("{HEADER}\np 0\na 1 {max}\na 2 {max}\na 3 {max}\n");
    let error = Trace::parse(&text, "t.trace", "t.trace".into()).unwrap_err();
    assert_eq!(error.line, 5);
    assert!(error.to_string().starts_with("t.trace:5:"), "{error}");
    assert!(error.to_string().contains("overflow"), "{error}");
}

//! The trace parser on good and malformed traces.

use replay::trace::{Event, HEADER, Trace};

fn parse(text: &str) -> Result<Trace, replay::ParseError> {
    Trace::parse(text, "model.trace", "model.trace".into())
}

/// Asserts that `text` fails at `line` with a message containing `needle`,
/// and that the message names the file and line.
#[track_caller]
fn fails_at(text: &str, line: usize, needle: &str) {
    let error = parse(text).expect_err("malformed trace parsed");
    let message = error.to_string();
    assert_eq!(error.line, line, "{message}");
    assert!(
        message.starts_with(&format!("model.trace:{line}: ")),
        "{message}"
    );
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

#[test]
fn a_good_trace_with_setup_comments_and_blank_lines() {
    let text = format!(
        "{HEADER}\n# model: test\n\na 1 1000\np 0\na 2 64\n  a 3 0\nf 2\nf 3\n# a comment\np 1\na 4 128\nf 1\n"
    );
    let trace = parse(&text).unwrap();
    assert_eq!(trace.name, "model.trace");
    assert_eq!(trace.setup, 0..1);
    assert_eq!(trace.passes, vec![1..3, 3..5]);
    assert_eq!(trace.live_after_setup, 1000);
    assert_eq!(trace.live_at_pass_end, vec![1000, 128]);
    assert_eq!(trace.peak_live_bytes, 1128);
    assert_eq!(trace.allocs_per_pass, vec![1, 1]);
    assert_eq!(trace.zero_size_allocs, 1);
    assert_eq!(trace.blocks_live_at_end, 1);
    // Block 4 (live at the end) is freed, then set-up block 1 (freed in pass 1)
    // comes back into its slot, before the passes repeat.
    assert_eq!(trace.slots, 2);
    assert_eq!(
        trace.wrap,
        vec![
            Event::Free { slot: 1, size: 128 },
            Event::Alloc {
                slot: 0,
                size: 1000
            }
        ]
    );
}

#[test]
fn bundled_traces_parse_and_match_their_readme() {
    let dir = std::path::Path::new(replay::BUNDLED_TRACES);
    let resnet = Trace::from_path(&dir.join("resnet18.trace")).unwrap();
    assert_eq!(resnet.passes.len(), 10);
    assert_eq!(resnet.events.len(), 2959);
    assert_eq!(resnet.allocs_per_pass, vec![148; 10]);
    assert_eq!(
        format!("{:.2}", resnet.peak_live_bytes as f64 / (1 << 20) as f64),
        "9.58"
    );
    let bert = Trace::from_path(&dir.join("bert_dynamic.trace")).unwrap();
    assert_eq!((bert.passes.len(), bert.events.len()), (20, 9118));
    let gpt = Trace::from_path(&dir.join("gpt_decode_small.trace")).unwrap();
    assert_eq!((gpt.passes.len(), gpt.events.len()), (65, 18709));
    assert_eq!(gpt.blocks_live_at_end, 11);
}

#[test]
fn missing_or_wrong_header() {
    fails_at("", 1, "empty file");
    fails_at("p 0\na 1 10\n", 1, "missing header");
    fails_at(
        "# caching-allocator trace v2\np 0\n",
        1,
        "unsupported trace version",
    );
}

#[test]
fn unknown_event() {
    fails_at(
        &format!("{HEADER}\np 0\na 1 10\nx 1\n"),
        4,
        "unknown event `x`",
    );
    fails_at(
        &format!("{HEADER}\np 0\nalloc 1 10\n"),
        3,
        "unknown event `alloc`",
    );
}

#[test]
fn free_of_unknown_or_freed_block() {
    let text = format!("{HEADER}\np 0\na 1 10\n");
    let mut long = text.clone();
    for _ in 0..13 {
        long.push_str("# padding\n");
    }
    long.push_str("f 42\n");
    fails_at(&long, 17, "free of unknown block id 42");
    fails_at(
        &format!("{text}f 1\nf 1\n"),
        5,
        "free of already freed block id 1 (freed at line 4)",
    );
    // A size-0 block is tracked too.
    fails_at(
        &format!("{HEADER}\np 0\na 7 0\nf 7\nf 7\n"),
        5,
        "already freed block id 7",
    );
}

#[test]
fn duplicate_id() {
    fails_at(
        &format!("{HEADER}\np 0\na 1 10\na 1 20\n"),
        4,
        "duplicate block id 1 (allocated at line 3)",
    );
    fails_at(
        &format!("{HEADER}\np 0\na 1 10\nf 1\na 1 20\n"),
        5,
        "duplicate block id 1",
    );
}

#[test]
fn bad_numbers() {
    fails_at(&format!("{HEADER}\np 0\na x 10\n"), 3, "bad block id `x`");
    fails_at(&format!("{HEADER}\np 0\na 1 -5\n"), 3, "bad size `-5`");
    fails_at(&format!("{HEADER}\np 0\na 1 1e3\n"), 3, "bad size `1e3`");
    fails_at(&format!("{HEADER}\np 0\na 0 8\n"), 3, "ids are positive");
    fails_at(&format!("{HEADER}\np zero\n"), 2, "bad pass number `zero`");
    fails_at(
        &format!("{HEADER}\np 0\na 1 99999999999999999999999\n"),
        3,
        "bad size",
    );
    fails_at(
        &format!("{HEADER}\np 0\na 1 {}\n", usize::MAX),
        3,
        "too large",
    );
}

#[test]
fn missing_field() {
    fails_at(&format!("{HEADER}\np 0\na 1\n"), 3, "missing size");
    fails_at(&format!("{HEADER}\np 0\na\n"), 3, "missing block id");
    fails_at(&format!("{HEADER}\np 0\na 1 8\nf\n"), 4, "missing block id");
    fails_at(&format!("{HEADER}\np\n"), 2, "missing pass number");
}

#[test]
fn extra_field() {
    fails_at(
        &format!("{HEADER}\np 0\na 1 8 9\n"),
        3,
        "unexpected extra field `9`",
    );
    fails_at(
        &format!("{HEADER}\np 0\na 1 8\nf 1 8\n"),
        4,
        "unexpected extra field `8`",
    );
    fails_at(
        &format!("{HEADER}\np 0 1\n"),
        2,
        "unexpected extra field `1`",
    );
}

#[test]
fn passes_in_order_and_present() {
    fails_at(&format!("{HEADER}\np 1\n"), 2, "pass 1 out of order");
    fails_at(&format!("{HEADER}\np 0\np 0\n"), 3, "pass 0 out of order");
    fails_at(&format!("{HEADER}\na 1 8\n"), 2, "no passes");
}

#[test]
fn unreadable_file_is_an_error_naming_it() {
    let error = Trace::from_path(std::path::Path::new("/nonexistent/x.trace")).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/x.trace: cannot read"),
        "{error}"
    );
}

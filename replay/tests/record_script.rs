//! scripts/record_trace.py's conversion (no torch needed): its own unit tests,
//! and its output on fake profiler events read back by the Rust parser.
//! Skipped when python3 is not installed.

use std::path::PathBuf;
use std::process::Command;

use replay::trace::Trace;

fn scripts() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts"))
}

fn python3() -> Option<Command> {
    let available = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !available {
        eprintln!("python3 not found: skipped");
    }
    available.then(|| Command::new("python3"))
}

#[test]
fn python_unit_tests_pass() {
    let Some(mut python) = python3() else { return };
    let output = python
        .arg(scripts().join("test_record_trace.py"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn converted_fake_events_parse_as_a_trace() {
    let Some(mut python) = python3() else { return };
    // Two passes of a static "model" plus a block allocated before the
    // profiler started, freed in pass 1 (dropped), and an output left live.
    let program = r#"
import sys
import record_trace
events = []
ts = 0.0
for p in range(3):
    base = 100.0 * (p + 1)
    events += [(base + 1, 0x1000, 602112), (base + 2, 0x2000, 2048), (base + 3, 0x1000, -602112),
               (base + 4, 0x3000, 2048), (base + 5, 0x2000, -2048), (base + 6, 0x3000, -2048)]
events.append((150.0, 0xdead, -64))
events.append((399.0, 0x4000, 4000))
passes = [(100.0 * (p + 1), 100.0 * (p + 1) + 50) for p in range(3)]
text, summary = record_trace.events_to_trace(events, passes, ["model: fake"])
assert summary["dropped_frees"] == 1, summary
sys.stdout.write(text)
"#;
    let output = python
        .env("PYTHONPATH", scripts())
        .arg("-c")
        .arg(program)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let trace = Trace::parse(&text, "fake.trace", "fake.trace".into())
        .unwrap_or_else(|error| panic!("{error}\n{text}"));
    assert_eq!(trace.passes.len(), 3);
    assert_eq!(trace.allocs_per_pass, vec![3, 3, 4]);
    assert_eq!(trace.peak_live_bytes, 602112 + 2048);
    assert_eq!(trace.live_at_pass_end, vec![0, 0, 4000]);
    assert_eq!(trace.blocks_live_at_end, 1);
}

//! Arbitrary bytes into the replay trace parser: it must never panic, and
//! whatever it accepts must be a consistent trace (passes non-empty, every
//! free frees a live allocation of its size, the counts it reports agree
//! with its events, and the wrap-around events restore the set-up state).
#![no_main]

use libfuzzer_sys::fuzz_target;
use replay::trace::{Event, Trace};

fn exercise(text: &str) {
    let trace = match Trace::parse(text, "fuzz.trace", "fuzz.trace".into()) {
        Ok(trace) => trace,
        Err(error) => {
            assert_eq!(error.file, "fuzz.trace");
            assert!(error.line >= 1, "a parse error names a line: {error}");
            assert!(
                error.line <= text.lines().count().max(1),
                "error line past the end: {error}"
            );
            let shown = error.to_string();
            assert!(
                shown.starts_with(&format!("fuzz.trace:{}: ", error.line)),
                "{shown}"
            );
            return;
        }
    };
    assert!(text.starts_with(replay::trace::HEADER));
    assert!(!trace.passes.is_empty(), "a parsed trace has passes");
    let n = trace.passes.len();
    assert_eq!(trace.live_at_pass_end.len(), n);
    assert_eq!(trace.allocs_per_pass.len(), n);
    // Set-up then the passes, contiguous, covering every event.
    assert_eq!(trace.setup.start, 0);
    assert_eq!(trace.setup.end, trace.passes[0].start);
    for pair in trace.passes.windows(2) {
        assert_eq!(pair[0].end, pair[1].start);
    }
    assert_eq!(trace.passes[n - 1].end, trace.events.len());
    assert_eq!(
        trace.pass_event_count(),
        trace.events.len() - trace.setup.len()
    );

    // Replay the events on a slot table: every free frees a live allocation
    // of the same size; sizes are never 0; the slot table is long enough.
    let mut slots: Vec<Option<usize>> = vec![None; trace.slots];
    let mut live: u128 = 0;
    let mut peak: u128 = 0;
    let apply = |event: &Event, slots: &mut Vec<Option<usize>>, live: &mut u128| match *event {
        Event::Alloc { slot, size } => {
            assert!(size > 0, "a size-0 block became an event");
            let entry = &mut slots[slot as usize];
            assert!(entry.is_none(), "alloc into occupied slot {slot}");
            *entry = Some(size);
            *live += size as u128;
        }
        Event::Free { slot, size } => {
            let entry = &mut slots[slot as usize];
            assert_eq!(
                *entry,
                Some(size),
                "free of slot {slot} that does not hold {size} bytes"
            );
            *entry = None;
            *live -= size as u128;
        }
    };
    for event in &trace.events[trace.setup.clone()] {
        apply(event, &mut slots, &mut live);
        peak = peak.max(live);
    }
    assert_eq!(live, trace.live_after_setup as u128);
    let after_setup = slots.clone();
    for (index, pass) in trace.passes.iter().enumerate() {
        let mut allocs = 0;
        for event in &trace.events[pass.clone()] {
            apply(event, &mut slots, &mut live);
            peak = peak.max(live);
            allocs += matches!(event, Event::Alloc { .. }) as usize;
        }
        assert_eq!(
            live, trace.live_at_pass_end[index] as u128,
            "pass {index}'s live bytes"
        );
        assert_eq!(
            allocs, trace.allocs_per_pass[index],
            "pass {index}'s allocations"
        );
        assert_eq!(trace.pass_events(index), &trace.events[pass.clone()]);
        assert_eq!(
            trace.live_at_end_of_pass(index),
            trace.live_at_pass_end[index]
        );
    }
    assert_eq!(peak, trace.peak_live_bytes as u128, "peak live bytes");
    assert_eq!(
        slots.iter().filter(|s| s.is_some()).count(),
        trace.blocks_live_at_end,
        "blocks live at the end"
    );
    // The wrap events bring the end state back to the state after set-up,
    // so the passes can repeat.
    for event in &trace.wrap {
        apply(event, &mut slots, &mut live);
    }
    assert_eq!(
        slots, after_setup,
        "the wrap does not restore the set-up state"
    );
}

/// A line of a structured trace: the same bytes read a second way, so that
/// well-formed traces with extreme sizes are reached quickly.
#[derive(Debug, arbitrary::Arbitrary)]
enum Line {
    Pass(u8),
    Alloc(u8, Size),
    Free(u8),
    Comment,
    Blank,
    Junk(u8),
}

#[derive(Debug, arbitrary::Arbitrary)]
enum Size {
    Zero,
    Small(u16),
    Any(u64),
    /// The largest size the parser accepts, and its neighbours.
    Max(u8),
}

fn render(lines: &[Line]) -> String {
    let mut text = format!("{}\n", replay::trace::HEADER);
    let max = isize::MAX as u64 - 63;
    for line in lines {
        match line {
            Line::Pass(n) => text.push_str(&format!("p {n}\n")),
            Line::Alloc(id, size) => {
                let size = match *size {
                    Size::Zero => 0,
                    Size::Small(s) => u64::from(s),
                    Size::Any(s) => s,
                    Size::Max(d) => max
                        .wrapping_sub(u64::from(d % 4))
                        .wrapping_add(u64::from(d / 4 % 2)),
                };
                text.push_str(&format!("a {id} {size}\n"));
            }
            Line::Free(id) => text.push_str(&format!("f {id}\n")),
            Line::Comment => text.push_str("# comment\n"),
            Line::Blank => text.push_str("  \n"),
            Line::Junk(b) => text.push_str(&format!("{}\n", char::from(*b))),
        }
    }
    text
}

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(text) => exercise(text),
        Err(_) => exercise(&String::from_utf8_lossy(data)),
    }
    // A valid header in front of anything, so the fuzzer reaches the body.
    let mut text = String::from(replay::trace::HEADER);
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(data));
    exercise(&text);
    // The bytes as structured lines.
    let mut u = arbitrary::Unstructured::new(data);
    if let Ok(lines) = u.arbitrary::<Vec<Line>>() {
        exercise(&render(&lines));
    }
});

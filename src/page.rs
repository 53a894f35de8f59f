//! A snapshot as a self-contained HTML page (`Snapshot::write_html`): inline
//! SVG, no script, no network at view time. Three parts: the memory in use
//! and held over the history's events, every segment as a bar of its blocks
//! coloured by state, and the memory held over the memory in use.

use std::fmt::Write as _;
use std::io::{self, Write};

use crate::history::Action;
use crate::snapshot::{BlockState, Snapshot};

const WIDTH: f64 = 1000.0;

/// The colour and name of a block's state.
fn paint(state: BlockState) -> (&'static str, &'static str) {
    match state {
        BlockState::InUse => ("#d62728", "in use"),
        BlockState::Free => ("#2ca02c", "free"),
        BlockState::QuickList => ("#98df8a", "quick list"),
        BlockState::Front(_) => ("#1f77b4", "front"),
        BlockState::Decommitted => ("#c7c7c7", "decommitted"),
        BlockState::Pinned => ("#ff7f0e", "pinned"),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// The in-use and held curves over the history: `(time µs, in use, held)`.
fn curves(snapshot: &Snapshot) -> Vec<(u64, i64, i64)> {
    let (mut in_use, mut held) = (0i64, 0i64);
    let mut points = Vec::with_capacity(snapshot.history.len());
    for event in &snapshot.history {
        let size = event.size as i64;
        match event.action {
            Action::Alloc => in_use += size,
            Action::Free => in_use -= size,
            Action::SegmentAlloc | Action::SegmentMap => held += size,
            Action::SegmentFree | Action::SegmentUnmap => held -= size,
            _ => continue,
        }
        points.push((event.time_us, in_use, held));
    }
    // The history may begin after some blocks were taken: lift both curves
    // so their lowest point is what the snapshot shows at the end, less
    // what changed since.
    if let Some(&(_, last_in_use, last_held)) = points.last() {
        let in_use_shift = snapshot.stats.bytes_in_use as i64 - last_in_use;
        let held_shift = snapshot.stats.bytes_reserved as i64 - last_held;
        for point in &mut points {
            point.1 = (point.1 + in_use_shift).max(0);
            point.2 = (point.2 + held_shift).max(0);
        }
    }
    points
}

fn timeline(snapshot: &Snapshot, svg: &mut String) {
    let points = curves(snapshot);
    let height = 220.0;
    let _ = write!(
        svg,
        r#"<svg width="{WIDTH}" height="{}" role="img" aria-label="memory over time">"#,
        height + 30.0
    );
    if points.len() < 2 {
        let _ = write!(
            svg,
            r#"<text x="10" y="40">No history: build the cache with record_history(n) to see memory over time.</text></svg>"#
        );
        return;
    }
    // Along the events (as PyTorch's active memory timeline), not the
    // clock: a pass's allocations take the width they have events for.
    let top = points
        .iter()
        .map(|p| p.1.max(p.2))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let last = (points.len() - 1).max(1) as f64;
    let x = |at: usize| at as f64 / last * (WIDTH - 20.0) + 10.0;
    let y = |v: i64| height - v as f64 / top * (height - 20.0) + 5.0;
    for (index, color, label) in [(1, "#d62728", "in use"), (2, "#1f77b4", "held")] {
        let mut path = String::new();
        for (at, point) in points.iter().enumerate() {
            let value = if index == 1 { point.1 } else { point.2 };
            let _ = write!(path, "{:.1},{:.1} ", x(at), y(value));
        }
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"><title>{label}</title></polyline>"#
        );
    }
    let _ = write!(
        svg,
        r#"<text x="10" y="{}" font-size="12">{} events over {:.1} ms; top {:.2} MiB; red: in use, blue: held</text></svg>"#,
        height + 22.0,
        points.len(),
        (points[points.len() - 1].0 - points[0].0) as f64 / 1e3,
        mib(top as usize)
    );
}

fn segments(snapshot: &Snapshot, svg: &mut String) {
    let row = 26.0;
    let height = row * snapshot.segments.len().max(1) as f64 + 10.0;
    let _ = write!(
        svg,
        r#"<svg width="{WIDTH}" height="{height}" role="img" aria-label="segments">"#
    );
    for (index, segment) in snapshot.segments.iter().enumerate() {
        let top = 5.0 + index as f64 * row;
        for block in &segment.blocks {
            let x = (block.address - segment.address) as f64 / segment.size.max(1) as f64 * WIDTH;
            let width = (block.size as f64 / segment.size.max(1) as f64 * WIDTH).max(0.5);
            let (color, name) = paint(block.state);
            let requested = block
                .requested
                .map_or(String::new(), |requested| format!(", {requested} B asked"));
            let _ = write!(
                svg,
                r#"<rect x="{x:.2}" y="{top}" width="{width:.2}" height="{}" fill="{color}"><title>{name}: {:#x}, {} B{requested}</title></rect>"#,
                row - 6.0,
                block.address,
                block.size
            );
        }
    }
    svg.push_str("</svg>");
}

/// Writes the page.
pub(crate) fn write(snapshot: &Snapshot, title: &str, out: &mut impl Write) -> io::Result<()> {
    // The page is built in memory of the inner allocator's (a scope's cache
    // never serves the crate's own bookkeeping).
    let _inside = crate::reentry::inside();
    let stats = &snapshot.stats;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>{}</h1><p id=\"summary\">held {:.2} MiB ({} bytes) for {:.2} MiB in use: <b id=\"ratio\">{:.2}x</b>; \
         peak held {:.2} MiB for a peak of {:.2} MiB in use ({:.2}x); {} segments; {} events recorded, {} kept.</p>",
        escape(title),
        mib(stats.bytes_reserved),
        stats.bytes_reserved,
        mib(stats.bytes_in_use),
        stats.bytes_reserved as f64 / stats.bytes_in_use.max(1) as f64,
        mib(stats.peak_bytes_reserved),
        mib(stats.peak_bytes_in_use),
        stats.peak_bytes_reserved as f64 / stats.peak_bytes_in_use.max(1) as f64,
        snapshot.segments.len(),
        snapshot.recorded,
        snapshot.history.len(),
    );
    body.push_str("<h2>Memory over time</h2>");
    timeline(snapshot, &mut body);
    body.push_str("<h2>Segments</h2><p>");
    for state in [
        BlockState::InUse,
        BlockState::Free,
        BlockState::QuickList,
        BlockState::Front(None),
        BlockState::Decommitted,
    ] {
        let (color, name) = paint(state);
        let bytes: usize = snapshot
            .segments
            .iter()
            .flat_map(|segment| &segment.blocks)
            .filter(|block| paint(block.state).1 == name)
            .map(|block| block.size)
            .sum();
        let _ = write!(
            body,
            "<span style=\"color:{color}\">&#9632;</span> {name} {:.2} MiB &nbsp; ",
            mib(bytes)
        );
    }
    body.push_str("</p>");
    segments(snapshot, &mut body);
    let _ = write!(
        body,
        "<h2>Stats</h2><pre>{}</pre>",
        escape(&stats.to_string())
    );
    write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>body{{font-family:sans-serif;margin:20px}}svg{{display:block;border:1px solid #ddd;margin:8px 0}}</style>\
         </head><body>{body}</body></html>",
        escape(title)
    )
}

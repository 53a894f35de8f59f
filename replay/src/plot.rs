//! `--plot FILE.svg`: memory over the replay, one panel per trace.

use std::path::Path;

use plotters::prelude::*;

use crate::engine::Sample;

/// One trace's panel: its name and each allocator's samples.
pub struct Panel<'a> {
    /// Title.
    pub title: String,
    /// (allocator name, samples, is a cache).
    pub series: Vec<(&'a str, &'a [Sample], bool)>,
}

/// A labelled series: (label, points in (event, MiB), color).
type Line = (String, Vec<(f64, f64)>, RGBColor);

const MIB: f64 = (1 << 20) as f64;

const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

fn points(samples: &[Sample], value: impl Fn(&Sample) -> usize) -> Vec<(f64, f64)> {
    samples
        .iter()
        .map(|sample| (sample.event as f64, value(sample) as f64 / MIB))
        .collect()
}

/// Draws resident memory over time, one line an allocator, with the
/// phases of a burst run marked (`burst.rs`).
pub fn draw_timeline(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    marks: &[(f64, &str)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let x_min = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(0.0, f64::min);
    let y_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(0.1, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the burst ended")
        .y_desc("resident MiB above the start")
        .draw()?;
    for &(at, label) in marks {
        chart.draw_series(LineSeries::new(
            [(at, 0.0), (at, y_max)],
            BLACK.mix(0.3).stroke_width(1),
        ))?;
        chart.draw_series([Text::new(
            label.to_string(),
            (at, y_max * 0.97),
            ("sans-serif", 13),
        )])?;
    }
    for (index, (label, points)) in series.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Draws the panels into an SVG file.
pub fn draw(path: &Path, panels: &[Panel<'_>]) -> Result<(), Box<dyn std::error::Error>> {
    let height = 420 * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (area, panel) in areas.iter().zip(panels) {
        let mut lines: Vec<Line> = Vec::new();
        if let Some((_, samples, _)) = panel.series.first() {
            lines.push((
                "trace live bytes".into(),
                points(samples, |s| s.live),
                BLACK,
            ));
        }
        for (index, (name, samples, is_cache)) in panel.series.iter().enumerate() {
            let color = PALETTE[index % PALETTE.len()];
            lines.push((
                format!("{name} resident (above baseline)"),
                points(samples, |s| s.rss),
                color,
            ));
            if *is_cache {
                let shade = |step: usize| PALETTE[(index + step) % PALETTE.len()];
                lines.push((
                    format!("{name} bytes_reserved"),
                    points(samples, |s| s.reserved),
                    shade(2),
                ));
                lines.push((
                    format!("{name} bytes_cached"),
                    points(samples, |s| s.cached),
                    shade(4),
                ));
            }
        }
        let x_max = lines
            .iter()
            .flat_map(|(_, points, _)| points.iter().map(|p| p.0))
            .fold(1.0, f64::max);
        let y_max = lines
            .iter()
            .flat_map(|(_, points, _)| points.iter().map(|p| p.1))
            .fold(0.1, f64::max)
            * 1.08;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("events replayed (thread 0)")
            .y_desc("MiB")
            .draw()?;
        for (label, points, color) in lines {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

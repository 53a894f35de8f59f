//! `replay`: replays allocation traces through each allocator, each in its
//! own child process, and prints one table per trace. See replay/README.md.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use replay::report::{self, ChildReport, Row};
use replay::{AllocatorKind, Options, Touch, Trace};

/// Replays allocation traces of real models (traces/*.trace) through the
/// caching allocator and its peers (glibc malloc, mimalloc, jemalloc), each in
/// its own child process, and prints per trace one row per allocator: cold and
/// steady pass times, page faults, peak resident memory, cache hits.
#[derive(Parser, Debug)]
#[command(name = "replay", version)]
struct Args {
    /// Trace files to replay [default: every *.trace in --traces-dir]
    traces: Vec<PathBuf>,

    /// Folder of traces replayed when no file is given [default: the repository's traces/]
    #[arg(long, value_name = "DIR")]
    traces_dir: Option<PathBuf>,

    /// Allocators to compare, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "LIST",
        default_value = "system,mimalloc,jemalloc,cache,cache-p2d4,cache-p2d4-cap"
    )]
    allocators: Vec<AllocatorKind>,

    /// Passes to replay in total (the file's passes repeat; set-up runs once)
    /// [default: the file's pass count, repeated whole until at least 200]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    passes: Option<u64>,

    /// How each new block is written: one byte per 4 KiB page, every byte, or not at all
    #[arg(long, value_enum, default_value_t = Touch::Page)]
    touch: Touch,

    /// Sleep between passes, in ms (not timed)
    #[arg(long, value_name = "G", default_value_t = 0)]
    gap_ms: u64,

    /// Threads replaying the trace at once on one allocator
    #[arg(long, value_name = "T", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: u64,

    /// Threads take turns (one runs a pass at a time), each frees what it
    /// holds after its last pass and stays alive (parked) while the final
    /// readings are taken: what a server's idle workers leave behind
    #[arg(long)]
    turns: bool,

    /// The front cache limit of the `cache-front` row, in bytes a thread
    /// (`Builder::front_cache_bytes`; `cache-bestfit-front` uses 1 MiB)
    #[arg(long, value_name = "BYTES", default_value_t = caching_allocator::FRONT_CACHE_BYTES)]
    front_bytes: usize,

    /// Replay the trace through a best-fit cache that records its history
    /// and write the crate's memory page of it, with a snapshot at the last
    /// pass's peak, to FILE (and PyTorch's pickle to FILE.pickle)
    #[arg(long, value_name = "FILE.html")]
    html: Option<PathBuf>,

    /// A burst, an idle gap, then a trickle: resident memory over time for
    /// each allocator (see `burst.rs`); with --plot, drawn over time
    #[arg(long)]
    burst: bool,

    /// --burst: threads replaying the whole trace at once in the burst
    #[arg(long, value_name = "T", default_value_t = 4)]
    burst_threads: usize,

    /// --burst: the idle gap after the burst, in ms [default: twice --release-after-ms]
    #[arg(long, value_name = "MS")]
    idle_ms: Option<u64>,

    /// --burst: passes of the trickle (one thread)
    #[arg(long, value_name = "N", default_value_t = 200)]
    short_passes: usize,

    /// --burst: the decay window of the cache-bestfit-decay row, in ms
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    release_after_ms: u64,

    /// Internal: a burst child for this row
    #[arg(long, hide = true, value_name = "ROW")]
    child_burst: Option<String>,

    /// Internal: the burst child replays only the trickle
    #[arg(long, hide = true)]
    short_only: bool,

    /// Also write the rows as JSON to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Also draw memory over the replay (live, cached, resident) as an SVG
    /// (samples inside passes cost a little time)
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,

    /// Internal: replay one trace with one allocator in this process and
    /// print one JSON line
    #[arg(long, hide = true, value_name = "ALLOCATOR")]
    child: Option<AllocatorKind>,

    /// Internal: sample memory every K events (for --plot)
    #[arg(long, hide = true, value_name = "K")]
    sample_every: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (&args.child, &args.child_burst) {
        (Some(kind), _) => child(&args, *kind),
        (None, Some(row)) => burst_child(&args, row),
        (None, None) if args.burst => burst_parent(&args),
        (None, None) if args.html.is_some() => html(&args),
        (None, None) => parent(&args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("replay: {message}");
            ExitCode::FAILURE
        }
    }
}

fn schedule(args: &Args, short_only: bool) -> replay::burst::Schedule {
    replay::burst::Schedule {
        burst_threads: args.burst_threads.max(1),
        idle: Duration::from_millis(args.idle_ms.unwrap_or(2 * args.release_after_ms)),
        short_passes: args.short_passes,
        release_after: Duration::from_millis(args.release_after_ms),
        short_only,
        touch: args.touch,
    }
}

/// `--html`: the page of the first trace given (or the first bundled one).
fn html(args: &Args) -> Result<ExitCode, String> {
    let path = trace_paths(args)?
        .into_iter()
        .next()
        .ok_or("no trace to replay")?;
    let trace = Trace::from_path(&path).map_err(|error| error.to_string())?;
    let passes = args
        .passes
        .map_or(2 * trace.passes.len().max(1), |n| n as usize);
    let file = args.html.clone().unwrap_or_default();
    let snapshot = replay::page::write(&trace, passes, &file)?;
    println!(
        "{}: {} segments, {} events in the history; page {}, pickle {}",
        trace.name,
        snapshot.segments.len(),
        snapshot.history.len(),
        file.display(),
        file.with_extension("pickle").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Burst child: one row's burst run (or its trickle alone), one JSON line.
fn burst_child(args: &Args, row: &str) -> Result<ExitCode, String> {
    let [path] = args.traces.as_slice() else {
        return Err("--child-burst takes exactly one trace file".into());
    };
    let trace = Trace::from_path(path).map_err(|error| error.to_string())?;
    let report = replay::burst::child(row, &trace, schedule(args, args.short_only))?;
    let line = serde_json::to_string(&report).map_err(|error| error.to_string())?;
    writeln!(std::io::stdout().lock(), "{line}").map_err(|error| error.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// `--burst`: every burst row on each trace, then its trickle alone.
fn burst_parent(args: &Args) -> Result<ExitCode, String> {
    use replay::burst::{BurstReport, ROWS};
    let exe =
        std::env::current_exe().map_err(|error| format!("cannot find own binary: {error}"))?;
    let schedule = schedule(args, false);
    let mut all = Vec::new();
    for path in trace_paths(args)? {
        let trace = Trace::from_path(&path).map_err(|error| error.to_string())?;
        println!(
            "{}: a burst of {} threads replaying the trace, {} ms idle, then {} passes on one \
             thread; touch {}; cache-bestfit-decay: release_after {} ms and decay::spawn()",
            trace.name,
            schedule.burst_threads,
            schedule.idle.as_millis(),
            schedule.short_passes,
            args.touch.name(),
            args.release_after_ms
        );
        println!(
            "{:<24} {:>14} {:>14} {:>14} {:>8} {:>12}",
            "allocator", "after idle MiB", "trickle MiB", "need MiB", "x need", "trickle ms"
        );
        let mut series = Vec::new();
        let mut marks = Vec::new();
        for row in ROWS {
            let run = |short_only: bool| -> Result<BurstReport, String> {
                let mut command = Command::new(&exe);
                command
                    .arg("--child-burst")
                    .arg(row)
                    .arg("--burst-threads")
                    .arg(schedule.burst_threads.to_string())
                    .arg("--idle-ms")
                    .arg(schedule.idle.as_millis().to_string())
                    .arg("--short-passes")
                    .arg(schedule.short_passes.to_string())
                    .arg("--release-after-ms")
                    .arg(args.release_after_ms.to_string())
                    .arg("--touch")
                    .arg(args.touch.name());
                if short_only {
                    command.arg("--short-only");
                }
                let output = command
                    .arg("--")
                    .arg(&path)
                    .stderr(Stdio::inherit())
                    .output()
                    .map_err(|error| error.to_string())?;
                if !output.status.success() {
                    return Err(format!("{row}: child failed ({})", output.status));
                }
                serde_json::from_slice(&output.stdout).map_err(|error| error.to_string())
            };
            let burst = run(false)?;
            let need = run(true)?;
            let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
            println!(
                "{:<24} {:>14.2} {:>14.2} {:>14.2} {:>8.2} {:>12.4}",
                row,
                mib(burst.rss_after_idle),
                mib(burst.rss_short_peak),
                mib(need.rss_short_peak),
                burst.rss_short_peak as f64 / need.rss_short_peak.max(1) as f64,
                burst.short_median_ms
            );
            if marks.is_empty() {
                marks.push((0.0, "burst ends"));
                marks.push((schedule.idle.as_secs_f64(), "trickle"));
            }
            // Time since this row's burst ended: the idle gaps line up.
            series.push((
                row.to_string(),
                burst
                    .readings
                    .iter()
                    .map(|reading| ((reading.ms - burst.burst_end_ms) / 1e3, mib(reading.rss)))
                    .collect::<Vec<_>>(),
            ));
            all.push((trace.name.clone(), burst, need));
        }
        if let Some(plot) = &args.plot {
            let file = if trace_paths(args)?.len() > 1 {
                plot.with_file_name(format!(
                    "{}-{}",
                    trace.name,
                    plot.file_name()
                        .and_then(|name| name.to_str())
                        .unwrap_or("burst.svg")
                ))
            } else {
                plot.clone()
            };
            let title = format!(
                "{}: resident memory, a burst of {} threads, {} ms idle, a trickle",
                trace.name,
                schedule.burst_threads,
                schedule.idle.as_millis()
            );
            replay::plot::draw_timeline(&file, &title, &series, &marks)
                .map_err(|error| error.to_string())?;
            println!("plot: {}", file.display());
        }
    }
    if let Some(json) = &args.json {
        let text = serde_json::to_string_pretty(&all).map_err(|error| error.to_string())?;
        std::fs::write(json, text).map_err(|error| error.to_string())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Child mode: replay one trace with one allocator, print one JSON line.
fn child(args: &Args, kind: AllocatorKind) -> Result<ExitCode, String> {
    let [path] = args.traces.as_slice() else {
        return Err("--child takes exactly one trace file".into());
    };
    let trace = Trace::from_path(path).map_err(|error| error.to_string())?;
    let threads = args.threads as usize;
    let options = Options {
        passes: args.passes.map_or_else(
            || replay::default_passes(trace.passes.len()),
            |n| n as usize,
        ),
        touch: args.touch,
        gap: Duration::from_millis(args.gap_ms),
        threads,
        sample_every: args.sample_every,
        front_bytes: args.front_bytes,
        turns: args.turns,
    };
    let outcome = kind.replay(&trace, &options)?;
    let report = ChildReport::new(kind, &trace, threads, outcome);
    let line = serde_json::to_string(&report).map_err(|error| error.to_string())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").map_err(|error| error.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// One trace's results, as `--json` writes them.
#[derive(Serialize)]
struct TraceReport {
    trace: String,
    path: String,
    passes_in_file: usize,
    passes_replayed: usize,
    allocations_per_pass: f64,
    peak_live_bytes: usize,
    rows: Vec<Row>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct JsonReport {
    touch: Touch,
    gap_ms: u64,
    threads: u64,
    traces: Vec<TraceReport>,
}

fn trace_paths(args: &Args) -> Result<Vec<PathBuf>, String> {
    if !args.traces.is_empty() {
        return Ok(args.traces.clone());
    }
    let dir = args
        .traces_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(replay::BUNDLED_TRACES));
    let entries = std::fs::read_dir(&dir)
        .map_err(|error| format!("cannot list traces in {}: {error}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "trace"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(format!("no *.trace files in {}", dir.display()));
    }
    // Shorter names in reports: relative to the current directory if possible.
    let cwd = std::env::current_dir().ok();
    Ok(paths
        .into_iter()
        .map(|path| {
            let path = path.canonicalize().unwrap_or(path);
            cwd.as_deref()
                .and_then(|cwd| path.strip_prefix(cwd).ok())
                .map(Path::to_path_buf)
                .unwrap_or(path)
        })
        .collect())
}

fn run_child(
    exe: &Path,
    args: &Args,
    kind: AllocatorKind,
    path: &Path,
    passes: usize,
    sample_every: Option<usize>,
) -> Result<ChildReport, String> {
    let mut command = Command::new(exe);
    command
        .arg("--child")
        .arg(kind.name())
        .arg("--passes")
        .arg(passes.to_string())
        .arg("--touch")
        .arg(args.touch.name())
        .arg("--gap-ms")
        .arg(args.gap_ms.to_string())
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--front-bytes")
        .arg(args.front_bytes.to_string());
    if args.turns {
        command.arg("--turns");
    }
    if let Some(every) = sample_every {
        command.arg("--sample-every").arg(every.to_string());
    }
    command.arg("--").arg(path);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot start {}: {error}", exe.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "{} child for {} failed ({}): {}",
            kind.name(),
            path.display(),
            output.status,
            stderr.trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line).map_err(|error| {
        format!(
            "{} child for {} printed no result ({error}): {}",
            kind.name(),
            path.display(),
            stderr.trim()
        )
    })
}

fn parent(args: &Args) -> Result<ExitCode, String> {
    let started = Instant::now();
    let paths = trace_paths(args)?;
    // Parse everything first: a malformed trace stops the run before any child.
    let traces: Vec<(PathBuf, Trace)> = paths
        .into_iter()
        .map(|path| Trace::from_path(&path).map(|trace| (path, trace)))
        .collect::<Result<_, _>>()
        .map_err(|error| error.to_string())?;
    let mut kinds: Vec<AllocatorKind> = Vec::new();
    for &kind in &args.allocators {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let exe =
        std::env::current_exe().map_err(|error| format!("cannot find own binary: {error}"))?;
    let threads = args.threads as usize;

    let bar = ProgressBar::new((traces.len() * kinds.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));

    let mut failed = false;
    let mut json_traces = Vec::new();
    let mut plot_data: Vec<(String, Vec<ChildReport>)> = Vec::new();
    for (path, trace) in &traces {
        let passes = args.passes.map_or_else(
            || replay::default_passes(trace.passes.len()),
            |n| n as usize,
        );
        let sample_every = args.plot.as_ref().map(|_| {
            let per_pass = trace.pass_event_count() / trace.passes.len().max(1);
            (per_pass * passes / 1500).max(1)
        });
        let mut reports = Vec::new();
        let mut errors = Vec::new();
        for &kind in &kinds {
            bar.set_message(format!("{} / {}", trace.name, kind.name()));
            match run_child(&exe, args, kind, path, passes, sample_every) {
                Ok(report) => reports.push(report),
                Err(error) => {
                    failed = true;
                    bar.suspend(|| eprintln!("replay: {error}"));
                    errors.push(error);
                }
            }
            bar.inc(1);
        }
        let rows = report::rows(trace, threads, &reports);
        let allocations = trace.allocs_per_pass.iter().sum::<usize>() as f64
            / trace.allocs_per_pass.len().max(1) as f64;
        let title = format!(
            "{}: {} passes in file, {} replayed (1 cold + {} steady); {:.0} allocations/pass; \
             peak live {:.2} MiB; touch {}, {} thread{}, gap {} ms",
            trace.name,
            trace.passes.len(),
            passes,
            passes - 1,
            allocations,
            trace.peak_live_bytes as f64 / (1 << 20) as f64,
            args.touch.name(),
            threads,
            if threads == 1 { "" } else { "s" },
            args.gap_ms,
        );
        let mut text = report::table(&title, &rows);
        for row in &rows {
            if let Some(summary) = &row.cache_summary {
                text.push_str(&format!(
                    "{} stats at the end ({}):\n",
                    row.allocator, trace.name
                ));
                for line in summary.lines() {
                    text.push_str(&format!("  {line}\n"));
                }
            }
            if row.in_use_mismatches > 0 {
                text.push_str(&format!(
                    "warning: {}: the cache's bytes_in_use disagreed with the trace's live bytes \
                     at {} pass ends\n",
                    row.allocator, row.in_use_mismatches
                ));
            }
        }
        bar.suspend(|| println!("{text}"));
        json_traces.push(TraceReport {
            trace: trace.name.clone(),
            path: path.display().to_string(),
            passes_in_file: trace.passes.len(),
            passes_replayed: passes,
            allocations_per_pass: allocations,
            peak_live_bytes: trace.peak_live_bytes,
            rows,
            errors,
        });
        plot_data.push((trace.name.clone(), reports));
    }
    bar.finish_and_clear();
    println!(
        "{} trace{} x {} allocator{} in {:.1} s",
        traces.len(),
        if traces.len() == 1 { "" } else { "s" },
        kinds.len(),
        if kinds.len() == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64()
    );

    if let Some(json) = &args.json {
        let report = JsonReport {
            touch: args.touch,
            gap_ms: args.gap_ms,
            threads: args.threads,
            traces: json_traces,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|error| error.to_string())?;
        std::fs::write(json, text + "\n")
            .map_err(|error| format!("cannot write {}: {error}", json.display()))?;
    }
    if let Some(svg) = &args.plot {
        let panels: Vec<replay::plot::Panel<'_>> = plot_data
            .iter()
            .map(|(name, reports)| replay::plot::Panel {
                title: format!(
                    "{name}: memory over the replay (touch {}, {} thread{})",
                    args.touch.name(),
                    threads,
                    if threads == 1 { "" } else { "s" }
                ),
                series: reports
                    .iter()
                    .map(|report| {
                        (
                            report.allocator.name(),
                            report.samples.as_slice(),
                            report.allocator.is_cache(),
                        )
                    })
                    .collect(),
            })
            .collect();
        replay::plot::draw(svg, &panels)
            .map_err(|error| format!("cannot draw {}: {error}", svg.display()))?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

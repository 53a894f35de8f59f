#!/usr/bin/env python3
"""Regenerates every figure page under docs/: each page says the command
that wrote it, the date (UTC), the commit, the machine and its load, so a
figure in the README or a page is regenerated, never retyped.

Usage: python3 scripts/report.py [--only NAME[,NAME]] [--quick] [--dry-run] [--out DIR]

Pages (NAME: what writes it):
  replay   docs/replay.md   every bundled trace through every allocator row
                            (`cargo run --release -- --allocators ALL ...`)
  benches  docs/benches.md  criterion's medians of `cargo bench --bench hit_path`
                            and `--bench scoped_global`
  threads  docs/threads.md  scripts/measure_threads.py
  burst    docs/burst.md    scripts/measure_burst.py (and docs/burst-*.svg)
  history  docs/history.md  scripts/measure_history.py

Steps run one after another (the machine has 2 cores: one measurement at a
time). A full run takes about half an hour, most of it threads and history.
--quick runs the fewest passes, runs and shortest bench times (a smoke test
of the commands and the pages); its figures are not to be quoted, so without
--out it writes into a new temporary directory, never docs/. --dry-run prints
the commands and writes nothing.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from stamp import ROOT, Stamp

STEPS = ["replay", "benches", "threads", "burst", "history"]

# The replay configurations docs/replay.md shows, each with every row.
REPLAY_CONFIGS = [
    ([], "pages touched (one byte a 4 KiB page of every new block), one thread, no gap"),
    (["--touch", "none"], "no byte touched: the allocators' own cost (resident memory is then meaningless)"),
    (["--threads", "2"], "two threads replaying the trace at once on one allocator"),
    (["--gap-ms", "20"], "a 20 ms idle gap between passes, as a server idles between requests"),
]
QUICK_PASSES = "10"

BENCHES = ["hit_path", "scoped_global"]
QUICK_BENCH_FLAGS = ["--warm-up-time", "0.1", "--measurement-time", "0.2", "--sample-size", "10"]

# Derived columns of docs/benches.md: (group, title, a, b, how), computed
# for each input that has both functions. Times under hit_path_threads are
# wall time a pair for the whole process (1 / throughput), so b / a is a's
# throughput over b's.
RATIOS = [
    ("hit_path_threads", "2 threads shared ÷ 1 (throughput)", "cache_2_threads_shared", "cache_1_thread", "throughput"),
    ("hit_path_threads", "2 threads own ÷ 1 (throughput)", "cache_2_threads_own", "cache_1_thread", "throughput"),
    ("hit_path_threads", "fronts: 2 threads shared ÷ 1 (throughput)", "front_2_threads_shared", "front_1_thread", "throughput"),
    ("global_no_scope", "ScopedGlobal's overhead", "scoped_global", "system", "overhead"),
]

# The history page's hit-path comparison: the commit before the history
# landed (what docs/history.md was measured against).
HISTORY_BASELINE = "08153fa"


def log(message):
    print(f"[report] {message}", file=sys.stderr, flush=True)


def shown(args):
    return " ".join(args)


def target_dir():
    """Cargo's target directory (CARGO_TARGET_DIR, or target/ at the root)."""
    return os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))


def run(args, dry_run):
    """Runs `args` at the repository root; its stdout (None in a dry run)."""
    if dry_run:
        print(shown(args), flush=True)
        return None
    log("running: " + shown(args))
    started = time.monotonic()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"[report] failed ({result.returncode}): {shown(args)}")
    log(f"  done in {time.monotonic() - started:.0f} s, load average {open('/proc/loadavg').read().split()[0]}")
    return result.stdout


# --- replay -----------------------------------------------------------------


def allocator_rows(help_text):
    """[(row, description)] that `replay --help` lists under --allocators."""
    rows, inside = [], False
    for line in help_text.splitlines():
        text = line.strip()
        if text.startswith("--allocators"):
            inside = True
        elif inside and text.startswith("--"):
            break
        elif inside:
            match = re.match(r"^- ([A-Za-z0-9_-]+):\s*(.*)$", text)
            if match:
                rows.append([match.group(1), match.group(2)])
            elif rows and text and not text.startswith("["):
                rows[-1][1] += " " + text  # a wrapped description
    return [tuple(row) for row in rows]


def split_replay_output(text):
    """(tables, stats): the replay's stdout as printed, with each
    `NAME stats at the end (TRACE):` line and the indented lines under it
    moved to `stats`."""
    tables, stats, in_stats = [], [], False
    for line in text.splitlines():
        if re.match(r"^\S.* stats at the end \(.*\):$", line):
            in_stats = True
            stats.append(line)
        elif in_stats and line.startswith("  "):
            stats.append(line)
        else:
            in_stats = False
            tables.append(line)
    return "\n".join(tables).strip("\n"), "\n".join(stats)


def replay_page(stamp, rows, runs):
    """docs/replay.md from [(command, what, stdout)]."""
    lines = [
        "# The replay: every bundled trace through every allocator",
        "",
        stamp.text(),
        "",
        "Each table is the replay tool's own output (`cargo run --release`, the workspace's "
        "`replay` package), unedited: one row per allocator, each in its own child process, "
        "one after another. What each column means: [replay/README.md](../replay/README.md#columns). "
        "The machine is shared with other jobs and has few cores: medians move by 10-30% between "
        "runs and p90s more, so compare rows of one table, not tables of different runs or days.",
        "",
        "The rows, as `replay --help` describes them:",
        "",
        "| row | what is called |",
        "|---|---|",
    ]
    lines += ["| `%s` | %s |" % (name, what.replace("|", "\\|")) for name, what in rows]
    lines.append("")
    for command, what, output in runs:
        tables, stats = split_replay_output(output)
        lines += [f"## {what}", "", f"`{command}`", "", "```text", tables, "```", ""]
        if stats:
            lines += [
                "<details><summary>Each cache's <code>Stats</code> at the end of the last pass</summary>",
                "",
                "```text",
                stats,
                "```",
                "",
                "</details>",
                "",
            ]
    return "\n".join(lines)


def step_replay(out, quick, dry_run):
    run(["cargo", "build", "--release", "-p", "replay"], dry_run)
    binary = os.path.join(target_dir(), "release", "replay")
    rows = []
    if os.path.exists(binary):  # built above (in a dry run: if it was built before)
        help_text = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
        rows = allocator_rows(help_text)
    if not rows and not dry_run:
        raise SystemExit("[report] found no rows under --allocators in `replay --help`")
    every = ",".join(name for name, _ in rows) if rows else "<every row replay --help lists>"
    stamp = None if dry_run else Stamp.now(
        "python3 scripts/report.py --only replay" + (" --quick" if quick else "")
    )
    runs = []
    for flags, what in REPLAY_CONFIGS:
        args = ["cargo", "run", "--release", "--", "--allocators", every] + flags
        if quick:
            args += ["--passes", QUICK_PASSES]
        output = run(args, dry_run)
        runs.append((shown(args), what, output))
    if dry_run:
        return
    stamp.finish()
    write(os.path.join(out, "replay.md"), replay_page(stamp, rows, runs))


# --- benches ----------------------------------------------------------------


def median_ns(estimates):
    """Criterion's median (ns) from the contents of an estimates.json."""
    return estimates["median"]["point_estimate"]


def criterion_results(criterion_dir, since):
    """[(group, function, input, median ns)] of every benchmark criterion
    wrote under `criterion_dir` at or after `since` (a time.time()), in the
    order it wrote them (so in the bench's own order)."""
    found = []
    for folder, _, files in os.walk(criterion_dir):
        if os.path.basename(folder) != "new" or not {"estimates.json", "benchmark.json"} <= set(files):
            continue
        estimates = os.path.join(folder, "estimates.json")
        written = os.path.getmtime(estimates)
        if written < since:
            continue
        with open(os.path.join(folder, "benchmark.json")) as f:
            bench = json.load(f)
        with open(estimates) as f:
            median = median_ns(json.load(f))
        found.append((written, bench["group_id"], bench.get("function_id"), bench.get("value_str"), median))
    found.sort(key=lambda row: row[0])
    return [row[1:] for row in found]


def fmt_ns(ns):
    if ns < 10:
        return f"{ns:.2f} ns"
    if ns < 1e3:
        return f"{ns:.1f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns / 1e6:.2f} ms"


def ratio_cell(a, b, how):
    if how == "throughput":
        return f"{b / a:.2f}x"
    return f"{100 * (a / b - 1):+.1f}%"


def bench_tables(results):
    """Markdown tables, one a group, of [(group, function, input, ns)]: a row
    an input and a column a function (a row a function where the benchmarks
    have no input), in the order criterion ran them, plus RATIOS."""
    groups = {}
    for group, function, value, ns in results:
        groups.setdefault(group, []).append((function, value, ns))
    lines = []
    for group, benches in groups.items():
        lines += [f"### `{group}`", ""]
        if all(value is None for _, value, _ in benches):
            lines += ["| bench | median |", "|---|---:|"]
            lines += [f"| `{group}/{function}` | {fmt_ns(ns)} |" for function, _, ns in benches]
            lines.append("")
            continue
        functions = list(dict.fromkeys(function for function, _, _ in benches))
        inputs = list(dict.fromkeys(value for _, value, _ in benches))
        cell = {(function, value): ns for function, value, ns in benches}
        ratios = [r for r in RATIOS if r[0] == group and r[2] in functions and r[3] in functions]
        lines.append("| input | " + " | ".join(f"`{f}`" for f in functions)
                     + "".join(f" | {r[1]}" for r in ratios) + " |")
        lines.append("|---|" + "---:|" * (len(functions) + len(ratios)))
        for value in inputs:
            row = [fmt_ns(cell[(f, value)]) if (f, value) in cell else "-" for f in functions]
            for _, _, a, b, how in ratios:
                both = (a, value) in cell and (b, value) in cell
                row.append(ratio_cell(cell[(a, value)], cell[(b, value)], how) if both else "-")
            lines.append(f"| {value} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def benches_page(stamp, runs):
    """docs/benches.md from [(command, results)]."""
    lines = [
        "# The micro benches: criterion's medians",
        "",
        stamp.text(),
        "",
        "What each bench measures, and how to read the thread rows: "
        "[benches/README.md](../benches/README.md). A cell is criterion's median of its samples "
        "(`median.point_estimate` in `target/criterion/GROUP/FUNCTION/INPUT/new/estimates.json`), "
        "time an iteration; the middle figure criterion prints on its `time:` line is its slope "
        "estimate, close to but not the median. The machine is shared with other jobs and has few "
        "cores: compare cells of one run, not figures across days.",
        "",
    ]
    for command, results in runs:
        lines += [f"## `{command}`", ""]
        lines += bench_tables(results) if results else ["(no benchmark written)", ""]
    return "\n".join(lines)


def step_benches(out, quick, dry_run):
    criterion_dir = os.path.join(target_dir(), "criterion")
    for bench in BENCHES:
        run(["cargo", "bench", "--bench", bench, "--no-run"], dry_run)  # build outside the stamp
    stamp = None if dry_run else Stamp.now(
        "python3 scripts/report.py --only benches" + (" --quick" if quick else "")
    )
    runs = []
    for bench in BENCHES:
        args = ["cargo", "bench", "--bench", bench]
        if quick:
            args += ["--"] + QUICK_BENCH_FLAGS
        since = time.time()
        run(args, dry_run)
        if not dry_run:
            runs.append((shown(args), criterion_results(criterion_dir, since)))
    if dry_run:
        return
    stamp.finish()
    write(os.path.join(out, "benches.md"), benches_page(stamp, runs))


# --- the measure scripts ----------------------------------------------------


def measure_args(name, out, quick, history_baseline):
    """The command line of scripts/measure_NAME.py that writes its page into `out`."""
    out = rel(out)
    script = ["python3", os.path.join("scripts", f"measure_{name}.py")]
    if name == "threads":
        flags = ["--runs", "1", "--skip-bench"] if quick else ["--runs", "3"]
        return script + flags + ["--out", os.path.join(out, "threads.md")]
    if name == "burst":
        flags = ["--release-after-ms", "50", "--burst-threads", "2"] if quick else ["--release-after-ms", "300"]
        return script + flags + ["--out", out]
    if name == "history":
        flags = ["--runs", "1"] if quick else ["--runs", "3"]
        if history_baseline and not quick:
            flags += ["--baseline", history_baseline]
        return script + flags + ["--out", os.path.join(out, "history.md")]
    raise ValueError(name)


def rel(path):
    """`path` from the repository root where it is under it (for commands and logs)."""
    inside = path.startswith(ROOT + os.sep)
    return os.path.relpath(path, ROOT) if inside else path


def write(path, text):
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")
    log(f"wrote {rel(path)}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[4:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", help="comma-separated pages: " + ",".join(STEPS))
    parser.add_argument("--quick", action="store_true", help="fewest runs, shortest times (a smoke test)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--out", help="where pages go [default: docs/; with --quick a new temporary directory]")
    parser.add_argument("--history-baseline", default=HISTORY_BASELINE,
                        help=f"git ref the history page compares the hit path with [default: {HISTORY_BASELINE}; '' for none]")
    args = parser.parse_args(argv)

    steps = STEPS if not args.only else args.only.split(",")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown page(s) {','.join(unknown)}; pages: {','.join(STEPS)}")
    if args.out:
        out = os.path.abspath(args.out)
    elif args.quick and not args.dry_run:
        out = tempfile.mkdtemp(prefix="caching-allocator-report-")
    elif args.quick:
        out = "<a new temporary directory>"
    else:
        out = os.path.join(ROOT, "docs")
    if not args.dry_run:
        os.makedirs(out, exist_ok=True)
    log(f"pages: {','.join(steps)} into {out}" + (" (quick: figures not to be quoted)" if args.quick else ""))
    started = time.monotonic()
    for step in steps:
        log(f"== {step}")
        if step == "replay":
            step_replay(out, args.quick, args.dry_run)
        elif step == "benches":
            step_benches(out, args.quick, args.dry_run)
        else:
            run(measure_args(step, out, args.quick, args.history_baseline), args.dry_run)
    log(f"all done in {time.monotonic() - started:.0f} s; pages in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Measures a best-fit cache shared by threads against its peers and writes
docs/threads.md: every figure of issue 20's targets, with the commands that
made it, the date, the commit and the machine's load.

Usage: python3 scripts/measure_threads.py [--runs N] [--out docs/threads.md]

Each replay configuration runs N times (default 3) side by side (every
allocator in its own child process, one after another); a cell is the
median of the runs' medians. The machine has 2 cores: compare ratios from
one run, not figures across days.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from stamp import Stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ["system", "mimalloc", "jemalloc"]
ROWS = PEERS + ["cache-bestfit", "cache-bestfit-nofront"]


def sh(*args, **kwargs):
    return subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True, **kwargs)


def replay(runs, *flags):
    """Runs the replay `runs` times; {trace: {allocator: [report rows]}}."""
    out = {}
    for _ in range(runs):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            sh("target/release/replay", "--allocators", ",".join(ROWS), "--json", tmp.name, *flags)
            report = json.load(open(tmp.name))
        for trace in report["traces"]:
            name = trace["trace"].replace(".trace", "")
            for row in trace["rows"]:
                out.setdefault(name, {}).setdefault(row["allocator"], []).append(row)
    return out


def median(rows, key):
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None


def throughput(threads, ms):
    """Passes a millisecond: each of `threads` threads runs a pass in `ms`."""
    return threads / ms


def bench_hit_path():
    """`hit_path` medians (ns) of best fit and the peers, by size."""
    result = sh(
        "cargo", "bench", "--bench", "hit_path", "--",
        "hit_path/(bestfit|mimalloc|system)/", "--warm-up-time", "1", "--measurement-time", "2",
    )
    times = {}
    for line in result.stdout.splitlines():
        match = re.match(r"hit_path/(\w+)/(\w+)\s+time:\s+\[\S+ \S+ (\S+) (\w+)", line)
        if match:
            name, size, value, unit = match.groups()
            scale = {"ps": 0.001, "ns": 1, "µs": 1000, "us": 1000, "ms": 1e6}[unit]
            times.setdefault(size, {})[name] = float(value) * scale
    return times


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "threads.md"))
    parser.add_argument("--skip-bench", action="store_true", help="leave out hit_path")
    args = parser.parse_args()

    sh("cargo", "build", "--release", "-p", "replay")
    command = f"python3 scripts/measure_threads.py --runs {args.runs}"
    stamp = Stamp.now(command + (" --skip-bench" if args.skip_bench else ""))

    runs = args.runs
    page = {t: replay(runs, "--threads", str(t)) for t in (1, 2, 8)}
    none = {t: replay(runs, "--threads", str(t), "--touch", "none") for t in (1, 2)}
    gap = replay(runs, "--gap-ms", "20")
    turns = {t: replay(1, "--threads", str(t), "--turns") for t in (2, 16)}
    hit = None if args.skip_bench else bench_hit_path()
    stamp.finish()

    lines = []
    w = lines.append
    w("# One best-fit cache shared by threads (issue 20): measured")
    w("")
    w(f"{stamp.text()} "
      f"Every replay cell is the median over {runs} runs of each run's median steady pass; "
      "`cache-bestfit` is `builder().size_policy(SizePolicy::BestFit).build()` (per-CPU fronts), "
      "`cache-bestfit-nofront` the same with `front_cache_bytes(0)`.")
    w("")

    def cell(data, trace, row, key="median_ms"):
        return median(data.get(trace, {}).get(row, []), key)

    traces = sorted(page[1])
    w("## Speed, pages touched, gap 0 (ms a steady pass; throughput = threads / ms)")
    w("")
    w("`target/release/replay --allocators " + ",".join(ROWS) + " --threads T`")
    w("")
    w("| trace | threads | " + " | ".join(ROWS) + " | best fit ÷ best peer (throughput) | best fit T ÷ 1 thread |")
    w("|---|---|" + "---|" * len(ROWS) + "---|---|")
    for trace in traces:
        one = cell(page[1], trace, "cache-bestfit")
        for t in (1, 2, 8):
            ms = {row: cell(page[t], trace, row) for row in ROWS}
            best_peer = min(ms[p] for p in PEERS if ms[p] is not None)
            ratio = best_peer / ms["cache-bestfit"]
            scale = throughput(t, ms["cache-bestfit"]) / throughput(1, one)
            w(f"| {trace} | {t} | " + " | ".join(fmt(ms[r]) for r in ROWS)
              + f" | {ratio:.2f}x | {scale:.2f}x |")
    w("")
    w("Targets: two threads at least the best peer's throughput (ratio ≥ 1.00x) and at least 1.6x "
      "one thread's; eight threads at least 0.9x of two threads' throughput.")
    w("")
    w("| trace | 8 threads ÷ 2 threads (best fit throughput) |")
    w("|---|---|")
    for trace in traces:
        two = throughput(2, cell(page[2], trace, "cache-bestfit"))
        eight = throughput(8, cell(page[8], trace, "cache-bestfit"))
        w(f"| {trace} | {eight / two:.2f}x |")
    w("")

    w("## The allocator's own cost (`--touch none`, ms a steady pass)")
    w("")
    w("| trace | threads | " + " | ".join(ROWS) + " | best fit ÷ best peer (throughput) |")
    w("|---|---|" + "---|" * len(ROWS) + "---|")
    for trace in traces:
        for t in (1, 2):
            ms = {row: cell(none[t], trace, row) for row in ROWS}
            best_peer = min(ms[p] for p in PEERS if ms[p] is not None)
            w(f"| {trace} | {t} | " + " | ".join(fmt(ms[r], 4) for r in ROWS)
              + f" | {best_peer / ms['cache-bestfit']:.2f}x |")
    w("")

    w("## After idle gaps (`--gap-ms 20`, one thread, ms a steady pass)")
    w("")
    w("| trace | " + " | ".join(ROWS) + " | best fit ÷ best peer |")
    w("|---|" + "---|" * len(ROWS) + "---|")
    for trace in traces:
        ms = {row: cell(gap, trace, row) for row in ROWS}
        best_peer = min(ms[p] for p in PEERS if ms[p] is not None)
        w(f"| {trace} | " + " | ".join(fmt(ms[r]) for r in ROWS)
          + f" | {best_peer / ms['cache-bestfit']:.2f}x |")
    w("")

    w("## Memory held")
    w("")
    w("Peak `bytes_reserved` over the trace's peak live bytes (times threads); target at most 1.5x "
      "with 1 and 2 threads. Page faults a steady pass (target: none on gpt_decode_small).")
    w("")
    w("| trace | threads | best fit held | no fronts held | best fit faults a pass | mimalloc faults |")
    w("|---|---|---|---|---|---|")
    for trace in traces:
        for t in (1, 2):
            w(f"| {trace} | {t} | {fmt(cell(page[t], trace, 'cache-bestfit', 'peak_held_x_live'), 2)}x "
              f"| {fmt(cell(page[t], trace, 'cache-bestfit-nofront', 'peak_held_x_live'), 2)}x "
              f"| {fmt(cell(page[t], trace, 'cache-bestfit', 'faults_per_steady_pass'), 2)} "
              f"| {fmt(cell(page[t], trace, 'mimalloc', 'faults_per_steady_pass'), 2)} |")
    w("")
    w("Threads that take turns and then park (`--turns`: each thread replays the whole trace "
      "holding the turn, frees what it holds, and parks; bytes the cache holds once all are "
      "parked, and resident memory for the peers). Target: sixteen at most 1.25x of two.")
    w("")
    w("| trace | allocator | 2 threads | 16 threads | 16 ÷ 2 |")
    w("|---|---|---|---|---|")
    for trace in traces:
        for row in ROWS:
            def held(t):
                rows = turns[t].get(trace, {}).get(row, [])
                if not rows:
                    return None
                final = rows[0].get("cache_final")
                return final["bytes_reserved"] if final else rows[0]["peak_rss_bytes"]
            two, sixteen = held(2), held(16)
            if two and sixteen:
                kind = "reserved" if row.startswith("cache") else "peak resident"
                w(f"| {trace} | {row} ({kind}) | {two / 2**20:.2f} MiB | {sixteen / 2**20:.2f} MiB "
                  f"| {sixteen / two:.2f}x |")
    w("")

    if hit:
        w("## A hit and a free (`cargo bench --bench hit_path`, ns a pair, criterion's median)")
        w("")
        w("Target: best fit at most 10 ns for 64 B to 1 MiB.")
        w("")
        names = ["bestfit", "mimalloc", "system"]
        w("| size | " + " | ".join(names) + " |")
        w("|---|" + "---|" * len(names))
        for size in ["64B", "4KiB", "64KiB", "1MiB", "16MiB"]:
            if size in hit:
                w(f"| {size} | " + " | ".join(fmt(hit[size].get(n), 1) for n in names) + " |")
        w("")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

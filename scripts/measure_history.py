#!/usr/bin/env python3
"""Measures what seeing the memory costs and writes docs/history.md: a
snapshot of a cache of 100,000 blocks, the time a recorded event adds to an
allocation and a free, and the hit path with recording off against a
commit without the history (the "costs nothing when off" claim).

Usage: python3 scripts/measure_history.py [--runs N] [--baseline REF] [--out docs/history.md]

Every bench runs N times (default 3), this tree and the baseline
alternating, so both see the same load; a cell is the median of the runs'
criterion medians. `--baseline` (a git ref, default: none) is built in a
temporary worktree with its own target directory. The machine has 2 cores:
compare ratios from one run, not figures across days.
"""

import argparse
import os
import re
import statistics
import subprocess
import tempfile

from stamp import Stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIT = "hit_path/(cache|bestfit|bestfit_front)/(64B|64KiB)$"
UNITS = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}


def sh(*args, cwd=ROOT, env=None):
    return subprocess.run(
        args, cwd=cwd, check=True, capture_output=True, text=True, env=env
    ).stdout


def bench(tree, target, name, filt):
    """{benchmark: median ns} of one `cargo bench` run."""
    env = dict(os.environ, CARGO_TARGET_DIR=target)
    out = sh("cargo", "bench", "-q", "--bench", name, "--", filt, cwd=tree, env=env)
    medians, pending = {}, None
    for line in out.splitlines():
        match = re.match(r"^(\S+)?\s+time:\s+\[\S+ \S+ (\S+) (\S+) ", line)
        if match:
            medians[match.group(1) or pending] = float(match.group(2)) * UNITS[match.group(3)]
        elif line.strip() and not line.startswith(" "):
            pending = line.strip()
    return medians


def median_of(runs):
    keys = runs[0].keys()
    return {key: statistics.median(run[key] for run in runs if key in run) for key in keys}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", help="a git ref without the history, for the hit path")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "history.md"))
    args = parser.parse_args()

    stamp = Stamp.now(
        f"python3 scripts/measure_history.py --runs {args.runs}"
        + (f" --baseline {args.baseline}" if args.baseline else "")
    )
    target = os.path.join(ROOT, "target")
    baseline_dir = None
    if args.baseline:
        baseline_dir = tempfile.mkdtemp(prefix="caching-allocator-baseline-")
        sh("git", "worktree", "add", "--detach", baseline_dir, args.baseline)
        base_commit = sh("git", "rev-parse", "--short", args.baseline).strip()
    try:
        snapshot_runs, hit_runs, base_runs = [], [], []
        for _ in range(args.runs):
            snapshot_runs.append(bench(ROOT, target, "snapshot", "."))
            hit_runs.append(bench(ROOT, target, "hit_path", HIT))
            if baseline_dir:
                base_runs.append(
                    bench(baseline_dir, os.path.join(target, "baseline"), "hit_path", HIT)
                )
    finally:
        if baseline_dir:
            sh("git", "worktree", "remove", "--force", baseline_dir)
    stamp.finish()
    snap, hit = median_of(snapshot_runs), median_of(hit_runs)
    base = median_of(base_runs) if base_runs else None

    lines = []
    w = lines.append
    w("# What seeing the memory costs")
    w("")
    w(f"{stamp.text()} Medians of {args.runs} runs of criterion's medians.")
    w("")
    w("| what | time |")
    w("|---|---|")
    w(
        f"| `snapshot()` of a best-fit cache holding 100,000 blocks in use and 50,000 free"
        f" pieces (`snapshot/best_fit_100k`) | {snap['snapshot/best_fit_100k'] / 1e6:.2f} ms |"
    )
    off, on = snap["history/off"], snap["history/on"]
    w(f"| a 64-byte allocation and free, history off (`history/off`) | {off:.1f} ns |")
    w(f"| the same, recording (`history/on`) | {on:.1f} ns |")
    w(f"| added per recorded event (two a pair) | {(on - off) / 2:.1f} ns |")
    w("")
    if base:
        w(
            f"The hit path with recording off (`cargo bench --bench hit_path`), this commit"
            f" against {args.baseline} ({base_commit}), ns a pair:"
        )
        w("")
        w("| bench | baseline | this | ratio |")
        w("|---|---|---|---|")
        for key in sorted(hit):
            if key in base:
                w(f"| {key} | {base[key]:.1f} | {hit[key]:.1f} | {hit[key] / base[key]:.3f} |")
        w("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

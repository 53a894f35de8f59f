"""Writes docs/ci.md from a log of `bash .ci/run`: each step's start and
length, the fuzz targets', the Miri processes' and the whole run's, with the
run's commit, machine and load (which `.ci/run` prints), so CI's times on
this page are read from a run, never retyped.

    bash .ci/run > ci.log 2>&1; python3 scripts/ci_times.py ci.log

`--out FILE` writes elsewhere (`-` for standard output). Exits 1, saying why,
if the log has no step lines or did not pass.
"""

import argparse
import datetime
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = re.compile(r"^=== (?P<name>.*) \((?P<at>\d+)s since start(?:, (?P<cpu>\d+)s of CPU)?\)$")
FUZZ = re.compile(r"^=== fuzz (?P<target>\S+): (?P<result>\S+) in (?P<secs>\d+)s$")
MIRI = re.compile(r"^Miri \((?P<part>\S+) \.\.\.\) took (?P<secs>\d+) s$")


def parse(text):
    """The facts of a CI log: steps `(name, start, cpu)`, fuzz targets
    `(target, result, seconds)`, Miri parts `(part, seconds)`, the commit,
    the machine, the load before and after, and whether it passed."""
    facts = {"steps": [], "fuzz": [], "miri": [], "commit": "?", "cpus": "?",
             "load_before": "?", "load_after": "?", "passed": False}
    for line in text.splitlines():
        line = line.rstrip()
        if m := FUZZ.match(line):
            facts["fuzz"].append((m["target"], m["result"], int(m["secs"])))
        elif m := STEP.match(line):
            cpu = int(m["cpu"]) if m["cpu"] else None
            facts["steps"].append((m["name"], int(m["at"]), cpu))
            if m["name"] == "all checks passed":
                facts["passed"] = True
        elif m := MIRI.match(line):
            facts["miri"].append((m["part"], int(m["secs"])))
        elif line.startswith("commit "):
            facts["commit"] = line.split()[1][:10]
        elif line.startswith("cpus "):
            facts["cpus"] = line[len("cpus "):]
        elif line.startswith("load before "):
            facts["load_before"] = line.split()[-1]
        elif line.startswith("load after "):
            facts["load_after"] = line.split()[-1]
    return facts


def durations(steps):
    """Each step's `(name, start, seconds)`: until the next step starts
    (the last, "all checks passed", has none)."""
    rows = []
    for (name, start, _), (_, end, _) in zip(steps, steps[1:]):
        rows.append((name, start, end - start))
    return rows


def page(facts, log_name, now):
    lines = [
        "# CI's steps: how long each took",
        "",
        f"Written by `python3 scripts/ci_times.py {log_name}` on {now:%Y-%m-%d %H:%M} UTC from a "
        f"log of `bash .ci/run` at commit `{facts['commit']}`, {facts['cpus']}, load average "
        f"{facts['load_before']} before and {facts['load_after']} after. What each step checks, "
        "and each one's command alone: [checks.md](checks.md).",
        "",
        "Miri runs in the background from the start (two processes, see `.ci/run`), beside the "
        "steps below; the run ends when the last of them does. A step's time is wall time on a "
        "2-core machine with Miri beside it, not the step alone.",
        "",
        "| step | started (s) | took (s) |",
        "|---|---:|---:|",
    ]
    rows = durations(facts["steps"])
    for name, start, secs in rows:
        lines.append(f"| {name} | {start} | {secs} |")
    total = facts["steps"][-1][1] if facts["steps"] else 0
    lines.append(f"| **whole run** | | **{total}** ({total / 60:.1f} min) |")
    if facts["fuzz"]:
        lines += ["", "Fuzz targets (with their builds):", "",
                  "| target | result | took (s) |", "|---|---|---:|"]
        lines += [f"| `{t}` | {r} | {s} |" for t, r, s in facts["fuzz"]]
    if facts["miri"]:
        lines += ["", "Miri's processes (from the start of the run):", "",
                  "| process | took (s) |", "|---|---:|"]
        lines += [f"| `{p}` | {s} |" for p, s in facts["miri"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="the output of bash .ci/run")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "ci.md"))
    args = parser.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as f:
        facts = parse(f.read())
    if not facts["steps"]:
        sys.exit(f"{args.log}: no step lines (=== NAME (Ns since start)): not a .ci/run log")
    if not facts["passed"]:
        sys.exit(f"{args.log}: the run did not pass (no 'all checks passed' step): "
                 "its times are not CI's")
    text = page(facts, os.path.basename(args.log),
                datetime.datetime.now(datetime.timezone.utc))
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

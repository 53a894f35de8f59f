#!/usr/bin/env python3
"""Tests of report.py's and stamp.py's parsing and formatting on samples (no
build, no bench, no replay run).

Run: python3 scripts/test_report.py
"""

import contextlib
import datetime
import io
import json
import os
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402
from stamp import Stamp, cpu_model  # noqa: E402

# The shape of criterion 0.8's estimates.json (from target/criterion/hit_path/cache/64B/new/).
ESTIMATES = {
    "mean": {"confidence_interval": {"confidence_level": 0.95, "lower_bound": 56.9, "upper_bound": 87.9},
             "point_estimate": 71.08, "standard_error": 7.93},
    "median": {"confidence_interval": {"confidence_level": 0.95, "lower_bound": 52.6, "upper_bound": 81.0},
               "point_estimate": 70.35, "standard_error": 6.88},
    "median_abs_dev": {"confidence_interval": {"confidence_level": 0.95, "lower_bound": 3.2, "upper_bound": 40.9},
                       "point_estimate": 17.5, "standard_error": 9.9},
    "slope": {"confidence_interval": {"confidence_level": 0.95, "lower_bound": 65.4, "upper_bound": 98.6},
              "point_estimate": 80.35, "standard_error": 8.48},
    "std_dev": {"confidence_interval": {"confidence_level": 0.95, "lower_bound": 10.9, "upper_bound": 36.9},
                "point_estimate": 26.48, "standard_error": 7.4},
}

HELP = """\
Usage: replay [OPTIONS] [TRACES]...

Options:
      --traces-dir <DIR>
          Folder of traces replayed when no file is given

      --allocators <LIST>
          Allocators to compare, comma-separated

          Possible values:
          - system:                glibc malloc, through `std::alloc::System`
          - cache-bestfit:         Best fit, `SizePolicy::BestFit`: blocks carved
            from one reserved range
          - planned:               `plan::Recorder` for pass 0

          [default: system,mimalloc,jemalloc,cache,cache-p2d4,cache-p2d4-cap]

      --passes <N>
          Passes to replay in total
          - not-a-row: a dash under another flag
"""

OUTPUT = """\
resnet18.trace: 10 passes in file, 10 replayed (1 cold + 9 steady); 148 allocations/pass
allocator        cold_ms  median_ms
system            16.753      0.141
cache             24.850      0.486
cache stats at the end (resnet18.trace):
  hits 546 / misses 46 (92.2% hit, 89.9% of bytes), frees 591
  reserved 33.07 MiB (peak 33.07 MiB)
planned stats at the end (resnet18.trace):
  hits 1 / misses 2

3 traces x 2 allocators in 0.3 s
"""


def write_bench(root, group, function, value, median, mtime):
    """A criterion `new/` folder for one benchmark, written at `mtime`."""
    folder = os.path.join(root, *[p for p in (group, function, value) if p], "new")
    os.makedirs(folder)
    bench = {"group_id": group, "function_id": function, "value_str": value}
    estimates = json.loads(json.dumps(ESTIMATES))
    estimates["median"]["point_estimate"] = median
    for name, content in (("benchmark.json", bench), ("estimates.json", estimates)):
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            json.dump(content, f)
        os.utime(path, (mtime, mtime))


class Criterion(unittest.TestCase):
    def test_median_is_the_median_not_the_slope(self):
        self.assertEqual(report.median_ns(ESTIMATES), 70.35)

    def test_results_in_run_order_and_only_this_run(self):
        with tempfile.TemporaryDirectory() as root:
            now = time.time()
            write_bench(root, "hit_path", "old", "64B", 1.0, now - 100)  # an earlier run
            write_bench(root, "hit_path", "cache", "64B", 27.5, now + 1)
            write_bench(root, "hit_path", "mimalloc", "64B", 9.1, now + 2)
            write_bench(root, "hit_path", "cache", "4KiB", 28.0, now + 3)
            write_bench(root, "front_protocol", "flag", None, 0.55, now + 4)
            results = report.criterion_results(root, now)
        self.assertEqual(results, [
            ("hit_path", "cache", "64B", 27.5),
            ("hit_path", "mimalloc", "64B", 9.1),
            ("hit_path", "cache", "4KiB", 28.0),
            ("front_protocol", "flag", None, 0.55),
        ])

    def test_tables_pivot_and_ratios(self):
        results = [
            ("hit_path_threads", "cache_1_thread", "64B", 30.0),
            ("hit_path_threads", "cache_2_threads_shared", "64B", 60.0),
            ("hit_path_threads", "cache_2_threads_own", "64B", 15.0),
            ("hit_path_threads", "cache_1_thread", "64KiB", 32.0),
            ("global_no_scope", "system", "16", 7.0),
            ("global_no_scope", "scoped_global", "16", 7.35),
            ("tensor_pass", "no_scope", None, 196_300.0),
        ]
        text = "\n".join(report.bench_tables(results))
        self.assertIn("| input | `cache_1_thread` | `cache_2_threads_shared` | `cache_2_threads_own` "
                      "| 2 threads shared ÷ 1 (throughput) | 2 threads own ÷ 1 (throughput) |", text)
        self.assertIn("| 64B | 30.0 ns | 60.0 ns | 15.0 ns | 0.50x | 2.00x |", text)
        self.assertIn("| 64KiB | 32.0 ns | - | - | - | - |", text)
        self.assertIn("| 16 | 7.00 ns | 7.35 ns | +5.0% |", text)
        self.assertIn("| `tensor_pass/no_scope` | 196.3 µs |", text)
        self.assertNotIn("fronts:", text)  # its functions did not run

    def test_units(self):
        self.assertEqual(
            [report.fmt_ns(x) for x in (0.5, 27.46, 1234.0, 2_230_000.0)],
            ["0.50 ns", "27.5 ns", "1.2 µs", "2.23 ms"],
        )


class Replay(unittest.TestCase):
    def test_rows_from_help(self):
        self.assertEqual(report.allocator_rows(HELP), [
            ("system", "glibc malloc, through `std::alloc::System`"),
            ("cache-bestfit", "Best fit, `SizePolicy::BestFit`: blocks carved from one reserved range"),
            ("planned", "`plan::Recorder` for pass 0"),
        ])

    def test_stats_blocks_split_off_unchanged(self):
        tables, stats = report.split_replay_output(OUTPUT)
        self.assertEqual(tables.splitlines(), [
            "resnet18.trace: 10 passes in file, 10 replayed (1 cold + 9 steady); 148 allocations/pass",
            "allocator        cold_ms  median_ms",
            "system            16.753      0.141",
            "cache             24.850      0.486",
            "",
            "3 traces x 2 allocators in 0.3 s",
        ])
        self.assertEqual(stats.splitlines(), OUTPUT.splitlines()[4:9])

    def test_page_has_stamp_rows_and_tables(self):
        stamp = Stamp("python3 scripts/report.py --only replay",
                      datetime.datetime(2026, 12, 6, 5, 30, tzinfo=datetime.timezone.utc),
                      "abc1234", False, 2, "Some CPU", "1.50", "2.00")
        page = report.replay_page(stamp, [("system", "glibc | malloc")],
                                  [("cargo run --release -- --allocators system", "one thread", OUTPUT)])
        self.assertIn(stamp.text(), page)
        self.assertIn("| `system` | glibc \\| malloc |", page)
        self.assertIn("system            16.753      0.141\n", page)
        self.assertIn("<details>", page)


class StampText(unittest.TestCase):
    def test_text(self):
        stamp = Stamp("python3 scripts/measure_burst.py --release-after-ms 300",
                      datetime.datetime(2026, 12, 6, 5, 30, 59, tzinfo=datetime.timezone.utc),
                      "abc1234", True, 2, "Intel(R) Xeon(R) Processor", "1.23", "0.90")
        self.assertEqual(
            stamp.text(),
            "Written by `python3 scripts/measure_burst.py --release-after-ms 300` on 2026-12-06 05:30 UTC, "
            "commit `abc1234` (uncommitted changes), 2 CPUs (Intel(R) Xeon(R) Processor), "
            "load average 1.23 before and 0.90 after.",
        )

    def test_cpu_model(self):
        cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        self.assertEqual(cpu_model(cpuinfo), "Intel(R) Xeon(R) Processor")
        self.assertEqual(cpu_model("processor\t: 0\n"), "?")  # e.g. some arm64 kernels


class Commands(unittest.TestCase):
    def test_quick_never_writes_docs_unless_told(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            report.main(["--dry-run", "--quick", "--only", "threads,burst,history"])
        commands = out.getvalue().splitlines()
        self.assertEqual(len(commands), 3)
        self.assertFalse([c for c in commands if "docs" in c], commands)

    def test_measure_commands(self):
        self.assertEqual(
            report.measure_args("threads", os.path.join(report.ROOT, "docs"), True, "08153fa"),
            ["python3", "scripts/measure_threads.py", "--runs", "1", "--skip-bench", "--out", "docs/threads.md"],
        )
        self.assertEqual(
            report.measure_args("history", "/tmp/x", False, "08153fa"),
            ["python3", "scripts/measure_history.py", "--runs", "3", "--baseline", "08153fa",
             "--out", "/tmp/x/history.md"],
        )


if __name__ == "__main__":
    unittest.main()

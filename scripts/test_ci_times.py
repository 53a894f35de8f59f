"""Unit tests of scripts/ci_times.py: `python3 scripts/test_ci_times.py`."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ci_times  # noqa: E402

LOG = """
=== toolchains (0s since start, 0s of CPU)
commit 0123456789abcdef
cpus 2 Some CPU
load before 0.50
=== clippy (1s since start, 0s of CPU)
=== fuzz cache_ops (45s)
=== fuzz cache_ops: ok in 103s
=== tests (the README command) (160s since start, 150s of CPU)
Miri (miri_arena ...) took 1129 s
load after 0.10
=== all checks passed (300s since start, 400s of CPU)
"""


class CiTimes(unittest.TestCase):
    def test_steps_last_until_the_next_starts(self):
        facts = ci_times.parse(LOG)
        self.assertEqual(ci_times.durations(facts["steps"]),
                         [("toolchains", 0, 1), ("clippy", 1, 159),
                          ("tests (the README command)", 160, 140)])

    def test_the_run_facts_are_read(self):
        facts = ci_times.parse(LOG)
        self.assertTrue(facts["passed"])
        self.assertEqual(facts["commit"], "0123456789")
        self.assertEqual((facts["load_before"], facts["load_after"]), ("0.50", "0.10"))
        self.assertEqual(facts["fuzz"], [("cache_ops", "ok", 103)])
        self.assertEqual(facts["miri"], [("miri_arena", 1129)])

    def test_a_failed_run_is_refused(self):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ci_times_failed.log")
        with open(path, "w") as f:
            f.write(LOG.replace("=== all checks passed", "=== Miri's result"))
        with self.assertRaises(SystemExit) as raised:
            ci_times.main([path, "--out", "-"])
        self.assertIn("did not pass", str(raised.exception.code))
        os.remove(path)


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/env python3
"""Tests of record_trace's conversion on fake profiler events (no torch needed).

Run: python3 scripts/test_record_trace.py
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import record_trace  # noqa: E402


class EventsToTrace(unittest.TestCase):
    def test_ids_passes_and_frees(self):
        events = [
            (1.0, 0x1000, 4096),  # set-up
            (10.0, 0x2000, 64),
            (11.0, 0x2000, -64),
            (12.0, 0x2000, 128),  # same address again: a new id
            (20.0, 0x3000, 256),  # between pass 0's end and pass 1's start: pass 0
            (30.0, 0x2000, -128),
            (31.0, 0x1000, -4096),
            (32.0, 0x4000, 0),  # ignored
        ]
        text, summary = record_trace.events_to_trace(events, [(10.0, 15.0), (25.0, 35.0)], ["model: fake"])
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        self.assertEqual(text.splitlines()[0], record_trace.HEADER)
        self.assertIn("# model: fake", text)
        self.assertEqual(lines, ["a 1 4096", "p 0", "a 2 64", "f 2", "a 3 128", "a 4 256", "p 1", "f 3", "f 1"])
        self.assertEqual(summary["live_at_end"], 1)
        self.assertEqual(summary["live_bytes_at_end"], 256)
        self.assertEqual(summary["events"], 7)

    def test_unsorted_input_and_dropped_frees(self):
        events = [
            (5.0, 0xA, 32),
            (1.0, 0xB, -16),  # freed before we saw it allocated: dropped
            (5.0, 0xA, -32),  # same timestamp as its allocation: order kept
        ]
        text, summary = record_trace.events_to_trace(events, [(0.0, 10.0)])
        self.assertEqual(summary["dropped_frees"], 1)
        self.assertTrue(text.endswith("p 0\na 1 32\nf 1\n"), text)

    def test_missing_free_is_added(self):
        events = [(1.0, 0xA, 32), (2.0, 0xA, 48)]
        text, summary = record_trace.events_to_trace(events, [(0.0, 10.0)])
        self.assertEqual(summary["missing_frees"], 1)
        self.assertTrue(text.endswith("a 1 32\nf 1\na 2 48\n"), text)

    def test_empty_passes_still_get_lines(self):
        text, _ = record_trace.events_to_trace([(1.0, 0xA, 8)], [(0.0, 2.0), (3.0, 4.0), (5.0, 6.0)])
        self.assertTrue(text.endswith("p 0\na 1 8\np 1\np 2\n"), text)

    def test_chrome_trace_events(self):
        chrome = {
            "traceEvents": [
                {"ph": "X", "cat": "user_annotation", "name": "pass 1", "ts": 20, "dur": 5},
                {"ph": "X", "cat": "user_annotation", "name": "pass 0", "ts": 10, "dur": 5},
                {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 11, "dur": 1},
                {"ph": "i", "name": "[memory]", "ts": 11, "args": {"Addr": 1234, "Bytes": 100, "Device Type": 0}},
                {"ph": "i", "name": "[memory]", "ts": 12, "args": {"Addr": 99, "Bytes": 100, "Device Type": 1}},
                {"ph": "i", "name": "[memory]", "ts": 21, "args": {"Addr": 1234, "Bytes": -100, "Device Type": 0}},
            ]
        }
        mem_events, passes = record_trace.chrome_trace_events(chrome)
        self.assertEqual(passes, [(10.0, 15.0), (20.0, 25.0)])
        self.assertEqual(mem_events, [(11.0, 1234, 100), (21.0, 1234, -100)])
        text, _ = record_trace.events_to_trace(mem_events, passes)
        self.assertTrue(text.endswith("p 0\na 1 100\np 1\nf 1\n"), text)


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/env python3
"""Checks the crate's memory page in a real browser: the replay writes the
page of a bundled trace (`cargo run --release -- --html`), headless Chromium
(Debian's package) renders it, and this reads back what it rendered: the
page's own text from the DOM (the held-over-live ratio and the legend), and
a screenshot whose pixels must show the segments' colours.

Usage: python3 scripts/check_page.py [--chromium /usr/bin/chromium] [--keep DIR]
(`--keep docs` writes the README's picture, docs/page-resnet18.png.)
Exit status 0 when the page rendered as it should.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_pixels(path):
    """The RGB(A) rows of an 8-bit PNG (no dependency: zlib and the filters)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
            depth, color = body[8], body[9]
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        filt = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            upleft = previous[x - channels] if x >= channels else 0
            if filt == 1:
                line[x] = (line[x] + left) & 0xFF
            elif filt == 2:
                line[x] = (line[x] + up) & 0xFF
            elif filt == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif filt == 4:
                p = left + up - upleft
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else upleft)
                line[x] = (line[x] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--keep", help="keep the page and the screenshot in DIR")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp()
    os.makedirs(work, exist_ok=True)
    page = os.path.join(work, "page-resnet18.html")
    subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "replay", "--", "--html", page,
         os.path.join(ROOT, "traces", "resnet18.trace")],
        cwd=ROOT, check=True,
    )
    flags = [
        args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={os.path.join(work, 'profile')}",
    ]
    dom = subprocess.run(flags + ["--dump-dom", "file://" + page], capture_output=True, text=True, timeout=120)
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    shot = os.path.join(work, "page-resnet18.png")
    subprocess.run(
        flags + [f"--screenshot={shot}", "--window-size=1100,900", "file://" + page],
        capture_output=True, timeout=120,
    )
    failures = []
    ratio = re.search(r"for [0-9.]+ MiB in use:\s*([0-9.]+)x", text)
    if not ratio:
        failures.append("the rendered page has no held-over-live ratio")
    for word in ("Memory over time", "Segments", "in use", "free"):
        if word not in text:
            failures.append(f"the rendered page lacks {word!r}")
    if not os.path.exists(shot):
        failures.append("no screenshot")
    else:
        width, height, channels, rows = png_pixels(shot)
        colours = {}
        for row in rows[::4]:
            for x in range(0, width * channels, channels * 4):
                colours[row[x:x + 3]] = colours.get(row[x:x + 3], 0) + 1
        # The in-use red and the free green of the segments' bars.
        for name, rgb in (("in use", b"\xd6\x27\x28"), ("free", b"\x2c\xa0\x2c")):
            if colours.get(rgb, 0) == 0:
                failures.append(f"the screenshot shows no {name} block")
    print(f"page {page}; screenshot {shot}; ratio {ratio.group(1) if ratio else '-'}x")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

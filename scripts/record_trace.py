#!/usr/bin/env python3
"""Record the CPU allocation trace of a PyTorch model, in the format `replay` reads.

torch.profiler with profile_memory=True logs one `[memory]` event per c10 CPU
allocation and free, with the block's address ("Addr") and byte count ("Bytes",
negative for a free). This script runs a model under the profiler with one
record_function("pass N") range per forward pass, exports the profile as a
Chrome trace, and turns the memory events into block ids: a new id for every
allocation at an address, and a free names the id currently at that address.

Use it on your own model:

    import torch
    from record_trace import record

    model = MyModel().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        record(lambda i: model(x), passes=10, out="my_model.trace",
               comments=["model: MyModel, input 1x3x224x224 float32"])

or from the shell, for a torchvision model (needs torchvision):

    python scripts/record_trace.py --torchvision resnet18 --passes 10 --out resnet18.trace

or convert a Chrome trace you exported yourself (prof.export_chrome_trace(...)),
whose user annotations are named "pass 0", "pass 1", ...:

    python scripts/record_trace.py --chrome-trace profile.json --out my.trace

Then: cargo run --release -- my.trace

Checked with torch 2.15.0 / torchvision 0.29.2 (2026-12-02): a resnet18
recording has, pass for pass, the allocations and frees of traces/resnet18.trace
(see traces/README.md); the conversion itself, events_to_trace, is also tested
with fake events by scripts/test_record_trace.py. Record with one thread (the
default here): oneDNN sizes some buffers by thread count. Frees of blocks
allocated before the profiled region have no matching allocation and are
dropped (counted in the header).
"""

import argparse
import json
import os
import sys
import tempfile

HEADER = "# caching-allocator trace v1"
CPU_DEVICE_TYPE = 0


def events_to_trace(mem_events, passes, comments=()):
    """Turn memory events into trace text.

    mem_events: iterable of (timestamp, address, nbytes) in recording order;
        nbytes > 0 is an allocation, nbytes < 0 a free of -nbytes, 0 is ignored.
    passes: list of (start, end) timestamps, one per pass, in order. Events
        before the first pass's start are set-up; an event belongs to the last
        pass that started at or before it (events between two passes go to
        the earlier one).
    comments: extra `#` lines for the header (without the `# `).

    Returns (text, summary) where summary is a dict of counts.
    """
    # A stable sort keeps recording order among equal timestamps.
    events = sorted(enumerate(mem_events), key=lambda item: (item[1][0], item[0]))
    starts = [start for start, _ in passes]
    live = {}  # address -> (id, size)
    next_id = 1
    body = []
    pass_index = -1
    allocations = frees = dropped = missing_frees = size_mismatches = 0

    def enter_passes_up_to(ts):
        nonlocal pass_index
        while pass_index + 1 < len(starts) and starts[pass_index + 1] <= ts:
            pass_index += 1
            body.append("p %d" % pass_index)

    for _, (ts, addr, nbytes) in events:
        enter_passes_up_to(ts)
        nbytes = int(nbytes)
        if nbytes > 0:
            if addr in live:
                # The free of the block that was here was not recorded.
                old_id, _ = live.pop(addr)
                body.append("f %d" % old_id)
                missing_frees += 1
                frees += 1
            block_id = next_id
            next_id += 1
            live[addr] = (block_id, nbytes)
            body.append("a %d %d" % (block_id, nbytes))
            allocations += 1
        elif nbytes < 0:
            if addr not in live:
                dropped += 1  # allocated before the profiled region
                continue
            block_id, size = live.pop(addr)
            if size != -nbytes:
                size_mismatches += 1
            body.append("f %d" % block_id)
            frees += 1
    # Passes with no event at all still get their line.
    while pass_index + 1 < len(starts):
        pass_index += 1
        body.append("p %d" % pass_index)

    live_bytes = sum(size for _, size in live.values())
    summary = {
        "passes": len(starts),
        "events": allocations + frees,
        "allocations": allocations,
        "frees": frees,
        "live_at_end": len(live),
        "live_bytes_at_end": live_bytes,
        "dropped_frees": dropped,
        "missing_frees": missing_frees,
        "size_mismatches": size_mismatches,
    }
    header = [HEADER]
    header += ["# " + line for line in comments]
    header += [
        "# recorded with torch.profiler.profile(activities=[CPU], profile_memory=True), "
        "one record_function range per pass (scripts/record_trace.py)",
        "# passes: %d" % len(starts),
        "# events: %d (%d allocations, %d frees); blocks live at the end: %d (%d bytes)"
        % (allocations + frees, allocations, frees, len(live), live_bytes),
        "# dropped: %d frees of blocks allocated before the profiled region" % dropped,
    ]
    if missing_frees:
        header.append("# %d frees were missing (an address was allocated again); added" % missing_frees)
    return "\n".join(header + body) + "\n", summary


def chrome_trace_events(trace):
    """(mem_events, passes) from a parsed Chrome trace (prof.export_chrome_trace)."""
    mem_events = []
    pass_ranges = {}
    for event in trace.get("traceEvents", []):
        name = event.get("name")
        args = event.get("args") or {}
        if name == "[memory]":
            if int(args.get("Device Type", CPU_DEVICE_TYPE)) != CPU_DEVICE_TYPE:
                continue
            mem_events.append((float(event["ts"]), int(args["Addr"]), int(args["Bytes"])))
        elif isinstance(name, str) and name.startswith("pass ") and event.get("ph") == "X":
            try:
                index = int(name.split()[1])
            except (IndexError, ValueError):
                continue
            start = float(event["ts"])
            # The outermost range of that name wins (the profiler may log the
            # annotation on CPU and as a user annotation).
            end = start + float(event.get("dur", 0))
            if index not in pass_ranges or start < pass_ranges[index][0]:
                pass_ranges[index] = (start, end)
    passes = [pass_ranges[index] for index in sorted(pass_ranges)]
    if sorted(pass_ranges) != list(range(len(passes))):
        raise ValueError("pass ranges are not named pass 0, pass 1, ...: %s" % sorted(pass_ranges))
    return mem_events, passes


def record(run_pass, passes, out, comments=()):
    """Run run_pass(i) for i in range(passes) under the profiler; write the trace to out."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i in range(passes):
            with record_function("pass %d" % i):
                run_pass(i)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "profile.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            chrome = json.load(f)
    mem_events, pass_ranges = chrome_trace_events(chrome)
    comments = list(comments) + [
        "torch %s, CPU, %d threads" % (torch.__version__, torch.get_num_threads())
    ]
    text, summary = events_to_trace(mem_events, pass_ranges, comments)
    with open(out, "w") as f:
        f.write(text)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--torchvision", metavar="MODEL", help="a torchvision model name, e.g. resnet18")
    source.add_argument("--chrome-trace", metavar="FILE", help="convert an exported Chrome trace")
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--shape", default="1,3,224,224", help="input shape (torchvision)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (torchvision; default 1, as the bundled traces: "
        "oneDNN sizes some scratch buffers by thread count)",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.chrome_trace:
        with open(args.chrome_trace) as f:
            mem_events, pass_ranges = chrome_trace_events(json.load(f))
        text, summary = events_to_trace(mem_events, pass_ranges, ["converted from " + args.chrome_trace])
        with open(args.out, "w") as f:
            f.write(text)
    else:
        import torch
        import torchvision

        torch.manual_seed(0)
        torch.set_num_threads(args.threads)
        model = getattr(torchvision.models, args.torchvision)(weights=None).eval()
        shape = [int(n) for n in args.shape.split(",")]
        x = torch.randn(*shape)
        with torch.inference_mode():
            summary = record(
                lambda i: model(x),
                args.passes,
                args.out,
                [
                    "model: %s (torchvision, random weights), input %s float32, %d thread(s)"
                    % (args.torchvision, "x".join(map(str, shape)), args.threads)
                ],
            )
    print("%s: %s" % (args.out, summary), file=sys.stderr)


if __name__ == "__main__":
    main()

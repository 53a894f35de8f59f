"""The stamp every generated page under docs/ carries: the command that wrote
it, when (UTC), the commit (and whether the tree had uncommitted changes),
the machine (cores, CPU model) and the load average before and after the run.

Used by scripts/report.py and the measure_*.py scripts:

    stamp = Stamp.now("python3 scripts/measure_burst.py")
    ...  # measure
    stamp.finish()
    lines.append(stamp.text())
"""

import dataclasses
import datetime
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    """The 1-minute load average, as /proc/loadavg prints it."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def cpu_model(cpuinfo=None):
    """The first `model name` in /proc/cpuinfo (or in the text given), or "?"."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return "?"
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return "?"


def git(*args):
    return subprocess.run(
        ("git",) + args, cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def commit():
    """(short hash of HEAD, whether tracked files outside docs/ have changes).

    docs/ is left out: it is where the pages are written, so a page an earlier
    step of the same report rewrote does not mark the code measured as changed.
    """
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs")
    return git("rev-parse", "--short", "HEAD"), bool(dirty)


@dataclasses.dataclass
class Stamp:
    command: str
    start: datetime.datetime
    commit: str
    dirty: bool
    cpus: int
    cpu: str
    load_before: str
    load_after: str = "?"

    @classmethod
    def now(cls, command):
        """Takes the stamp's first half (before the run)."""
        head, dirty = commit()
        return cls(
            command=command,
            start=datetime.datetime.now(datetime.timezone.utc),
            commit=head,
            dirty=dirty,
            cpus=os.cpu_count() or 0,
            cpu=cpu_model(),
            load_before=load(),
        )

    def finish(self):
        """Takes the load after the run."""
        self.load_after = load()
        return self

    def text(self):
        """One sentence for the top of a page."""
        return (
            f"Written by `{self.command}` on {self.start:%Y-%m-%d %H:%M} UTC, "
            f"commit `{self.commit}`{' (uncommitted changes)' if self.dirty else ''}, "
            f"{self.cpus} CPUs ({self.cpu}), load average {self.load_before} before and "
            f"{self.load_after} after."
        )

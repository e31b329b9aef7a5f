"""Running one benchmark job: wall time, the peak RSS of its whole process tree, and how many
cores other processes kept busy meanwhile (the machine is shared)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

from machine import OthersMeter


def _tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) over a process and all its descendants."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    stack.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


@dataclass
class Measured:
    seconds: float
    rss: int
    others: float  # cores other processes kept busy meanwhile
    output: str = ""


def run_measured(command: list[str], env: dict[str, str] | None = None) -> Measured:
    """Wall seconds, peak process-tree RSS (polled every 5 ms) and others' CPU of a command."""
    peak = 0
    meter = OthersMeter()
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or os.environ.copy()
    )
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(process.pid))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err.decode()[-2000:]}")
    return Measured(seconds, peak, meter.cores(), out.decode())

"""Merge benchmark: copying the base (the floor) vs `loramerge merge` vs the PEFT path.

Builds a synthetic Llama-shaped bf16 base (default ~1.1B parameters, hub-style shards) and a
rank-16 adapter on every linear module, then runs each job in turns, cold (page cache dropped
through vm.drop_caches when running as root) and warm, measuring wall time and the peak RSS of
the whole process tree. Two floors: `cp -r`, and a copy with direct I/O (direct_copy.py), which
needs no page cache. Where a VM hands free memory back to its host, every job waits until that
has gone quiet (see machine.py). Prints medians and ratios against both copies measured in the
same run, and writes JSON.

    python benchmarks/merge.py                 # default size and half size, 3 runs each
    python benchmarks/merge.py --layers 4 --runs 1 --no-half   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import (  # noqa: E402
    can_drop_caches,
    drop_caches,
    free_page_reporting,
    settle,
    warm,
)
from synthetic import LlamaShape, write_adapter, write_base  # noqa: E402


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


def run_measured(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak process-tree RSS of a command (polled every 5 ms)."""
    peak = 0
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(process.pid))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err.decode()[-2000:]}")
    return seconds, peak


def jobs(work: Path) -> dict[str, list[str]]:
    base, adapter, out = work / "base", work / "adapter", work / "out"
    loramerge = shutil.which("loramerge") or "loramerge"
    return {
        "copy": ["bash", "-c", f"cp -r '{base}' '{out}' && sync"],
        "copy-direct": [
            "bash",
            "-c",
            f"'{sys.executable}' '{HERE / 'direct_copy.py'}' '{base}' '{out}' && sync",
        ],
        "loramerge": [
            "bash",
            "-c",
            f"'{loramerge}' merge '{adapter}' --base '{base}' -o '{out}' --quiet && sync",
        ],
        "peft": [
            "bash",
            "-c",
            f"'{sys.executable}' '{HERE / 'peft_path.py'}' '{base}' '{adapter}' '{out}' && sync",
        ],
    }


def measure_size(
    work: Path, shape: LlamaShape, runs: int, cold: bool, names: list[str], settling: bool
) -> dict:
    if not (work / "base" / "config.json").exists():
        print(f"building a {shape.parameters() / 1e9:.2f}B-parameter base in {work}", flush=True)
        write_base(work / "base", shape)
        write_adapter(work / "adapter", shape)
    commands = jobs(work)
    results: dict[str, dict[str, list]] = {
        n: {"cold_s": [], "cold_rss": [], "warm_s": [], "warm_rss": []} for n in names
    }
    for run in range(runs):
        for regime in ("cold", "warm") if cold else ("warm",):
            for name in names:
                shutil.rmtree(work / "out", ignore_errors=True)
                if regime == "cold":
                    drop_caches()
                else:
                    warm(work / "base")
                    warm(work / "adapter")
                if settling:
                    settle()
                seconds, rss = run_measured(commands[name])
                results[name][f"{regime}_s"].append(seconds)
                results[name][f"{regime}_rss"].append(rss)
                print(
                    f"  run {run + 1} {regime:4s} {name:11s} {seconds:7.2f} s "
                    f"{rss / 2**20:8.0f} MiB",
                    flush=True,
                )
    shutil.rmtree(work / "out", ignore_errors=True)
    summary = {"parameters": shape.parameters(), "layers": shape.layers, "jobs": {}}
    for name, found in results.items():
        summary["jobs"][name] = {
            key: statistics.median(values) for key, values in found.items() if values
        } | {"runs": found}
    return summary


def print_table(label: str, summary: dict, cold: bool) -> None:
    jobs_found = summary["jobs"]
    floors = {"x cp": jobs_found["copy"], "x direct": jobs_found["copy-direct"]}
    print(
        f"\n{label}: {summary['parameters'] / 1e9:.2f}B parameters "
        f"({summary['layers']} layers), medians"
    )
    regimes = ("cold", "warm") if cold else ("warm",)
    header = f"{'job':12s}" + "".join(
        f"{r + ' s':>8s}" + "".join(f"{f:>10s}" for f in floors) + f"{r + ' RSS MiB':>15s}"
        for r in regimes
    )
    print(header)
    for name, values in jobs_found.items():
        row = f"{name:12s}"
        for regime in regimes:
            seconds = values[f"{regime}_s"]
            row += f"{seconds:8.2f}"
            row += "".join(f"{seconds / f[f'{regime}_s']:10.2f}" for f in floors.values())
            row += f"{values[f'{regime}_rss'] / 2**20:15.0f}"
        print(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="layers of the default size")
    parser.add_argument("--runs", type=int, default=3, help="runs per job and regime")
    parser.add_argument("--no-half", action="store_true", help="skip the half-size model")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT path")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loramerge-bench"))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "merge.json")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic models")
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="start each job at once, even while a VM is still handing memory to its host",
    )
    args = parser.parse_args()
    settling = free_page_reporting() and not args.no_settle
    if settling:
        print("free page reporting is on: each job waits until it has gone quiet")

    cold = can_drop_caches()
    if not cold:
        print("cannot write vm.drop_caches (not root?): reporting warm figures only")
    names = ["copy", "copy-direct", "loramerge"] + ([] if args.no_peft else ["peft"])
    sizes = [("default", args.layers)] + ([] if args.no_half else [("half", args.layers // 2)])
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "memory_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
            ),
        },
        "cold": cold,
        "free_page_reporting": free_page_reporting(),
        "settled": settling,
        "sizes": {},
    }
    for label, layers in sizes:
        shape = LlamaShape(layers=layers)
        print(f"[{label}]", flush=True)
        report["sizes"][label] = measure_size(
            args.workdir / label, shape, args.runs, cold, names, settling
        )
    for label, summary in report["sizes"].items():
        print_table(label, summary, cold)
    if "half" in report["sizes"]:
        regime = "cold" if cold else "warm"
        full = report["sizes"]["default"]["jobs"]["loramerge"][f"{regime}_rss"]
        half = report["sizes"]["half"]["jobs"]["loramerge"][f"{regime}_rss"]
        report["loramerge_rss_growth"] = full / half - 1
        print(f"\nloramerge peak RSS growth from half to default size: {full / half - 1:+.1%}")
    if not args.no_peft:
        regime = "cold" if cold else "warm"
        default = report["sizes"]["default"]["jobs"]
        speed = default["peft"][f"{regime}_s"] / default["loramerge"][f"{regime}_s"]
        memory = default["loramerge"][f"{regime}_rss"] / default["peft"][f"{regime}_rss"]
        report["loramerge_vs_peft"] = {"speedup": speed, "rss_share": memory}
        print(f"loramerge vs PEFT ({regime}): {speed:.1f}x faster, {memory:.0%} of its peak RSS")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Merge benchmark: copying the base (the floor) vs `loramerge merge` vs the PEFT path.

Builds a synthetic Llama-shaped bf16 base (default ~1.1B parameters, hub-style shards) and a
rank-16 adapter on every linear module, then runs each job in turns, cold and warm, measuring
wall time and the peak RSS of the whole process tree. Cold means nothing the job reads is in the
page cache: dropped through vm.drop_caches (as root), or, on a VM that hands freed memory back
to its host, evicted file by file with memory then filled by an unrelated file larger than
memory (see machine.py and --cold). Two floors: `cp -r`, and a copy with direct I/O
(direct_copy.py), which needs no page cache. Prints medians and ratios against both copies
measured in the same run, and writes JSON.

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

from llama_shape import LlamaShape  # noqa: E402
from machine import (  # noqa: E402
    can_drop_caches,
    drop_caches,
    fill_page_cache,
    free_page_reporting,
    make_filler,
    settle,
    warm,
)


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


COLD_STATES = {
    "dropped": "vm.drop_caches, then the job at once (needs root)",
    "settled": "vm.drop_caches, then a wait until free page reporting is quiet (needs root)",
    "full": "the job's files and Python evicted, then memory filled with an unrelated cached "
    "file larger than memory, as after streaming a model larger than memory (needs disk room)",
}


def choose_cold_state(asked: str | None, filler: Path) -> str | None:
    """The cold state to run in: the one asked for, else `full` on a VM that reports free
    pages to its host and `dropped` elsewhere; None (warm only) where none is possible."""
    state = asked or ("full" if free_page_reporting() else "dropped")
    if state == "full":
        print(f"page cache filler, larger than memory (written once): {filler}", flush=True)
        if make_filler(filler):
            return state
        print("no disk room for the filler: dropping the page cache instead")
        state = "settled" if free_page_reporting() else "dropped"
    if can_drop_caches():
        return state
    print("cannot write vm.drop_caches (not root?): reporting warm figures only")
    return None


def start_cold(work: Path, state: str, filler: Path) -> None:
    """Put the machine in the cold state `state` (see COLD_STATES) before a job."""
    if state == "full":
        fill_page_cache(filler, [work])
    else:
        drop_caches()
    if state != "dropped":
        settle()


def measure_size(
    work: Path,
    shape: LlamaShape,
    runs: int,
    cold_state: str | None,
    names: list[str],
    settling: bool,
    filler: Path,
) -> dict:
    if not (work / "base" / "config.json").exists():
        print(f"building a {shape.parameters() / 1e9:.2f}B-parameter base in {work}", flush=True)
        # in a child process: torch's libraries, once mapped here, would stay cached for good
        build = [sys.executable, str(HERE / "synthetic.py"), str(work), "--layers"]
        subprocess.run([*build, str(shape.layers)], check=True)
    commands = jobs(work)
    results: dict[str, dict[str, list]] = {
        n: {"cold_s": [], "cold_rss": [], "warm_s": [], "warm_rss": []} for n in names
    }
    for run in range(runs):
        for regime in ("cold", "warm") if cold_state else ("warm",):
            for name in names:
                shutil.rmtree(work / "out", ignore_errors=True)
                if regime == "cold":
                    start_cold(work, cold_state or "", filler)
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
        "--cold",
        choices=sorted(COLD_STATES),
        help="the state cold jobs start in: "
        + "; ".join(f"{name}: {text}" for name, text in COLD_STATES.items())
        + " (default: full where a VM reports free pages to its host, else dropped)",
    )
    args = parser.parse_args()
    filler = args.workdir / "filler"
    cold_state = choose_cold_state(args.cold, filler)
    cold = cold_state is not None
    # a VM handing memory to its host slows whatever runs meanwhile: wait for it to finish
    settling = free_page_reporting() and cold_state != "dropped"
    if settling:
        print("free page reporting is on: each job waits until it has gone quiet")
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
        "cold_state": cold_state,
        "free_page_reporting": free_page_reporting(),
        "settled": settling,
        "sizes": {},
    }
    for label, layers in sizes:
        shape = LlamaShape(layers=layers)
        print(f"[{label}]", flush=True)
        report["sizes"][label] = measure_size(
            args.workdir / label, shape, args.runs, cold_state, names, settling, filler
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

"""Merge benchmark: copying the base (the floor) and the products alone (the compute floor) vs
`loramerge merge` vs the PEFT path, at the default size with a rank-16 and a rank-256 adapter and
at a large size.

Builds synthetic Llama-shaped bf16 bases (default 1.1B parameters; large: Llama-2-7B widths,
as many layers as the disk holds beside the cold-state filler, at least 5B parameters) and PEFT
adapters on every linear module, then runs each job in turns, cold, measuring wall time, the
peak RSS of the whole process tree and how many cores other processes used meanwhile. Cold
means nothing the job reads is in the page cache: evicted file by file with memory then filled
by an unrelated file larger than memory (`full`, see machine.py and --cold) or dropped through
vm.drop_caches. Floors, measured in the same run: `cp -r`, a copy with direct I/O
(direct_copy.py), and every product B @ A of the adapter timed alone with torch on all cores
(gemm_floor.py). Prints medians and ratios, and writes JSON.

loramerge keeps what transformers says about a base and whether its torch-free engine computes
torch's bits on this machine (one torch import per machine) in its cache folder; `loramerge`
jobs run with both kept (as after any earlier command on that base), `loramerge first use` with
the base's answer missing, and `loramerge torch engine` with LORAMERGE_ENGINE=torch.

    python benchmarks/merge.py                       # the defaults: 1.1B r16 and r256, large
    python benchmarks/merge.py --layers 4 --runs 1 --no-large   # a quick look
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
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llama_shape import LlamaShape  # noqa: E402
from machine import (  # noqa: E402
    COLD_STATES,
    choose_cold_state,
    free_page_reporting,
    memory_bytes,
    start_cold,
    wait_quiet,
    warm,
)
from measure import run_measured  # noqa: E402


@dataclass
class Job:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    fresh_cache: bool = False  # the base's architecture answer removed before each run


def shell(text: str) -> list[str]:
    return ["bash", "-c", text]


def jobs(work: Path, ranks: list[int], peft: bool, extras: bool) -> list[Job]:
    base, out = work / "base", work / "out"
    loramerge = shutil.which("loramerge") or "loramerge"
    cache = {"LORAMERGE_CACHE_DIR": str(work / "cache")}
    python = sys.executable
    direct = f"'{python}' '{HERE / 'direct_copy.py'}' '{base}' '{out}' && sync"
    copy = f"cp -r '{base}' '{out}' && sync"
    found = [Job("copy", shell(copy)), Job("copy-direct", shell(direct))]
    for rank in ranks:
        adapter = work / f"adapter-r{rank}"
        merge = f"'{loramerge}' merge '{adapter}' --base '{base}' -o '{out}' --quiet && sync"
        if rank != ranks[0]:
            found.append(Job(f"gemm-r{rank}", [python, str(HERE / "gemm_floor.py"), str(adapter)]))
        found.append(Job(f"loramerge-r{rank}", shell(merge), cache))
        if rank == ranks[0] and extras:
            found.append(Job(f"first-use-r{rank}", shell(merge), cache, fresh_cache=True))
            torch_engine = {**cache, "LORAMERGE_ENGINE": "torch"}
            found.append(Job(f"torch-engine-r{rank}", shell(merge), torch_engine))
        if rank == ranks[0] and peft:
            command = f"'{python}' '{HERE / 'peft_path.py'}' '{base}' '{adapter}' '{out}' && sync"
            found.append(Job(f"peft-r{rank}", shell(command)))
    return found


def prepare(work: Path, shape: LlamaShape, ranks: list[int], large: bool) -> None:
    """The base and adapters (built in a child process: torch's libraries, once mapped here,
    would stay cached for good), and the cache a merge finds after an earlier command."""
    print(f"{shape.parameters() / 1e9:.2f}B-parameter base and rank {ranks} adapters in {work}")
    build = [sys.executable, str(HERE / "synthetic.py"), str(work), "--layers", str(shape.layers)]
    build += ["--ranks", ",".join(map(str, ranks))] + (["--large"] if large else [])
    subprocess.run(build, check=True)
    loramerge = shutil.which("loramerge") or "loramerge"
    env = {**os.environ, "LORAMERGE_CACHE_DIR": str(work / "cache")}
    adapter = work / f"adapter-r{ranks[0]}"
    plan = [loramerge, "merge", str(adapter), "--base", str(work / "base"), "-o", "-"]
    subprocess.run([*plan, "--dry-run", "--quiet"], check=True, env=env)
    # the engine's one check against torch, which the first merge on a machine makes
    check = "from loramerge.model.fast_checks import trusted; print(trusted())"
    subprocess.run([sys.executable, "-c", check], check=True, env=env)


def _environment(job: Job, work: Path) -> dict[str, str]:
    env = {**os.environ, **job.env}
    if job.fresh_cache:  # the machine's engine check kept, the base's answer not
        fresh = work / "cache-first"
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.copytree(work / "cache" / "fast-path", fresh / "fast-path")
        env["LORAMERGE_CACHE_DIR"] = str(fresh)
    return env


def measure_size(work: Path, plan: list[Job], runs: int, regimes: list[str], ctx: dict) -> dict:
    results: dict[str, dict[str, list]] = {job.name: {} for job in plan}
    for run in range(runs):
        for regime in regimes:
            for job in plan:
                shutil.rmtree(work / "out", ignore_errors=True)
                env = _environment(job, work)
                if regime == "cold":
                    start_cold(work, ctx["cold_state"], ctx["filler"])
                else:
                    warm(work / "base")
                before = wait_quiet(limit=ctx["quiet_limit"]) if ctx["wait_quiet"] else None
                found = run_measured(job.command, env)
                record = results[job.name]
                record.setdefault(f"{regime}_s", []).append(found.seconds)
                record.setdefault(f"{regime}_rss", []).append(found.rss)
                record.setdefault(f"{regime}_others", []).append(round(found.others, 3))
                record.setdefault(f"{regime}_others_before", []).append(before)
                if job.name.startswith("gemm"):
                    floor = json.loads(found.output)
                    record.setdefault(f"{regime}_products_s", []).append(floor["seconds"])
                    record.setdefault("gflops_per_s", []).append(floor["gflops_per_s"])
                extra = (
                    f"  products {floor['seconds']:.2f} s" if job.name.startswith("gemm") else ""
                )
                print(
                    f"  run {run + 1} {regime:4s} {job.name:17s} {found.seconds:7.2f} s "
                    f"{found.rss / 2**20:7.0f} MiB  others {found.others:4.2f} cores{extra}",
                    flush=True,
                )
    shutil.rmtree(work / "out", ignore_errors=True)
    return {
        name: {k: statistics.median(v) for k, v in found.items() if None not in v} | {"runs": found}
        for name, found in results.items()
    }


def print_table(label: str, summary: dict, regimes: list[str]) -> None:
    jobs_found = summary["jobs"]
    print(f"\n{label}: {summary['parameters'] / 1e9:.2f}B parameters ({summary['layers']} layers)")
    for regime in regimes:
        copy = jobs_found["copy"][f"{regime}_s"]
        print(f"{regime}, medians    seconds   x cp   peak RSS MiB   others' cores")
        for name, values in jobs_found.items():
            seconds = values[f"{regime}_s"]
            extra = ""
            if f"{regime}_products_s" in values:
                extra = f"   products alone {values[f'{regime}_products_s']:.2f} s"
            print(
                f"  {name:17s} {seconds:8.2f} {seconds / copy:6.2f} "
                f"{values[f'{regime}_rss'] / 2**20:12.0f} {values[f'{regime}_others']:12.2f}{extra}"
            )


def ratios(summary: dict, regime: str, ranks: list[int]) -> dict[str, float]:
    """The performance issue's ratios: each merge against cp, the large rank against max(cp,
    the products alone), and peak RSS of the large rank against the small one."""
    found = summary["jobs"]
    copy = found["copy"][f"{regime}_s"]
    result = {}
    for rank in ranks:
        merge = found.get(f"loramerge-r{rank}")
        if merge is None:
            continue
        result[f"r{rank}_x_cp"] = merge[f"{regime}_s"] / copy
        gemm = found.get(f"gemm-r{rank}")
        if gemm is not None:
            floor = max(copy, gemm[f"{regime}_products_s"])
            result[f"r{rank}_x_floor"] = merge[f"{regime}_s"] / floor
            small = found[f"loramerge-r{ranks[0]}"][f"{regime}_rss"]
            result[f"r{rank}_rss_x_r{ranks[0]}"] = merge[f"{regime}_rss"] / small
    for name in ("first-use", "torch-engine", "peft"):
        if f"{name}-r{ranks[0]}" in found:
            result[f"{name}_x_cp"] = found[f"{name}-r{ranks[0]}"][f"{regime}_s"] / copy
    return result


def large_layers(asked: int | None, work: Path, filler: Path, rank: int) -> int:
    """The layers of the large size: asked, else the most that fit on the disk beside the
    filler, the base, its merged copy and the adapter, with 8 GiB to spare."""
    if asked:
        return asked
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if not filler.exists():
        free -= memory_bytes() + (2 << 30)
    layers = 24
    while True:
        shape = LlamaShape.large(layers + 1)
        if 2 * shape.bytes() + shape.adapter_bytes(rank) + (8 << 30) > free:
            return layers
        layers += 1


def peft_fits(shape: LlamaShape) -> bool:
    """Whether the PEFT path (the model in memory in bf16, merged, then saved) can run here:
    it needs about twice the model's bytes."""
    return 2 * shape.bytes() < 0.8 * memory_bytes()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="layers of the default size")
    parser.add_argument("--ranks", default="16,256", help="adapter ranks at the default size")
    parser.add_argument("--large-layers", type=int, help="layers of the large size (default: "
                        "the most the disk holds, at least 24: 5.1B parameters)")  # fmt: skip
    parser.add_argument("--no-large", action="store_true", help="skip the large size")
    parser.add_argument("--half", action="store_true", help="also the half default size")
    parser.add_argument("--runs", type=int, default=3, help="runs per job")
    parser.add_argument("--warm", action="store_true", help="also time warm runs")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT path")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the first-use and torch-engine merges")  # fmt: skip
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="do not wait for other processes to go quiet before each job",
    )
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
    return parser.parse_args()


def machine_facts() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "memory_gib": round(memory_bytes() / 2**30, 1),
        "free_page_reporting": free_page_reporting(),
    }


def run_size(label: str, shape: LlamaShape, ranks: list[int], args, ctx: dict) -> dict:
    work = args.workdir / label
    large = label == "large"
    prepare(work, shape, ranks, large)
    peft = not args.no_peft and peft_fits(shape)
    extras = label == "default" and not args.no_extras
    plan = jobs(work, ranks, peft, extras)
    print(f"[{label}] jobs: {', '.join(job.name for job in plan)}", flush=True)
    summary = {"parameters": shape.parameters(), "layers": shape.layers, "ranks": ranks}
    summary["shape"] = {k: getattr(shape, k) for k in ("hidden", "intermediate", "heads", "vocab")}
    if not args.no_peft and not peft:
        summary["peft_skipped"] = (
            f"the PEFT path holds the model in memory (about {2 * shape.bytes() / 2**30:.0f} "
            f"GiB here) and this machine has {memory_bytes() / 2**30:.0f} GiB"
        )
        print(f"[{label}] PEFT path not run: {summary['peft_skipped']}")
    summary["jobs"] = measure_size(work, plan, args.runs, ctx["regimes"], ctx)
    summary["ratios"] = ratios(summary, ctx["regimes"][0], ranks)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def main() -> int:
    args = parse_args()
    filler = args.workdir / "filler"
    cold_state = choose_cold_state(args.cold, filler)
    regimes = (["cold"] if cold_state else []) + (["warm"] if args.warm or not cold_state else [])
    ctx = {"cold_state": cold_state, "filler": filler, "regimes": regimes,
           "wait_quiet": not args.no_wait, "quiet_limit": 900.0}  # fmt: skip
    report = {"machine": machine_facts(), "cold_state": cold_state, "regimes": regimes, "sizes": {}}
    ranks = [int(r) for r in args.ranks.split(",")]
    sizes = [("default", LlamaShape(layers=args.layers), ranks)]
    if args.half:
        sizes.append(("half", LlamaShape(layers=args.layers // 2), ranks[:1]))
    for label, shape, wanted in sizes:
        report["sizes"][label] = run_size(label, shape, wanted, args, ctx)
    if not args.no_large:
        layers = large_layers(args.large_layers, args.workdir, filler, ranks[0])
        shape = LlamaShape.large(layers)
        report["sizes"]["large"] = run_size("large", shape, ranks[:1], args, ctx)
    for label, summary in report["sizes"].items():
        print_table(label, summary, regimes)
        print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["ratios"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

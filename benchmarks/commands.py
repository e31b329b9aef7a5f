"""Every command that streams a base, against copying the base: `merge`, `inspect --base`,
`verify` of a merged folder, `fold` of a three-link chain, `truncate --merge` and
`reslora --merge`, each cold (the state `merge.py` uses), medians of `--runs`.

The synthetic 1.1B Llama-shaped base of `merge.py`, rank-16 PEFT adapters on every projection
(one to merge, inspect, verify and truncate to rank 8 by SVD, three as the chain's links) and a
rank-16 ResLoRA checkpoint ("is" blocks). `verify` compares a folder merged beforehand (untimed)
with the adapter: it reads the base and that folder, twice the bytes the others read. Prints
medians and ratios to `cp -r`, and writes JSON.

    python benchmarks/commands.py                 # 1.1B, three runs
    python benchmarks/commands.py --layers 2 --runs 1     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llama_shape import LlamaShape  # noqa: E402
from machine import COLD_STATES, choose_cold_state  # noqa: E402
from merge import Job, machine_facts, measure_size, print_table, shell  # noqa: E402


def jobs(work: Path) -> list[Job]:
    base, out, merged = work / "base", work / "out", work / "merged"
    tool = shutil.which("loramerge") or "loramerge"
    cache = {"LORAMERGE_CACHE_DIR": str(work / "cache")}
    adapter = work / "adapter-r16"
    links = " ".join(f"'{work / f'link-{n}'}'" for n in (1, 2, 3))
    commands = {
        "merge": f"merge '{adapter}' --base '{base}' -o '{out}'",
        "inspect --base": f"inspect '{adapter}' --base '{base}'",
        "verify merged": f"verify '{adapter}' '{merged}' --base '{base}'",
        "fold 3 links": f"fold {links} --base '{base}' -o '{out}'",
        "truncate --merge": f"truncate '{adapter}' --rank 8 --method svd --merge "
        f"--base '{base}' -o '{out}'",
        "reslora --merge": f"reslora '{work / 'reslora'}' --base '{base}' -o '{out}' --merge",
    }
    found = [Job("copy", shell(f"cp -r '{base}' '{out}' && sync"))]
    for name, command in commands.items():
        found.append(Job(name, shell(f"'{tool}' {command} --quiet > /dev/null && sync"), cache))
    return found


def prepare(work: Path, shape: LlamaShape) -> None:
    """The base, adapters, links and checkpoint (built in a child process, as merge.py does), the
    merged folder `verify` reads, and the cache folder as an earlier command leaves it (the
    base's architecture, the engine's check)."""
    print(f"{shape.parameters() / 1e9:.2f}B-parameter base in {work}", flush=True)
    build = [sys.executable, str(HERE / "synthetic.py"), str(work), "--layers", str(shape.layers)]
    subprocess.run([*build, "--ranks", "16", "--links", "3", "--reslora"], check=True)
    env = {**os.environ, "LORAMERGE_CACHE_DIR": str(work / "cache")}
    tool = shutil.which("loramerge") or "loramerge"
    plan = [tool, "merge", str(work / "adapter-r16"), "--base", str(work / "base"), "-o", "-"]
    subprocess.run([*plan, "--dry-run", "--quiet"], check=True, env=env, stdout=subprocess.DEVNULL)
    # the merge engine's one check against torch, which the first merge on a machine makes
    check = "from loramerge.model.fast_checks import trusted; trusted()"
    subprocess.run([sys.executable, "-c", check], check=True, env=env)
    if not (work / "merged").exists():
        merge = [tool, "merge", str(work / "adapter-r16"), "--base", str(work / "base")]
        subprocess.run([*merge, "-o", str(work / "merged"), "--quiet"], check=True, env=env)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="layers of the base (22: 1.1B)")
    parser.add_argument("--runs", type=int, default=3, help="runs per job")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loramerge-bench"))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "commands.json")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic models")
    parser.add_argument(
        "--no-wait", action="store_true", help="do not wait for a quiet machine before each job"
    )
    parser.add_argument("--cold", choices=sorted(COLD_STATES), help="as in merge.py")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    filler = args.workdir / "filler"
    cold_state = choose_cold_state(args.cold, filler)
    regimes = ["cold"] if cold_state else ["warm"]
    ctx = {"cold_state": cold_state, "filler": filler, "regimes": regimes,
           "wait_quiet": not args.no_wait, "quiet_limit": 900.0}  # fmt: skip
    work = args.workdir / "commands"
    shape = LlamaShape(layers=args.layers)
    prepare(work, shape)
    summary = {"parameters": shape.parameters(), "layers": shape.layers}
    summary["jobs"] = measure_size(work, jobs(work), args.runs, regimes, ctx)
    copy = summary["jobs"]["copy"][f"{regimes[0]}_s"]
    summary["x_cp"] = {
        name: found[f"{regimes[0]}_s"] / copy for name, found in summary["jobs"].items()
    }
    print_table("commands", summary, regimes)
    report = {"machine": machine_facts(), "cold_state": cold_state, "regimes": regimes, **summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

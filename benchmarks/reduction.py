"""Benchmark: QR-core `svd_reduce` against a full SVD of the formed update, in the same run.

Usage: python benchmarks/reduction.py [--size 4096] [--rank 64] [--target-rank 32] [--json PATH]

Both paths reduce dW = s * B @ A (B: size x rank, A: rank x size, float32, seeded) to the
target rank. The baseline forms dW in float32 and runs torch.linalg.svd on it; forming is timed.
Prints median times, the speed ratio and the retained energy from both; exits 1 when the two
energies differ by more than --tolerance, and 2 when --min-speedup is given and not reached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from loramerge.ops.lowrank import svd_reduce
except ImportError:  # run from a checkout without installing: use the repository next to us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loramerge.ops.lowrank import svd_reduce


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="out = in features (default 4096)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64)")
    parser.add_argument("--target-rank", type=int, default=32, help="reduced rank k (default 32)")
    parser.add_argument("--alpha", type=float, default=16.0, help="lora_alpha; scale = alpha / r")
    parser.add_argument("--repeats", type=int, default=5, help="timed QR-core runs (default 5)")
    parser.add_argument(
        "--baseline-repeats", type=int, default=3, help="timed full-SVD runs (default 3)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tolerance", type=float, default=1e-5, help="max |energy difference| (default 1e-5)"
    )
    parser.add_argument(
        "--min-speedup", type=float, default=None, help="exit 2 if the speed ratio is below this"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    args = parser.parse_args(argv)
    if min(args.size, args.rank, args.target_rank, args.repeats, args.baseline_repeats) < 1:
        parser.error("--size, --rank, --target-rank and the repeat counts must be >= 1")
    return args


Result = tuple[torch.Tensor, torch.Tensor, float]  # reduced B (out x k), A (k x in), energy kept


def timed(fn: Callable[[], Result], repeats: int) -> tuple[list[float], Result]:
    """Run `fn` `repeats` times; return the wall times in seconds and the last result."""
    times: list[float] = []
    result: Result | None = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return times, result


def energy_of(S: torch.Tensor, k: int) -> float:
    squares = (S.double() / S.max()) ** 2
    return float(squares[:k].sum() / squares.sum())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    B = torch.randn(args.size, args.rank, generator=g) / args.rank**0.5
    A = torch.randn(args.rank, args.size, generator=g) / args.size**0.5
    scale = args.alpha / args.rank
    k = args.target_rank

    def qr_core_reduce() -> Result:
        reduction = svd_reduce(B, A, scale, k)
        return reduction.B, reduction.A, reduction.energy_kept

    def full_svd_reduce() -> Result:
        dW = scale * (B @ A)  # forming the out x in update is part of the baseline's cost
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        root = S[:k].sqrt()
        return U[:, :k] * root, root[:, None] * Vh[:k], energy_of(S, k)

    qr_core_reduce()  # warm-up: first-call dispatch and allocation costs are not the algorithm
    qr_times, (qr_B, qr_A, qr_energy) = timed(qr_core_reduce, args.repeats)
    full_times, (full_B, full_A, full_energy) = timed(full_svd_reduce, args.baseline_repeats)
    # Not timed: how far apart the two rank-k updates are (float32 baseline round-off).
    full_update = full_B.double() @ full_A.double()
    product_difference = float(
        torch.linalg.matrix_norm(qr_B.double() @ qr_A.double() - full_update)
        / torch.linalg.matrix_norm(full_update)
    )
    qr_median, full_median = statistics.median(qr_times), statistics.median(full_times)
    ratio = full_median / qr_median
    difference = abs(qr_energy - full_energy)
    agree = difference <= args.tolerance

    print(
        f"module {args.size} x {args.size}, rank {args.rank} -> {k}, float32 inputs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"QR-core svd_reduce : median {qr_median * 1e3:10.2f} ms over {args.repeats} runs")
    runs = args.baseline_repeats
    print(f"full SVD (formed)  : median {full_median * 1e3:10.2f} ms over {runs} runs")
    print(f"speed ratio        : {ratio:10.1f}x")
    print(f"energy kept        : QR-core {qr_energy:.9f}, full SVD {full_energy:.9f}")
    print(f"rank-k update diff : {product_difference:.3e} relative Frobenius")
    print(
        f"energy difference  : {difference:.3e} (tolerance {args.tolerance:g}: "
        f"{'agree' if agree else 'DISAGREE'})"
    )

    if args.json is not None:
        results = {
            "size": args.size,
            "rank": args.rank,
            "target_rank": k,
            "scale": scale,
            "seed": args.seed,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "qr_core_seconds": qr_times,
            "full_svd_seconds": full_times,
            "qr_core_median_seconds": qr_median,
            "full_svd_median_seconds": full_median,
            "speed_ratio": ratio,
            "energy_qr_core": qr_energy,
            "energy_full_svd": full_energy,
            "energy_difference": difference,
            "energies_agree": agree,
            "reduced_update_relative_difference": product_difference,
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    if not agree:
        print("error: the two retained energies disagree", file=sys.stderr)
        return 1
    if args.min_speedup is not None and ratio < args.min_speedup:
        print(f"error: speed ratio {ratio:.1f}x is below {args.min_speedup:g}x", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

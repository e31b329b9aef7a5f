#!/usr/bin/env python
"""Mutation check: plant known bugs in a copy of the library, one at a time, and count which
tests catch each one.

    python tests/mutation.py                 # every mutation (~20-40 min on 2 cores)
    python tests/mutation.py --only dylora-last-ranks --only gguf-k-heads
    python tests/mutation.py --list

The repository's files (tracked and untracked, not ignored) are copied to a temporary folder.
For each mutation, a textual patch is applied to the copy's library code (each `old` text must
occur exactly as often as the patch says, or the mutation is reported as stale), the relevant
test files run against the copy (PYTHONPATH puts the copy's `loramerge` and `loramerge_cli`
first; the check is printed), then the file is restored. Per bug the table shows how many tests
failed, and how many of those are oracle tests (marked `@pytest.mark.oracle`: PEFT,
transformers, the gguf package, llama.cpp's permutation or a float64 formula written in the
test, never loramerge checked against itself). Every planted bug must fail at least one oracle
test; the exit status is 1 when one does not.

Not collected by pytest (no test_ prefix) and not run in CI: it takes tens of minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ENGINES = "tests/engines/test_engines.py"
MERGE = "tests/jobs/test_merge_oracle.py"
CONVERT = "tests/jobs/test_convert.py"
VERIFY = "tests/jobs/test_verify.py"
TRUNCATE = "tests/jobs/test_truncate.py"
FOLD = "tests/jobs/test_fold.py"
RESLORA = "tests/jobs/test_reslora.py"
CONV = "tests/jobs/test_conv2d.py"
GGUF = "tests/formats/test_gguf.py"
HEADERS = "tests/io/test_safetensors_reader_writer.py"
SAFETY = "tests/formats/test_safety.py"
LOWRANK = "tests/ops/test_lowrank.py"
TILES = "tests/ops/test_update_tiles.py"
DENSE_OPS = "tests/ops/test_dense_updates.py"
DENSE_PEFT = "tests/formats/test_peft_dense.py"
DENSE_ARCH = "tests/jobs/test_dense_architectures.py"
BITS = "tests/ops/test_bits.py"
IDENTITY = "tests/model/test_stream_identity.py"
VERIFY_WEIGHTS = "tests/jobs/test_verify_weights.py"
COLA_LINKS = "tests/ops/test_cola_links.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    patches: tuple[tuple[str, str, int], ...]  # (old, new, occurrences of old)
    tests: tuple[str, ...]


def patch(old: str, new: str, count: int = 1) -> tuple[str, str, int]:
    return old, new, count


MUTATIONS = [
    Mutation(
        "rslora-ignored",
        "rsLoRA scale ignored (alpha / r everywhere)",
        "loramerge/adapter.py",
        (
            patch(
                "return alpha / math.sqrt(r) if use_rslora else alpha / r",
                "return alpha / r",
            ),
        ),
        (ENGINES, MERGE, CONVERT, VERIFY, TRUNCATE),
    ),
    Mutation(
        "scale-1e-6",
        "every LoRA scale off by 1e-6 relative",
        "loramerge/adapter.py",
        (
            patch(
                "return alpha / math.sqrt(r) if use_rslora else alpha / r",
                "return (alpha / math.sqrt(r) if use_rslora else alpha / r) * (1 + 1e-6)",
            ),
        ),
        (ENGINES, MERGE, CONVERT, TRUNCATE, FOLD, CONV, GGUF),
    ),
    Mutation(
        "dora-norm-of-base",
        "DoRA norm taken from the base weight W instead of W + dW",
        "loramerge/model/merged_tiles.py",
        (
            patch(
                "squares += output_norms_squared(values, True)",
                "squares += output_norms_squared(base_rows.float(), True)",
            ),
            patch(
                "tile_norms = output_norms_squared(values, transposed).sqrt()",
                "tile_norms = output_norms_squared(base_rows.float(), transposed).sqrt()",
            ),
        ),
        (MERGE, CONV),
    ),
    Mutation(
        "dylora-last-ranks",
        "DyLoRA truncation keeps the last b ranks instead of the first",
        "loramerge/ops/rank_truncation.py",
        (
            patch(
                "return lora_b[:, :b].contiguous(), lora_a[:b].contiguous()",
                "return lora_b[:, -b:].contiguous(), lora_a[-b:].contiguous()",
            ),
        ),
        (TRUNCATE,),
    ),
    Mutation(
        "gguf-k-heads",
        "GGUF k_proj rows permuted over the attention heads, not the key/value heads",
        "loramerge/formats/gguf_writer.py",
        (
            patch(
                "elif permuted and tensor_type is gguf.MODEL_TENSOR.ATTN_K:\n"
                "            rows = kv_heads",
                "elif permuted and tensor_type is gguf.MODEL_TENSOR.ATTN_K:\n"
                "            rows = heads",
            ),
        ),
        (GGUF, ENGINES),
    ),
    Mutation(
        "reslora-ratio-inverted",
        "ResLoRA norm ratios inverted (denominator / numerator)",
        "loramerge/ops/reslora_rules.py",
        (patch("    return numerator / denominator", "    return denominator / numerator"),),
        (RESLORA,),
    ),
    Mutation(
        "reslora-form-scale-dropped",
        "ResLoRA plain factors formed without the (1 + a_n) that multiplies B",
        "loramerge/ops/reslora_forms.py",
        (patch("            B = self.b_scale * B", "            B = B"),),
        (RESLORA,),
    ),
    Mutation(
        "kohya-alpha-ignored",
        "kohya reader ignores the .alpha tensor (scale 1)",
        "loramerge/formats/kohya.py",
        (
            patch(
                'alpha = float(parts["alpha"].load().reshape(-1)[0].item())',
                "alpha = float(r)",
            ),
        ),
        (CONVERT, VERIFY, TRUNCATE),
    ),
    Mutation(
        "kohya-writer-alpha",
        "kohya writer stores the module's alpha, not scale x r (wrong for rsLoRA)",
        "loramerge/formats/kohya_writer.py",
        (patch("alpha = module.scale * module.r", "alpha = module.alpha"),),
        (CONVERT,),
    ),
    Mutation(
        "conv1d-not-transposed",
        "GPT-2 Conv1D updates not transposed to the (in x out) layout",
        "loramerge/model/tensor_planner.py",
        (
            patch(
                "transposed = target.kind in (ModuleKind.CONV1D, ModuleKind.EMBEDDING)",
                "transposed = target.kind in (ModuleKind.EMBEDDING,)",
            ),
        ),
        (MERGE, CONVERT),
    ),
    Mutation(
        "fold-weights-ignored",
        "COLA fold ignores the manifest's link weights",
        "loramerge/ops/cola_fold.py",
        (
            patch(
                "return lora_b, lora_a, module.scale * weight",
                "return lora_b, lora_a, module.scale",
            ),
        ),
        (FOLD,),
    ),
    Mutation(
        "fold-numpy-weights-ignored",
        "the torch-free exact fold ignores the manifest's link weights",
        "loramerge/ops/cola_links.py",
        (patch("_scaled(m.lora_A, m.scale * w)", "_scaled(m.lora_A, m.scale)"),),
        (FOLD, COLA_LINKS),
    ),
    Mutation(
        "fold-per-link-order",
        "per-link fold ties the knots in reverse chain order",
        "loramerge/jobs/fold_model.py",
        (
            patch(
                "for step, link in enumerate(chain.links):",
                "for step, link in enumerate(reversed(chain.links)):",
            ),
        ),
        (FOLD,),
    ),
    Mutation(
        "svd-smallest",
        "SVD reduction keeps the smallest singular values",
        "loramerge/ops/lowrank.py",
        (
            patch("root = S[:kept].sqrt()", "root = S[S.shape[0] - kept :].sqrt()"),
            patch("(core.Qb @ U[:, :kept])", "(core.Qb @ U[:, U.shape[1] - kept :])"),
            patch("(Vh[:kept] @ core.Qa.T)", "(Vh[Vh.shape[0] - kept :] @ core.Qa.T)"),
        ),
        (LOWRANK, TRUNCATE, FOLD, RESLORA),
    ),
    Mutation(
        "modules-to-save-kept",
        "modules_to_save tensors not replaced (the base's copied)",
        "loramerge/model/param_changes.py",
        (
            patch(
                '("modules_to_save", adapter.modules_to_save),',
                '("modules_to_save", {}),',
            ),
        ),
        (MERGE,),
    ),
    Mutation(
        "head-not-untied",
        "a tied head is not untied when the embedding table changes",
        "loramerge/model/param_changes.py",
        (patch("changes.untie = True", "changes.untie = False"),),
        (MERGE,),
    ),
    Mutation(
        "lora-bias-unscaled",
        "lora_bias added without the LoRA scale",
        "loramerge/model/merged_tiles.py",
        (
            patch(
                "return stored.to(torch.float32) + module.bias.float() * module.scale",
                "return stored.to(torch.float32) + module.bias.float()",
            ),
        ),
        (MERGE,),
    ),
    Mutation(
        "engine-fold-inverted",
        "engine profiles fold a module's scale into lora_B inverted",
        "loramerge/engines/rewrites.py",
        (patch("ratio = module.scale / scale", "ratio = scale / module.scale"),),
        (ENGINES,),
    ),
    Mutation(
        "alpha-pattern-ignored",
        "PEFT reader ignores alpha_pattern",
        "loramerge/formats/peft.py",
        (
            patch(
                "found = match_pattern(self.alpha_pattern, key)",
                "found = None",
            ),
        ),
        (ENGINES, MERGE, CONVERT, VERIFY),
    ),
    Mutation(
        "gguf-embedding-untransposed",
        "GGUF token_embd lora_a written as A, not A^T",
        "loramerge/formats/gguf_writer.py",
        (patch("lora_a = lora_a.T if self.embedding else lora_a", "lora_a = lora_a"),),
        (GGUF,),
    ),
    Mutation(
        "header-gap-accepted",
        "safetensors header: a gap between tensors accepted",
        "loramerge/io/safetensors_header.py",
        (patch("if entry.begin != position:", "if entry.begin < position:"),),
        (HEADERS, SAFETY),
    ),
    Mutation(
        "ia3-bias-unscaled",
        "IA3 on the outputs leaves the layer's bias unscaled",
        "loramerge/formats/peft_dense.py",
        (patch('out_features=size, bias="scale"', "out_features=size, bias=None"),),
        (DENSE_ARCH,),
    ),
    Mutation(
        "neumann-term-short",
        "OFT's Cayley-Neumann series one doubled power short",
        "loramerge/ops/rotations.py",
        (
            patch(
                "for _ in range(max(2, terms - 2) - 1):", "for _ in range(max(2, terms - 2) - 2):"
            ),
        ),
        (DENSE_OPS, DENSE_PEFT),
    ),
    Mutation(
        "fourier-positions-column-major",
        "FourierFT positions read column-major",
        "loramerge/ops/dense_deltas.py",
        (
            patch(
                "return flat // in_features, flat % in_features",
                "return flat % out_features, flat // out_features",
            ),
        ),
        (DENSE_OPS, DENSE_PEFT),
    ),
    Mutation(
        "c3a-shift-reversed",
        "C3A's circulant blocks shifted left instead of right",
        "loramerge/ops/dense_deltas.py",
        (patch("(j - t) % size]", "(t - j) % size]"),),
        (DENSE_OPS, DENSE_PEFT),
    ),
    Mutation(
        "randlora-pairing",
        "RandLoRA's bases flattened in the same order on both sides",
        "loramerge/ops/dense_deltas.py",
        (
            patch(
                "left = b.reshape(larger, bases * rank)",
                "left = b.transpose(1, 2).reshape(larger, bases * rank)",
            ),
        ),
        (DENSE_OPS, DENSE_PEFT),
    ),
    Mutation(
        "dense-rounded-to-bf16",
        "a dense rule's result rounded to bfloat16 before the output dtype",
        "loramerge/model/dense_tiles.py",
        (
            patch(
                "rows.copy_(float32_rounding_once(merged, out_dtype))",
                "rows.copy_(merged.to(torch.bfloat16))",
            ),
        ),
        (DENSE_PEFT,),
    ),
    Mutation(
        "fast-bf16-ties-down",
        "torch-free engine: bfloat16 ties rounded toward zero instead of to even",
        "loramerge/ops/bits.py",
        (
            patch(
                "numpy.bitwise_and(scratch, 1, out=scratch)",
                "numpy.bitwise_and(scratch, 0, out=scratch)",
            ),
        ),
        (BITS, MERGE),
    ),
    Mutation(
        "fast-prescale-twice",
        "torch-free engine: a power-of-two scale moved into A squared",
        "loramerge/ops/fast_update.py",
        (
            patch(
                "return lora_b, lora_a * numpy.float32(scale), 1.0",
                "return lora_b, lora_a * numpy.float32(scale * scale), 1.0",
            ),
        ),
        (MERGE, IDENTITY),
    ),
    Mutation(
        "verify-weights-16-ulps",
        "verify of a merged folder takes 16 units in the last place as rounding",
        "loramerge/jobs/verify_weights.py",
        (
            patch(
                "beyond = ((values - wanted).abs() - gap).clamp(min=0)",
                "beyond = ((values - wanted).abs() - 16 * gap).clamp(min=0)",
            ),
        ),
        (VERIFY_WEIGHTS,),
    ),
    Mutation(
        "verify-weights-rounded-bits-only",
        "verify of a merged folder: a tile whose stored bits differ anywhere counts as equal",
        "loramerge/jobs/verify_weights.py",
        (
            patch(
                "    if not bool(differ.any()):\n        return 0.0",
                "    if True:\n        return 0.0",
            ),
        ),
        (VERIFY_WEIGHTS,),
    ),
]


def copy_repository(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        source = ROOT / rel
        if not source.is_file():
            continue  # deleted in the work tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    # `loramerge_cli` is installed from cli/: expose the copy's cli/ under that name too
    shim = dest / ".mutation-path"
    shim.mkdir()
    (shim / "loramerge_cli").symlink_to(dest / "cli", target_is_directory=True)


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / ".mutation-path")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # restored sources must never meet a stale .pyc
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def check_imports(copy: Path) -> None:
    code = "import loramerge, loramerge_cli as c; print(loramerge.__file__); print(c.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=copy,
        env=environment(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in found:
        if not Path(path).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"the copy does not shadow the installed package: {path}")
    print(f"library under test: {found[0]}")


def run_pytest(copy: Path, files: tuple[str, ...], *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *extra]
    return subprocess.run(
        [*command, *files], cwd=copy, env=environment(copy), capture_output=True, text=True
    )


def oracle_ids(copy: Path, files: tuple[str, ...]) -> set[str]:
    done = run_pytest(copy, files, "--collect-only", "-m", "oracle")
    return {line.strip() for line in done.stdout.splitlines() if "::" in line}


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)")


def failures(done: subprocess.CompletedProcess) -> list[str]:
    return [m.group(1) for line in done.stdout.splitlines() if (m := FAILED.match(line))]


def apply(copy: Path, mutation: Mutation) -> str | None:
    """Patch the copy; returns the original text, or None when a patch no longer matches."""
    path = copy / mutation.file
    original = path.read_text()
    text = original
    for old, new, count in mutation.patches:
        if text.count(old) != count:
            return None
        text = text.replace(old, new)
    path.write_text(text)
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run only this mutation")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("-v", "--verbose", action="store_true", help="name every failed test")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:28s} {m.file:36s} {m.what}")
        return 0 if args.list else 2

    temp = Path(tempfile.mkdtemp(prefix="loramerge-mutation-"))
    copy = temp / "repo"
    try:
        copy_repository(copy)
        check_imports(copy)
        files = tuple(sorted({f for m in chosen for f in m.tests}))
        oracles = oracle_ids(copy, files)
        print(f"{len(oracles)} oracle tests in {len(files)} files; baseline run...", flush=True)
        baseline = run_pytest(copy, files)
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:])
            raise SystemExit("the unmutated copy fails its tests: fix that first")
        rows = []
        for mutation in chosen:
            started = time.monotonic()
            original = apply(copy, mutation)
            if original is None:
                rows.append((mutation, None, None, [], 0.0))
                print(f"{mutation.name}: STALE (the patched text is not in {mutation.file})")
                continue
            try:
                done = run_pytest(copy, mutation.tests)
            finally:
                (copy / mutation.file).write_text(original)
            failed = failures(done)
            if done.returncode != 0 and not failed:
                failed = ["(pytest failed without test failures)"]
            caught = [f for f in failed if f in oracles]
            elapsed = time.monotonic() - started
            rows.append((mutation, len(failed), len(caught), caught, elapsed))
            print(
                f"{mutation.name}: {len(failed)} failed, {len(caught)} oracle ({elapsed:.0f} s)",
                flush=True,
            )
            if args.verbose:
                for name in failed:
                    print(f"    {'oracle' if name in caught else 'other '}  {name}", flush=True)
        print()
        print("| planted bug | file | tests failed | oracle tests failed | e.g. |")
        print("| --- | --- | --- | --- | --- |")
        missed = 0
        for mutation, failed, caught, names, _ in rows:
            if failed is None:
                print(f"| {mutation.what} | {mutation.file} | stale patch | - | - |")
                missed += 1
                continue
            example = names[0].split("/")[-1] if names else "NONE"
            print(f"| {mutation.what} | {mutation.file} | {failed} | {caught} | {example} |")
            missed += caught == 0
        print()
        print("every planted bug failed an oracle test" if not missed else f"{missed} not caught")
        return 1 if missed else 0
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Recompute every figure the documentation quotes from the test fixtures.

    python docs/figures.py [SECTION ...]      # sections: dylora fold reslora outputs tools

Run it after rebuilding the fixtures (fixtures/make_fixtures.py) and copy what changed into the
pages named in each section's heading. Losses are transformers' mean causal-LM loss (float32) over
the 32-token chunks of fixtures/text/train.txt, as the fixture builders measure them; the CLI is
run as the pages show it. Nothing here is used by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
LLAMA = FIXTURES / "bases" / "llama"
TRAIN = FIXTURES / "text" / "train.txt"
EVAL = FIXTURES / "text" / "eval.txt"
SCRATCH = Path(tempfile.mkdtemp(prefix="loramerge-figures-"))


def run(*args: object, json_out: bool = False) -> str | dict:
    """`loramerge ARGS` from the repository root (so paths print as the pages show them)."""
    argv = ["loramerge", *(str(a) for a in args)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout) if json_out else done.stdout + done.stderr


def _env() -> dict[str, str]:
    return dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def chunks(text: Path = TRAIN, length: int = 32) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(LLAMA)(text.read_text())["input_ids"]
    count = len(ids) // length
    return torch.tensor(ids[: count * length]).view(count, length)


def loss(model, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model.eval()(input_ids=batch, labels=batch).loss)


def causal_lm(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def peft_model(adapter: Path, base: Path = LLAMA):
    from peft import PeftModel

    return PeftModel.from_pretrained(causal_lm(base), adapter)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


# ---------------------------------------------------------------- sections


def dylora() -> None:
    """fixtures/README.md (DyLoRA), docs/truncate.md (prefix or SVD; example session)."""
    official = FIXTURES / "dylora" / "official"
    out = SCRATCH / "dylora"
    run("truncate", official, "--alpha", "8", "--rank", "1,2,3,4,5,6,7,8", "-o", out, "-q")
    svd = SCRATCH / "dylora-svd4"
    run("truncate", official, "--alpha", "8", "--method", "svd", "--rank", "4", "-o", svd, "-q")
    batch = chunks()
    base = loss(causal_lm(LLAMA), batch)
    losses = {b: loss(peft_model(out / f"rank-{b}"), batch) for b in range(1, 9)}
    print("## dylora: train.txt loss by truncated rank (fixtures/README.md, docs/truncate.md)")
    print(f"base {base:.4f}; " + ", ".join(f"b={b}: {v:.4f}" for b, v in losses.items()))
    print(f"3 decimals: {', '.join(f'{v:.3f}' for v in losses.values())} (base {base:.3f})")
    print(f"rank 4 by prefix {losses[4]:.4f}, by SVD {loss(peft_model(svd), batch):.4f}")


def fold() -> None:
    """docs/fold.md: why one rounding matters."""
    from peft import PeftModel

    chain = FIXTURES / "cola"
    links = [chain / f"link-{i}" for i in (1, 2, 3)]
    once = run("fold", chain, "--base", LLAMA, "-o", SCRATCH / "once", "--json", json_out=True)
    per = run(
        "fold", chain, "--base", LLAMA, "-o", SCRATCH / "per", "--rounding", "per-link", "--json",
        json_out=True,
    )  # fmt: skip
    f16 = run(
        "fold", chain, "--base", LLAMA, "-o", SCRATCH / "f16", "--rounding", "per-link",
        "--dtype", "float16", "--json", json_out=True,
    )  # fmt: skip
    run("fold", chain, "--base", LLAMA, "-o", SCRATCH / "f32", "--dtype", "float32", "-q")
    run("fold", *links[:2], "--base", LLAMA, "-o", SCRATCH / "f32-12", "--dtype", "float32", "-q")
    base = {k: v.double() for k, v in tensors(LLAMA).items()}
    # each link's dense update, and the knots PEFT ties in bf16 link after link (the weights
    # link j was trained on): what a knot changed and what it lost of the link's update
    model = causal_lm(LLAMA, torch.bfloat16)
    exact = dict(base)
    print("## fold: the fixture chain (docs/fold.md)")
    print("| link | ‖ΔW_j‖_F | ‖ΔW_j‖ / ‖W‖ per module | elements its bf16 knot changed | lost |")
    link_norms = []
    for index, link in enumerate(links):
        before = {k: v.double() for k, v in model.state_dict().items()}
        layers = PeftModel.from_pretrained(model, link)
        deltas = {}
        for name, layer in layers.base_model.model.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                b = layer.lora_B["default"].weight.double()
                a = layer.lora_A["default"].weight.double()
                deltas[name + ".weight"] = layer.scaling["default"] * (b @ a)
        model = layers.merge_and_unload()
        after = model.state_dict()
        norm = sum(float(d.square().sum()) for d in deltas.values()) ** 0.5
        link_norms.append(norm)
        ratios = [float(d.norm() / base[n].norm()) for n, d in deltas.items()]
        lost = (
            sum(
                float((after[n].double() - (before[n] + d)).square().sum())
                for n, d in deltas.items()
            )
            ** 0.5
        )
        share = per["links"][index]["changed_share"]
        print(
            f"| {index + 1} | {norm:.4g} | {min(ratios) * 100:.3g}%-{max(ratios) * 100:.3g}% "
            f"| {share:.1%} "
            f"| {lost / norm:.2%} |"
        )
        for n, d in deltas.items():
            exact[n] = exact[n] + d
    touched = [n for n in base if not torch.equal(exact[n], base[n])]
    chain_norm = sum(float((exact[n] - base[n]).square().sum()) for n in touched) ** 0.5
    print(f"{len(touched)} touched tensors, chain ‖ΔW‖_F {chain_norm:.4g}")
    link3 = [n.removesuffix(".weight") for n in touched]
    link3 = [n + ".weight" for n in link3 if n in per["links"][2]["modules"]]
    for label, folder in (("once", SCRATCH / "once"), ("per-link", SCRATCH / "per")):
        got = tensors(folder)
        error = sum(float((got[n].double() - exact[n]).square().sum()) for n in touched) ** 0.5
        error3 = sum(float((got[n].double() - exact[n]).square().sum()) for n in link3) ** 0.5
        print(
            f"bf16 rounded {label}: ‖W - W_exact‖_F / ‖ΔW‖_F {error / chain_norm:.3%}; on link "
            f"3's modules, relative to ‖ΔW_3‖_F {error3 / link_norms[2]:.1%}"
        )
    batch = chunks()
    losses = {
        "base": loss(causal_lm(LLAMA), batch),
        "links 1-2 folded, float32": loss(causal_lm(SCRATCH / "f32-12"), batch),
        "all 3 links folded, float32": loss(causal_lm(SCRATCH / "f32"), batch),
        "all 3 links, bf16 rounded once": loss(causal_lm(SCRATCH / "once"), batch),
        "all 3 links, bf16 rounded per link": loss(causal_lm(SCRATCH / "per"), batch),
    }
    for name, value in losses.items():
        print(f"| {name} | {value:.6f} |")
    full = losses["all 3 links folded, float32"]
    worth = losses["links 1-2 folded, float32"] - full
    for name in ("all 3 links, bf16 rounded once", "all 3 links, bf16 rounded per link"):
        given = losses[name] - full
        print(f"{name}: gives up {given:.6f} of link 3's {worth:.5f} ({given / worth:.1%})")
    print("float16 per-link knots changed:", [f"{x['changed_share']:.1%}" for x in f16["links"]])
    print("report: link norms", [f"{x['update_norm']:.4g}" for x in once["links"]])
    print(
        run(
            "fold", rel(chain), "--base", rel(LLAMA), "-o", SCRATCH / "pl", "--rounding", "per-link"
        )
    )


RESLORA_ROWS = [
    ("is", "weight-based (default)", ()),
    ("is", "`--norms official`", ("--norms", "official")),
    ("is", "`--stats` (input norms)", ("--stats", "STATS")),
    ("bs", "exact (default; same with `--uniform-rank`)", ()),
    ("bs", "exact, `--merge` (bf16)", ("--merge",)),
    ("bs", "`--rank 4`", ("--rank", "4")),
    ("ms", "A-merge, weights (default)", ()),
    ("ms", "A-merge, `--stats`", ("--stats", "STATS")),
    ("ms", "scalar, `--stats`", ("--ms-rule", "scalar", "--stats", "STATS")),
]


def reslora() -> None:
    """docs/reslora.md: measured on the fixtures."""
    stats = {}
    for kind in ("is", "ms"):
        stats[kind] = SCRATCH / f"{kind}-stats.json"
        run(
            "reslora-stats", FIXTURES / "reslora" / kind, "--base", LLAMA, "--text", TRAIN,
            "--seq-len", "32", "-o", stats[kind], "-q",
        )  # fmt: skip
    for text in (TRAIN, EVAL):
        print(f"## reslora: on {text.name} (docs/reslora.md)")
        for index, (kind, label, extra) in enumerate(RESLORA_ROWS):
            args = [str(stats[kind]) if a == "STATS" else a for a in extra]
            out = SCRATCH / f"reslora-{text.stem}-{index}"
            report = run(
                "reslora", FIXTURES / "reslora" / kind, "--base", LLAMA, "-o", out, *args,
                "--check-text", text, "--seq-len", "32", "--json", json_out=True,
            )  # fmt: skip
            check = report["check"]
            print(
                f"| {kind} | {label} | {check['loss_reslora']:.4f} | {check['loss_plain']:.4f} "
                f"| {check['loss_difference']:+.3g} | {check['max_logit_difference']:.3g} |"
            )
        print(f"{check['tokens']} predicted tokens; base loss {check['loss_base']:.4f}")


def outputs() -> None:
    """Command outputs the pages show: docs/inspect.md, docs/verify.md, docs/truncate.md,
    docs/reslora.md (the is example), docs/fold.md (first example), docs/merge.md, README.md."""
    adapters = FIXTURES / "adapters"
    print(run("inspect", rel(adapters / "llama-rslora-patterns"), "--base", rel(LLAMA)))
    vllm = SCRATCH / "for-vllm"
    run("convert", adapters / "llama-rslora-patterns", "--engine", "vllm", "-o", vllm, "-q")
    print(run("verify", rel(adapters / "llama-rslora-patterns"), vllm))
    merged = SCRATCH / "merged32"
    run("merge", adapters / "llama-lora", "--base", LLAMA, "--dtype", "float32", "-o", merged, "-q")
    print(run("verify", adapters / "llama-lora", merged, "--base", LLAMA, "--text", EVAL))
    copy = SCRATCH / "copy"  # llama-lora with one module's lora_B scaled by 1.01
    shutil.copytree(adapters / "llama-lora", copy)
    weights = load_file(copy / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    weights[key] = (weights[key].double() * 1.01).float()
    save_file(weights, copy / "adapter_model.safetensors")
    done = subprocess.run(
        ["loramerge", "verify", rel(adapters / "llama-lora"), copy],
        cwd=ROOT, capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    print(done.stdout + done.stderr)
    official = FIXTURES / "dylora" / "official"
    print(run("inspect", rel(official), "--alpha", "8"))
    print(run("truncate", rel(official), "--alpha", "8", "--rank", "4", "-o", SCRATCH / "dy4"))
    small = SCRATCH / "small"
    print(run("truncate", rel(adapters / "llama-lora"), "--energy", "0.9", "--max-rank", "6",
              "-o", small))  # fmt: skip
    print(json.loads((small / "adapter_config.json").read_text())["rank_pattern"])
    print(
        run("reslora", rel(FIXTURES / "reslora" / "is"), "--base", rel(LLAMA), "-o", SCRATCH / "is")
    )
    print(run("fold", rel(FIXTURES / "cola"), "--base", rel(LLAMA), "-o", SCRATCH / "folded"))
    print(run("merge", rel(adapters / "llama-lora"), "--base", rel(LLAMA), "-o", SCRATCH / "m"))


def tools() -> None:
    """docs/formats.md, language-model tools: the largest difference between PEFT's logits with
    the LoRA `convert` writes and each tool's stored float32 logits, relative to their largest
    (and how far the adapter moves them); docs/convert.md: the outputs its examples show."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuners, torchtune = FIXTURES / "peft-tuners", FIXTURES / "torchtune"
    cases = [(tuners / n, tuners / n, LLAMA, []) for n in ("adalora", "loha", "lokr-factorised")]
    cases += [(tuners / "lokr-full-w1", tuners / "lokr-full-w1", LLAMA, ["--max-rank", "64"])]
    cases += [(tuners / n, tuners / n, LLAMA, []) for n in ("vera", "miss", "delora")]
    cases += [(FIXTURES / "mlx-lm" / n, FIXTURES / "mlx-lm" / n, LLAMA, [])
              for n in ("lora", "dora", "lora-scale")]  # fmt: skip
    cases += [(torchtune / n / "adapter_model.pt", torchtune / n, torchtune / "base", [])
              for n in ("lora", "dora")]  # fmt: skip
    for source, tool, base, extra in cases:
        out = SCRATCH / f"tool-{tool.parent.name}-{tool.name}"
        run("convert", source, "--to", "peft", "-o", out, "--base", base, "-q", *extra)
        ref = load_file(tool / "reference.safetensors")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        with torch.no_grad():
            plain = model(ref["input_ids"]).logits
            adapted = PeftModel.from_pretrained(model, out).eval()(ref["input_ids"]).logits
        top = float(ref["logits"].abs().max())
        error = float((adapted - ref["logits"]).abs().max()) / top
        moved = float((plain - ref["logits"]).abs().max()) / top
        print(f"{rel(tool)}: max error {error:.2e}, moved {moved:.3f}")
    print(run("convert", rel(tuners / "loha"), "--to", "peft", "-o", SCRATCH / "loha-as-lora"))
    print(run("convert", rel(torchtune / "lora" / "adapter_model.pt"), "--to", "peft", "-o",
              SCRATCH / "tt", "--base", rel(torchtune / "base")))  # fmt: skip
    print(run("convert", rel(tuners / "lokr-full-w1"), "--to", "peft", "-o", SCRATCH / "lokr8",
              "--max-rank", "8"))  # fmt: skip


def dense() -> None:
    """docs/formats.md, merge-only PEFT tuners: the largest difference between the float32
    merged model's logits and PEFT's stored ones, relative to their largest (and how far the
    adapter moves them); docs/merge.md: the OFT example's output."""
    from transformers import AutoModelForCausalLM

    tuners = FIXTURES / "peft-tuners"
    names = ("ia3", "oft", "boft", "hra", "miss-bat", "fourierft", "shira", "c3a", "randlora")
    plain = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32).eval()
    for name in names:
        out = SCRATCH / f"dense-{name}"
        run("merge", tuners / name, "--base", LLAMA, "-o", out, "--dtype", "float32", "-q")
        ref = load_file(tuners / name / "reference.safetensors")
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            got, base = merged(ref["input_ids"]).logits, plain(ref["input_ids"]).logits
        top = float(ref["logits"].abs().max())
        error = float((got - ref["logits"]).abs().max()) / top
        moved = float((base - ref["logits"]).abs().max()) / top
        print(f"{rel(tuners / name)}: max error {error:.2e} (merged), moved {moved:.3f}")
    print(run("merge", rel(tuners / "oft"), "--base", rel(LLAMA), "-o", SCRATCH / "merged-oft"))


SECTIONS = {
    "dense": dense,
    "dylora": dylora,
    "fold": fold,
    "reslora": reslora,
    "outputs": outputs,
    "tools": tools,
}


if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    for name in names:
        SECTIONS[name]()
        print()

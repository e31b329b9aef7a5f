"""The table of docs/what-merges.md, made from the architecture suite (tests/architectures.py):
every PEFT option, the architectures it is tested on, what `merge` and `convert` do with it (as
the suite asserts) and which engine profiles take it (asked of the profiles themselves).

The table stands between `<!-- support: options -->` and `<!-- end support -->`;
tests/jobs/test_architectures.py checks that it is what this module makes. Rewrite it with

    python tests/support_table.py
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "what-merges.md"
_BLOCK = re.compile(r"(<!-- support: options -->\n)(.*?)(<!-- end support -->)", re.DOTALL)
ENGINES = ("vllm", "tgi", "lorax", "sglang", "llama.cpp")

# what each option of the suite is, in a few words
OPTIONS = {
    "plain": "LoRA on every linear layer (all-linear; MoE: experts and routers too)",
    "head": "output or task head targeted, tied or not",
    "cproj-head": "GPT-2 square Conv1D attn.c_proj next to the Linear lm_head",
    "embed": "embedding LoRA, the table tied to a head",
    "dora": "DoRA (Linear, Conv1D)",
    "dora-embed": "DoRA on an embedding",
    "rslora-patterns": "rsLoRA with rank_pattern / alpha_pattern",
    "bias-all": 'bias="all" (trained biases saved)',
    "bias-lora-only": 'bias="lora_only"',
    "lora-bias": "lora_bias (a bias on lora_B)",
    "modules-to-save": "modules_to_save (whole heads, nested heads)",
    "trainable-tokens": "trainable_token_indices (rows of the embedding and a tied head)",
    "experts": "target_parameters on 3-D MoE experts",
    "router": "target_parameters on a router",
    "conv1d": "nn.Conv1d LoRA",
    "conv2d": "nn.Conv2d LoRA (DoRA, modules_to_save)",
    "conv3d": "nn.Conv3d LoRA",
    "pissa": 'init_lora_weights="pissa", saved unconverted',
    "pissa-converted": "PiSSA converted by PEFT (rank 2r)",
    "pissa-niter": 'init_lora_weights="pissa_niter_N" (randomised SVD)',
    "olora": 'init_lora_weights="olora", saved unconverted',
    "olora-converted": "OLoRA converted by PEFT (rank 2r)",
    "alora": "aLoRA (alora_invocation_tokens)",
    "layer-replication": "layer_replication",
    "bdlora": "BD-LoRA (block-diagonal factors)",
    "kasa": "KaSA (lora_diag, truncated base)",
}


def _outcome(cases: list, field: str) -> str:
    refused = [c for c in cases if getattr(c, field) == "refuse"]
    if not refused:
        return "exact"
    reason = next((c.notes for c in refused if c.notes), ", ".join(refused[0].needles))
    scope = "" if len(refused) == len(cases) else f" ({', '.join(c.arch for c in refused)})"
    return f"refused{scope}: {reason}"


def engine_outcomes(adapter: Path, base: Path) -> str:
    """Which engine profiles take the adapter `convert --engine E --base B` would write."""
    from loramerge.adapter_checks import read_checked
    from loramerge.engines.profiles import BaseFacts, apply_engine, engine_profile
    from loramerge.errors import LoramergeError
    from loramerge.model.folder import base_config_of, open_base
    from loramerge.model.rename import rename_to_base

    fitted = rename_to_base(read_checked(adapter), base)
    facts = BaseFacts(base_config_of(base), lambda name: open_base(base).read_tensor(name))
    taken: list[str] = []
    refused: dict[str, list[str]] = {}  # reason -> engines
    for engine in ENGINES:
        try:
            apply_engine(fitted, engine, engine_profile(engine).formats[0], facts)
            taken.append(engine)
        except LoramergeError as error:
            # "vLLM cannot serve DoRA (2 entries have it)" -> "DoRA"
            reason = error.message.split(" (")[0].split(" cannot serve ")[-1]
            refused.setdefault(reason, []).append(engine)
    if not refused:
        return "all"
    parts = ["takes " + ", ".join(taken)] if taken else []
    parts += [f"{', '.join(engines)}: no {reason}" for reason, engines in refused.items()]
    return "; ".join(parts)


def table(adapter_for: Callable, base_for: Callable) -> str:
    from architectures import CASES

    by_option: dict[str, list] = {}
    for case in CASES:
        by_option.setdefault(case.option, []).append(case)
    rows = ["| option | what | architectures | merge | convert | engines (first architecture) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for option, cases in by_option.items():
        first = cases[0]
        engines = engine_outcomes(adapter_for(first), base_for(first))
        archs = ", ".join(c.arch for c in cases)
        if len(cases) > 8:
            archs = f"all {len(cases)}"
        rows.append(
            f"| `{option}` | {OPTIONS[option]} | {archs} | {_outcome(cases, 'merge')} | "
            f"{_outcome(cases, 'convert')} | {engines} |"
        )
    return "\n".join(rows) + "\n"


def block(text: str) -> str | None:
    found = _BLOCK.search(text)
    return found.group(2) if found else None


def _build(root: Path) -> tuple[Callable, Callable]:
    from architectures import ARCH, build_adapter, save_base

    bases: dict[str, Path] = {}

    def base_for(case):
        if case.arch not in bases:
            bases[case.arch] = save_base(ARCH[case.arch], root / "bases" / case.arch)
        return bases[case.arch]

    def adapter_for(case):
        return build_adapter(case, base_for(case), root / "adapters" / case.id)

    return adapter_for, base_for


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as temp:
        made = table(*_build(Path(temp)))
    text = PAGE.read_text()
    PAGE.write_text(_BLOCK.sub(lambda m: m.group(1) + made + m.group(3), text))


if __name__ == "__main__":
    main()

"""`loramerge truncate`: DyLoRA prefixes and SVD reduction against float64 formulas and PEFT.

Oracles written here, independently of loramerge: the fixture's factors read with safetensors,
the DyLoRA update (alpha / b) * B[:, :b] @ A[:b] in float64, a DyLoRA forward built from forward
hooks on the transformers model, torch.linalg.svd of the formed update, and PEFT's PeftModel.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import (
    ADAPTERS,
    BASES,
    FIXTURES,
    assert_usage_error,
    kohya_dylora_with_unit,
    load_causal_lm,
    token_ids,
)
from oracles import (
    PLANTED,
    PeftOracle,
    assert_logits_match,
    base_logits,
    load64,
    logits64,
    logits_with_deltas,
    reference_from_updates,
    reference_logits,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DYLORA = FIXTURES / "dylora"
OFFICIAL = DYLORA / "official"
KOHYA_DY = DYLORA / "kohya-dylora.safetensors"
LLAMA = BASES / "llama"
ALPHA = 8.0  # the fixture's training alpha (fixtures/builders_dylora.py)
R_MAX = 8
LAYOUTS = ["official", "kohya"]
F32 = torch.float32


# ---------------------------------------------------------------- independent oracles


def fixture_factors(layout: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module path -> (A (r x in), B (out x r), alpha), straight from the fixture files."""
    official = load_file(OFFICIAL / "adapter.safetensors")
    paths = sorted({key.rsplit(".", 1)[0] for key in official})
    if layout == "official":
        return {p: (official[f"{p}.lora_A"], official[f"{p}.lora_B"], ALPHA) for p in paths}
    kohya = load_file(KOHYA_DY)
    found = {}
    for path in paths:
        name = "lora_te_" + path.replace(".", "_")
        alpha = float(kohya[f"{name}.alpha"])
        found[path] = (kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], alpha)
    return found


def dylora_update(lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float, b: int):
    """DyLoRA's rank-b update in float64: (alpha / b) * B[:, :b] @ A[:b]."""
    return (alpha / b) * (lora_b[:, :b].double() @ lora_a[:b].double())


def _pattern(patterns: dict, path: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def peft_updates(folder) -> dict[str, tuple[int, torch.Tensor]]:
    """module path -> (r, s * B @ A in float64) as a PEFT config + weights file describe it."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    found = {}
    for key, lora_a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = _pattern(config.get("rank_pattern") or {}, path, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
        assert lora_a.shape[0] == r
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        found[path] = (r, scale * (lora_b.double() @ lora_a.double()))
    return found


def kohya_updates(file) -> dict[str, tuple[int, torch.Tensor]]:
    """kohya module name -> (r, alpha / r * up @ down in float64)."""
    tensors = load_file(file)
    found = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up, alpha = tensors[f"{name}.lora_up.weight"], float(tensors[f"{name}.alpha"])
            found[name] = (down.shape[0], alpha / down.shape[0] * (up.double() @ down.double()))
    return found


def hooked_logits(updates: dict, ids: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """The base model in float64 with s * B @ A added to each module's weight; `updates` maps
    module path -> (A, B, s); `factor` multiplies every s (the planted error)."""
    deltas = {
        f"{path}.weight": factor * scale * (lora_b.double() @ lora_a.double())
        for path, (lora_a, lora_b, scale) in updates.items()
    }
    return logits_with_deltas(LLAMA, deltas, ids)


def dylora_updates(layout: str, b: int) -> dict:
    """module path -> (A[:b], B[:, :b], alpha / b): DyLoRA's rank-b adapter, from the files."""
    factors = fixture_factors(layout)
    return {p: (a[:b], bb[:, :b], alpha / b) for p, (a, bb, alpha) in factors.items()}


def dylora_logits(layout: str, b: int, ids: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """Our own DyLoRA forward at rank b: W x + (alpha / b) B[:, :b] A[:b] x, in float64."""
    return hooked_logits(dylora_updates(layout, b), ids, factor)


def train_chunks(length: int = 32) -> torch.Tensor:
    """train.txt tokenised by the base's tokenizer, as (n, 32) chunks like the fixture builder."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(LLAMA)((FIXTURES / "text" / "train.txt").read_text())
    ids = torch.tensor(ids["input_ids"])
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


def _run(cli, *args):
    result = cli("truncate", *args, "--quiet")
    assert result.exit_code == 0, result.output
    return result


def _json(cli, *args) -> dict:
    return json.loads(_run(cli, *args, "--json").stdout)


def _user_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _source(layout: str) -> list:
    return [OFFICIAL, "--alpha", ALPHA] if layout == "official" else [KOHYA_DY]


# ---------------------------------------------------------------- reading


def test_formats_are_detected_and_agree():
    from loramerge.formats.registry import INPUT_FORMATS, detect, read_adapter

    assert detect(OFFICIAL).name == "dylora"
    assert detect(OFFICIAL / "adapter.safetensors").name == "dylora"
    assert detect(KOHYA_DY).name == "kohya-dylora"
    others = [*(p for p in ADAPTERS.iterdir() if p.is_dir()), FIXTURES / "kohya" / "llama-lora"]
    dylora_sniffers = [e for e in INPUT_FORMATS if e.name in ("dylora", "kohya-dylora")]
    for path in [*others, FIXTURES / "kohya" / "llama-lora.safetensors", LLAMA]:
        assert not any(e.sniff(path) for e in dylora_sniffers), path
    official = read_adapter(OFFICIAL, options=_options(ALPHA))
    kohya = read_adapter(KOHYA_DY)
    assert kohya.metadata["dylora.unit"] == "1" and len(official.modules) == 16
    assert sorted(official.modules) == sorted(kohya.modules)
    for path, module in official.modules.items():
        assert module.r == R_MAX and module.alpha == ALPHA == kohya.modules[path].alpha
        assert torch.equal(module.lora_A.load(), kohya.modules[path].lora_A.load())


def _options(alpha):
    from loramerge.formats.registry import ReadOptions

    return ReadOptions(alpha=alpha)


def test_official_bin_is_read_like_safetensors(tmp_path):
    from loramerge.formats.registry import read_adapter

    state = load_file(OFFICIAL / "adapter.safetensors")
    torch.save(state, tmp_path / "dylora.bin")
    adapter = read_adapter(tmp_path / "dylora.bin", options=_options(ALPHA))
    assert adapter.source_format == "dylora" and len(adapter.modules) == len(state) // 2
    for path, module in adapter.modules.items():
        assert torch.equal(module.lora_B.load(), state[f"{path}.lora_B"])


# ---------------------------------------------------------------- the DyLoRA rule


@pytest.mark.oracle
@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncation_equals_dylora_formula_for_every_rank(cli, tmp_path, layout):
    out = tmp_path / "ranks"
    ranks = ",".join(str(b) for b in range(1, R_MAX + 1))
    _run(cli, *_source(layout), "--rank", ranks, "-o", out)
    factors = fixture_factors(layout)
    for b in range(1, R_MAX + 1):
        if layout == "official":  # official checkpoints become PEFT adapters
            written = peft_updates(out / f"rank-{b}")
            got = {path: written[path] for path in factors}
        else:  # kohya DyLoRA files stay kohya files
            written = kohya_updates(out / f"rank-{b}.safetensors")
            got = {p: written["lora_te_" + p.replace(".", "_")] for p in factors}
        assert len(written) == len(factors)
        for path, (lora_a, lora_b, alpha) in factors.items():
            r, update = got[path]
            expected = dylora_update(lora_a, lora_b, alpha, b)
            assert r == b
            assert expected.abs().max() > 0
            assert (update - expected).abs().max() <= 1e-12 * expected.abs().max(), (path, b)


@pytest.mark.oracle
@pytest.mark.parametrize("layout", LAYOUTS)
def test_peft_output_reproduces_dylora_forward(cli, tmp_path, layout):
    out = tmp_path / "ranks"
    _run(cli, *_source(layout), "--rank", "1,3,8", "--to", "peft", "-o", out)
    ids = token_ids(LLAMA)
    plain = base_logits(LLAMA, ids)
    full = dylora_logits(layout, R_MAX, ids)
    for b in (1, 3, 8):
        expected = dylora_logits(layout, b, ids)
        if b < R_MAX:
            assert (expected - full).abs().max() > 1e-3, "rank b must differ from full rank"
        got = PeftOracle(out / f"rank-{b}", LLAMA).logits(ids)
        planted = dylora_logits(layout, b, ids, 1 + PLANTED)
        assert_logits_match(got, expected, planted, plain, f"rank {b}")


def test_truncated_losses_stay_in_band(cli, tmp_path):
    """Band: every rank beats the base model on train.txt, more rank helps overall
    (loss at b=1 > loss at r_max), and full rank is within 0.05 of the best rank."""
    from peft import PeftModel

    out = tmp_path / "ranks"
    _run(cli, *_source("official"), "--rank", ",".join(map(str, range(1, R_MAX + 1))), "-o", out)
    chunks = train_chunks()

    def loss(model) -> float:
        with torch.no_grad():
            return float(model(input_ids=chunks, labels=chunks).loss)

    base = load_causal_lm(LLAMA)
    base_loss = loss(base)
    model = PeftModel.from_pretrained(base, out / "rank-1", adapter_name="1").eval()
    losses = {}
    for b in range(1, R_MAX + 1):
        if b > 1:
            model.load_adapter(out / f"rank-{b}", adapter_name=str(b))
        model.set_adapter(str(b))
        losses[b] = loss(model)
    shown = ", ".join(f"b={b}: {value:.4f}" for b, value in losses.items())
    print(f"\nDyLoRA fixture, train.txt loss: base {base_loss:.4f}; {shown}")
    assert all(value < base_loss for value in losses.values())
    assert losses[1] > losses[R_MAX]
    assert losses[R_MAX] <= min(losses.values()) + 0.05


@pytest.mark.oracle
def test_peft_declared_dylora_truncates_like_official(cli, tmp_path):
    full = tmp_path / "full"
    _run(cli, *_source("official"), "--rank", str(R_MAX), "-o", full)  # a PEFT DyLoRA adapter
    direct, declared = tmp_path / "direct", tmp_path / "declared"
    _run(cli, *_source("official"), "--rank", "3", "-o", direct)
    _run(cli, full, "--method", "dylora", "--rank", "3", "-o", declared)
    a, b = peft_updates(direct), peft_updates(declared)
    assert a.keys() == b.keys() == set(fixture_factors("official"))
    for path, (lora_a, lora_b, alpha) in fixture_factors("official").items():
        expected = dylora_update(lora_a, lora_b, alpha, 3)
        assert a[path][0] == b[path][0] == 3
        assert (b[path][1] - expected).abs().max() <= 1e-12 * expected.abs().max(), path
        assert torch.equal(a[path][1], b[path][1])
    result = cli("truncate", full, "--method", "prefix", "--rank", "3", "-o", tmp_path / "x")
    _user_error(result, "not DyLoRA", "--method dylora")


# ---------------------------------------------------------------- options and outputs


def test_bad_ranks(cli, tmp_path):
    out = tmp_path / "out.safetensors"
    assert_usage_error(cli("truncate", KOHYA_DY, "--rank", "0", "-o", out), "at least 1")
    _user_error(cli("truncate", KOHYA_DY, "--rank", "9", "-o", out), "above", "r_max = 8")
    assert_usage_error(cli("truncate", KOHYA_DY, "--rank", "four", "-o", out), "'--rank'")
    folder = tmp_path / "out"
    _user_error(cli("truncate", ADAPTERS / "llama-lora", "--rank", "9", "-o", folder), "r_max = 8")
    assert not out.exists() and not folder.exists()
    # a file trained with unit 2: rank 3 was never a trained prefix -> a warning, still written
    unit2 = kohya_dylora_with_unit(tmp_path, 2)
    result = cli("truncate", unit2, "--rank", "3", "-o", tmp_path / "r3.safetensors")
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "not a multiple of the DyLoRA unit 2" in result.output
    result = cli("truncate", unit2, "--rank", "4", "-o", tmp_path / "r4.safetensors")
    assert result.exit_code == 0 and "warning" not in result.output


def test_official_needs_alpha(cli, tmp_path):
    out = tmp_path / "out"
    _user_error(cli("truncate", OFFICIAL, "--rank", "4", "-o", out), "--alpha is needed")
    _user_error(cli("inspect", OFFICIAL), "--alpha is needed")
    result = cli("truncate", KOHYA_DY, "--alpha", "8", "--rank", "4", "-o", out)
    _user_error(result, "--alpha 8.0: is for official DyLoRA")
    assert not out.exists()


def test_kohya_output_keeps_metadata(cli, tmp_path):
    out = tmp_path / "dy4.safetensors"
    _run(cli, KOHYA_DY, "--rank", "4", "-o", out)
    with safe_open(KOHYA_DY, "pt") as handle:
        before = handle.metadata()
    with safe_open(out, "pt") as handle:
        after = handle.metadata()
        names = list(handle.keys())
        alphas = {float(handle.get_tensor(n)) for n in names if n.endswith(".alpha")}
        ranks = {handle.get_tensor(n).shape[0] for n in names if n.endswith(".lora_down.weight")}
    assert after["ss_network_dim"] == "4" and ranks == {4} and alphas == {ALPHA}
    for key, value in before.items():
        if key != "ss_network_dim":
            assert after[key] == value, key
    assert after["ss_network_module"] == "networks.dylora"
    assert all(name.startswith("lora_te_model_layers_") for name in names)
    # SVD output is a plain LoRA: no longer DyLoRA, no unit
    svd = tmp_path / "svd.safetensors"
    _run(cli, KOHYA_DY, "--method", "svd", "--rank", "4", "-o", svd)
    with safe_open(svd, "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert "unit" not in json.loads(meta["ss_network_args"]) and meta["ss_network_alpha"] == "4.0"


def test_two_ranks_write_two_outputs(cli, tmp_path):
    out = tmp_path / "out"
    report = _json(cli, *_source("official"), "--rank", "8,4", "-o", out)
    assert sorted(p.name for p in out.iterdir()) == ["rank-4", "rank-8"]
    assert [o["rank"] for o in report["outputs"]] == [4, 8]
    for b in (4, 8):
        config = json.loads((out / f"rank-{b}" / "adapter_config.json").read_text())
        assert config["r"] == b and config["lora_alpha"] == ALPHA and not config["rank_pattern"]
    kohya_out = tmp_path / "kohya"
    _run(cli, KOHYA_DY, "--rank", "2,6", "-o", kohya_out)
    assert sorted(p.name for p in kohya_out.iterdir()) == [
        "rank-2.safetensors",
        "rank-6.safetensors",
    ]
    result = cli("truncate", KOHYA_DY, "--rank", "2,6", "-o", kohya_out)
    _user_error(result, "already exists", "--force")


@pytest.mark.oracle
def test_merge_of_a_truncated_rank_is_the_dylora_update_rounded_once(cli, tmp_path):
    """--merge at rank 3 writes the base plus DyLoRA's rank-3 update (alpha / 3)
    B[:, :3] A[:3], formed from the fixture files in float32 in PEFT's order and rounded once,
    bit for bit; its logits equal that reference's (1e-8 x the effect, which a 1e-6 scale
    error exceeds)."""
    merged = tmp_path / "merged"
    args = ["--rank", "3", "--base", LLAMA, "--merge", "--dtype", "float32", "-o", merged]
    _run(cli, *_source("official"), *args)
    updates = {
        f"{path}.weight": (lora_b, lora_a, scale)
        for path, (lora_a, lora_b, scale) in dylora_updates("official", 3).items()
    }
    reference = reference_from_updates(LLAMA, updates)
    written = {}
    for shard in merged.glob("*.safetensors"):
        written.update(load_file(shard))
    assert set(written) == set(reference)
    for name, value in reference.items():
        assert torch.equal(written[name].view(torch.int32), value.view(torch.int32)), name
    ids = token_ids(LLAMA)
    planted_updates = {n: (b, a, s * (1 + PLANTED)) for n, (b, a, s) in updates.items()}
    planted = reference_logits(merged, reference_from_updates(LLAMA, planted_updates), F32, ids)
    expected = reference_logits(merged, reference, F32, ids)
    got = logits64(load64(merged), ids)
    plain = base_logits(LLAMA, ids)
    assert_logits_match(got, expected, planted, plain, "truncate --merge", 1e-8)
    assert_usage_error(cli("truncate", KOHYA_DY, "--rank", "3", "--merge", "-o", merged), "--base")


# ---------------------------------------------------------------- SVD reduction


def _random_adapter(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A small PEFT adapter with mixed shapes and ranks (r 2..8, alpha 12): path -> (A, B, s)."""
    g = torch.Generator().manual_seed(7)
    shapes = {  # path: (out, in, r)
        "model.layers.0.self_attn.q_proj": (24, 40, 8),
        "model.layers.0.self_attn.k_proj": (40, 24, 6),
        "model.layers.0.self_attn.v_proj": (16, 16, 8),
        "model.layers.0.mlp.down_proj": (12, 30, 2),
    }
    tensors, found, rank_pattern = {}, {}, {}
    for path, (out, inp, r) in shapes.items():
        lora_a, lora_b = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora_b
        found[path] = (lora_a, lora_b, 12.0 / r)
        if r != 8:
            rank_pattern[path] = r
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 12, "rank_pattern": rank_pattern}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return found


def _llama_lora_factors():
    config = json.loads((ADAPTERS / "llama-lora" / "adapter_config.json").read_text())
    tensors = load_file(ADAPTERS / "llama-lora" / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    found = {}
    for key, lora_a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            found[path] = (lora_a, tensors[key.replace(".lora_A.", ".lora_B.")], scale)
    return found


@pytest.mark.oracle
@pytest.mark.parametrize("case", ["random-small", "llama-lora"])
def test_svd_reduction_matches_full_svd(cli, tmp_path, case):
    if case == "random-small":
        source = tmp_path / "adapter"
        factors = _random_adapter(source)
    else:
        source, factors = ADAPTERS / "llama-lora", _llama_lora_factors()
    out, k = tmp_path / "out", 3
    report = _json(cli, source, "--rank", str(k), "-o", out)
    rows = {row["module"]: row for row in report["outputs"][0]["modules"]}
    written = peft_updates(out)
    assert report["method"] == "svd" and written.keys() == factors.keys()
    for path, (lora_a, lora_b, scale) in factors.items():
        update = scale * (lora_b.double() @ lora_a.double())
        S = torch.linalg.svdvals(update)
        kept = min(k, lora_a.shape[0])
        r, reduced = written[path]
        assert r == kept == rows[path]["rank_after"]
        got = torch.linalg.svdvals(reduced)[:kept]
        assert torch.allclose(got, S[:kept], rtol=1e-5, atol=1e-5 * float(S[0]))
        norm = float(torch.linalg.matrix_norm(update))
        error = float(torch.linalg.matrix_norm(update - reduced)) / norm
        expected = float(S[kept:].square().sum().sqrt()) / norm
        # 1e-5 relative, plus a floor for the float32 storage of the written factors (an exact
        # refactorisation, kept = r, has expected error 0 and a float32 round-off of ~1e-7)
        assert abs(error - expected) <= 1e-5 * expected + 1e-6, (path, error, expected)
        assert abs(rows[path]["relative_error"] - expected) <= 1e-5 * expected + 1e-12
        energy = float(S[:kept].square().sum() / S.square().sum())
        assert abs(rows[path]["energy_kept"] - energy) <= 1e-5


# (adapter, base, largest rank): rsLoRA + patterns, bias + Conv1D, DoRA, embedding
FULL_RANK_CASES = [
    ("llama-rslora-patterns", "llama", 12),
    ("gpt2-lora", "gpt2", 8),
    ("llama-dora", "llama", 4),
    ("llama-tied-embedding", "llama-tied", 4),
]


@pytest.mark.oracle
@pytest.mark.parametrize(("adapter", "base", "rank"), FULL_RANK_CASES, ids=lambda c: str(c))
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_svd_at_full_rank_keeps_the_model(cli, tmp_path, adapter, base, rank):
    """Reduction to the largest rank is an exact refactorisation: with the scales folded into
    the factors (r = alpha, no rsLoRA, bias times the old scale), PEFT gives the same logits."""
    out = tmp_path / "out"
    report = _json(cli, ADAPTERS / adapter, "--method", "svd", "--rank", str(rank), "-o", out)
    assert max(row["relative_error"] for row in report["outputs"][0]["modules"]) < 1e-6
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config["use_rslora"]
    ids = token_ids(BASES / base)
    oracle = PeftOracle(ADAPTERS / adapter, BASES / base)
    expected, planted = oracle.logits(ids), oracle.logits(ids, 1 + PLANTED)
    plain = base_logits(BASES / base, ids)
    got = PeftOracle(out, BASES / base).logits(ids)
    # the reduced factors are float32 products (up to 2.2e-7 x the effect on the logits); DoRA
    # makes a 1e-6 scale error move them by only 6.7e-7 x: 4e-7 sits between the two
    assert_logits_match(got, expected, planted, plain, f"{adapter} at full rank", 4e-7)


@pytest.mark.oracle
def test_energy_picks_ranks_via_rank_pattern(cli, tmp_path):
    from peft.tuners.lora import LoraLayer

    out = tmp_path / "out"
    _run(cli, ADAPTERS / "llama-lora", "--energy", "0.9", "-o", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"], "per-module ranks must be written with rank_pattern"
    expected_ranks = {}
    for path, (lora_a, lora_b, scale) in _llama_lora_factors().items():
        S = torch.linalg.svdvals(scale * (lora_b.double() @ lora_a.double()))
        share = torch.cumsum(S.square(), 0) / S.square().sum()
        expected_ranks[path] = int((share < 0.9 - 1e-12).sum()) + 1
    assert len(set(expected_ranks.values())) > 1
    oracle = PeftOracle(out, LLAMA)
    built = {
        name.removeprefix("base_model.model."): layer.r["default"]
        for name, layer in oracle.model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    assert built == expected_ranks
    ids = token_ids(LLAMA)
    got = oracle.logits(ids)
    tensors = load_file(out / "adapter_model.safetensors")
    updates = {}
    for path in expected_ranks:  # r = alpha: the reduced factors apply with scale 1
        stem = f"base_model.model.{path}"
        updates[path] = (tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"], 1.0)
    expected = hooked_logits(updates, ids)
    planted = hooked_logits(updates, ids, 1 + PLANTED)
    plain = base_logits(LLAMA, ids)
    assert_logits_match(got, expected, planted, plain, "PEFT reading the rank_pattern")
    capped = tmp_path / "capped"
    report = _json(
        cli, ADAPTERS / "llama-lora", "--energy", "0.999", "--max-rank", "3", "-o", capped
    )
    assert {row["rank_after"] for row in report["outputs"][0]["modules"]} == {3}


def test_option_conflicts(cli, tmp_path):
    out = tmp_path / "out"
    lora = ADAPTERS / "llama-lora"
    assert_usage_error(cli("truncate", lora, "-o", out), "'--rank'", "--energy")
    result = cli("truncate", lora, "--rank", "4", "--energy", "0.9", "-o", out)
    assert_usage_error(result, "'--rank'", "cannot be combined with --energy")
    result = cli("truncate", lora, "--rank", "4", "--max-rank", "3", "-o", out)
    assert_usage_error(result, "'--max-rank'", "needs --energy")
    assert_usage_error(cli("truncate", lora, "--energy", "1.5", "-o", out), "(0, 1]")
    result = cli("truncate", KOHYA_DY, "--method", "prefix", "--energy", "0.9", "-o", out)
    assert_usage_error(result, "--method svd")
    result = cli("truncate", lora, "--rank", "4", "--dtype", "float16", "-o", out)
    assert_usage_error(result, "'--dtype'", "needs --merge")
    assert not out.exists()


# ---------------------------------------------------------------- inspect


@pytest.mark.oracle
def test_inspect_shows_update_size_per_rank(cli):
    result = cli("inspect", KOHYA_DY, "--json")
    assert result.exit_code == 0, result.output
    sizes = json.loads(result.stdout)["dylora_ranks"]
    assert [s["rank"] for s in sizes] == list(range(1, R_MAX + 1))
    factors = fixture_factors("kohya")
    full = {p: dylora_update(a, b, alpha, R_MAX) for p, (a, b, alpha) in factors.items()}
    full_norm = math.sqrt(sum(float(u.square().sum()) for u in full.values()))
    for size in sizes:
        b = size["rank"]
        cut = {p: dylora_update(a, bb, alpha, b) for p, (a, bb, alpha) in factors.items()}
        norm = math.sqrt(sum(float(u.square().sum()) for u in cut.values()))
        change = math.sqrt(sum(float((cut[p] - full[p]).square().sum()) for p in cut))
        assert abs(size["update_norm"] - norm) <= 1e-9 * norm
        assert abs(size["change_from_full"] - change / full_norm) <= 1e-9
    assert sizes[-1]["change_from_full"] == pytest.approx(0.0, abs=1e-12)
    table = cli("inspect", OFFICIAL, "--alpha", "8")
    assert table.exit_code == 0 and "DyLoRA update size by rank b" in table.output

"""`loramerge fold` on the COLA fixture chain, against oracles written here or taken from PEFT.

References are computed from the link files directly (safetensors + adapter_config.json), never
through loramerge: the exact fold in float64, the float32-accumulated fold, PEFT's sequential
merge_and_unload in bf16, and the three links applied live at once with PEFT.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import BASES, FIXTURES, assert_usage_error, token_ids
from oracles import (
    PLANTED,
    PeftOracle,
    assert_logits_match,
    base_logits,
    half_ulp_bf16,
    load64,
    logits64,
    round_bf16,
)
from oracles import bits as _bits
from safetensors.torch import load_file, save_file

CHAIN = FIXTURES / "cola"
LINKS = [CHAIN / f"link-{i}" for i in (1, 2, 3)]
BASE = BASES / "llama"
PREFIX = "base_model.model."

pytestmark = pytest.mark.skipif(not CHAIN.exists(), reason="fixtures/cola not built")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def _link_terms(
    link: Path, weight: float = 1.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """weight name -> (B, A, s) of one plain PEFT link (uniform r and alpha, as the fixtures)."""
    config = json.loads((link / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    scale = config["lora_alpha"] / config["r"] * weight
    weights = load_file(link / "adapter_model.safetensors")
    terms = {}
    for key, lora_a in weights.items():
        if key.endswith(".lora_A.weight"):
            path = key[len(PREFIX) : -len(".lora_A.weight")]
            terms[path + ".weight"] = (weights[key.replace("lora_A", "lora_B")], lora_a, scale)
    return terms


def _chain_terms(weights=(1.0, 1.0, 1.0)):
    chain: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for link, weight in zip(LINKS, weights, strict=True):
        for name, term in _link_terms(link, weight).items():
            chain.setdefault(name, []).append(term)
    return chain


def _fold(cli, out: Path, *args) -> Path:
    result = cli("fold", *args, "--base", BASE, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def _assert_user_error(result, out: Path, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))
    return lines[0]


def test_chain_fixture_has_three_links_on_one_base():
    manifest = json.loads((CHAIN / "cola_chain.json").read_text())
    assert [entry["path"] for entry in manifest["links"]] == ["link-1", "link-2", "link-3"]
    for link in LINKS:
        config = json.loads((link / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "fixtures/bases/llama"
        for name, (lora_b, _, _) in _link_terms(link).items():
            assert lora_b.abs().max() > 0, (link, name)


@pytest.mark.oracle
def test_once_rounded_fold_is_the_float64_sum_rounded_once(cli, tmp_path):
    out = _fold(cli, tmp_path / "folded", CHAIN)
    written, base = _tensors(out), _tensors(BASE)
    chain = _chain_terms()
    assert set(chain) == {n for n in base if "q_proj" in n or "v_proj" in n or "o_proj" in n}
    mismatched = total = 0
    for name, original in base.items():
        got = written[name]
        assert got.dtype == torch.bfloat16
        if name not in chain:
            assert torch.equal(_bits(got), _bits(original)), f"{name} must be copied as is"
            continue
        terms = chain[name]
        exact = original.double() + sum(s * (b.double() @ a.double()) for b, a, s in terms)
        # the definition: base upcast, plus the whole chain's update accumulated in float32
        # (one float32 product of the concatenated factors, scales applied in float64), rounded
        # once
        cat_b = torch.cat([b for b, _, _ in terms], dim=1)
        cat_a = torch.cat([(s * a.double()).float() for _, a, s in terms], dim=0)
        accumulated = original.float() + cat_b @ cat_a
        assert torch.equal(_bits(got), _bits(accumulated.to(torch.bfloat16))), name
        assert not torch.equal(_bits(got), _bits(original)), f"{name} must change"
        # against float64: correctly rounded, except where float32 accumulation error (bounded
        # by a few float32 epsilons of the terms' magnitudes) reaches across a rounding midpoint
        correct = round_bf16(exact)
        off = _bits(got) != _bits(correct)
        mismatched += int(off.sum())
        total += got.numel()
        magnitude = original.double().abs() + sum(
            abs(s) * (b.double().abs() @ a.double().abs()) for b, a, s in terms
        )
        bound = half_ulp_bf16(got) + 8 * 2.0**-24 * magnitude
        error = (got.double() - exact).abs()
        assert bool((error <= bound).all()), name
        assert bool((error[~off] <= half_ulp_bf16(got)[~off]).all()), name
    assert mismatched <= total * 1e-4, f"{mismatched} of {total} not the correct rounding"


@pytest.mark.oracle
def test_float32_fold_equals_float32_accumulation(cli, tmp_path):
    out = _fold(cli, tmp_path / "folded", *LINKS, "--dtype", "float32")
    written, base = _tensors(out), _tensors(BASE)
    for name, terms in _chain_terms().items():
        cat_b = torch.cat([b for b, _, _ in terms], dim=1)
        cat_a = torch.cat([(s * a.double()).float() for _, a, s in terms], dim=0)
        expected = base[name].float() + cat_b @ cat_a
        assert torch.equal(written[name], expected), name
        exact = base[name].double() + sum(s * (b.double() @ a.double()) for b, a, s in terms)
        assert (written[name].double() - exact).abs().max() <= 1e-6


@pytest.mark.oracle
def test_per_link_rounding_equals_sequential_peft_merges_in_bf16(cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "folded"
    result = cli("fold", CHAIN, "--base", BASE, "-o", out, "--rounding", "per-link", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # the oracle: tie every knot with PEFT in the bf16 model, link after link
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16)
    changed: list[dict[str, tuple[int, int]]] = []
    for link in LINKS:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        peft_model = PeftModel.from_pretrained(model, link)
        layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
        # PEFT's own dtype handling, which docs/rules.md section 5 describes
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert layer.base_layer.weight.dtype == torch.bfloat16
        model = peft_model.merge_and_unload()
        after = model.state_dict()
        changed.append(
            {
                name.removesuffix(".weight"): (
                    int((after[name] != before[name]).sum()),
                    after[name].numel(),
                )
                for name in _link_terms(link)
            }
        )
    expected = {k: v for k, v in model.state_dict().items()}
    written = _tensors(out)
    assert set(written) == set(expected)
    for name, value in expected.items():
        assert written[name].dtype == value.dtype == torch.bfloat16
        differ = int((_bits(written[name]) != _bits(value)).sum())
        assert differ == 0, f"{name}: {differ} elements differ from PEFT's sequential merges"
    # the reported share of each link's update that survived its knot is PEFT's too
    for link_report, oracle in zip(report["links"], changed, strict=True):
        for module, (count, size) in oracle.items():
            assert link_report["modules"][module]["changed_share"] == pytest.approx(count / size)
    assert report["links"][2]["changed_share"] < 0.6, "link 3 is small enough to be cut by bf16"
    assert report["tensors"]["merge"] == len(_chain_terms())
    assert not list(tmp_path.glob(".folded*")), "temporary link folders must be removed"


@pytest.mark.oracle
def test_per_link_report_norms_are_the_float64_norms(cli, tmp_path):
    result = cli("fold", CHAIN, "--base", BASE, "-o", tmp_path / "f", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for link, link_report in zip(LINKS, report["links"], strict=True):
        for name, (lora_b, lora_a, scale) in _link_terms(link).items():
            dense = scale * (lora_b.double() @ lora_a.double())
            got = link_report["modules"][name.removesuffix(".weight")]["update_norm"]
            assert got == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-9)
    for name, terms in _chain_terms().items():
        dense = sum(s * (b.double() @ a.double()) for b, a, s in terms)
        got = report["chain_update_norm"][name.removesuffix(".weight")]
        assert got == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-9)


@pytest.mark.oracle
def test_as_lora_loads_with_peft_and_gives_the_live_chains_logits(cli, tmp_path):
    """The chain as one adapter, read by PEFT (float64), gives the logits of the three links
    applied live at once by PEFT, within 5e-7 x the chain's effect (a 1e-6 scale error on the
    live chain falls outside)."""
    adapter = _fold(cli, tmp_path / "adapter", CHAIN, "--as-lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    ranks = {
        key[len(PREFIX) : -len(".lora_A.weight")]: value.shape[0]
        for key, value in tensors.items()
        if key.endswith(".lora_A.weight")
    }
    # v_proj is in every link (4 + 4 + 2), q_proj in links 1-2, o_proj in links 2-3
    assert {r for path, r in ranks.items() if "v_proj" in path} == {10}
    assert {r for path, r in ranks.items() if "q_proj" in path} == {8}
    assert {r for path, r in ranks.items() if "o_proj" in path} == {6}
    from peft.utils.other import get_pattern_key  # PEFT's own pattern matching

    for path, r in ranks.items():
        key = get_pattern_key(config["rank_pattern"].keys(), path)
        assert config["rank_pattern"].get(key, config["r"]) == r
        key = get_pattern_key(config["alpha_pattern"].keys(), path)
        assert config["alpha_pattern"].get(key, config["lora_alpha"]) == r

    ids = token_ids(BASE)
    live = PeftOracle(list(LINKS), BASE)
    expected, planted = live.logits(ids), live.logits(ids, 1 + PLANTED)
    got = PeftOracle(adapter, BASE).logits(ids)
    assert_logits_match(got, expected, planted, base_logits(BASE, ids), "--as-lora")


@pytest.mark.oracle
def test_as_lora_rank_keeps_the_reported_energy(cli, tmp_path):
    out = tmp_path / "adapter"
    result = cli("fold", CHAIN, "--base", BASE, "-o", out, "--as-lora", "--rank", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tensors = load_file(out / "adapter_model.safetensors")
    total_kept = total = 0.0
    for name, terms in _chain_terms().items():
        path = name.removesuffix(".weight")
        dense = sum(s * (b.double() @ a.double()) for b, a, s in terms)
        values = torch.linalg.svdvals(dense)
        kept = float((values[:3] ** 2).sum() / (values**2).sum())
        module = report["modules"][path]
        assert module["rank"] == 3
        assert module["energy_kept"] == pytest.approx(kept, rel=1e-9)
        # the factors written are the best rank-3 approximation (Eckart-Young): the error left
        # is the tail of the spectrum
        lora_b = tensors[f"{PREFIX}{path}.lora_B.weight"].double()
        lora_a = tensors[f"{PREFIX}{path}.lora_A.weight"].double()
        error = float(torch.linalg.matrix_norm(dense - lora_b @ lora_a))
        tail = float(values[3:].square().sum().sqrt())
        assert error == pytest.approx(tail, rel=1e-4, abs=1e-6)
        total_kept += kept * float(values.square().sum())
        total += float(values.square().sum())
    assert report["energy_kept"] == pytest.approx(total_kept / total, rel=1e-9)
    assert report["energy_kept"] < 1.0


def _train_chunks(base: Path, length: int = 32) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer((FIXTURES / "text" / "train.txt").read_text())["input_ids"]
    count = len(ids) // length
    return torch.tensor(ids[: count * length]).view(count, length)


def _loss(logits: torch.Tensor, chunks: torch.Tensor) -> float:
    """Mean next-token cross-entropy, in float64 (transformers' own loss is float32)."""
    logits = logits[:, :-1].double()
    targets = chunks[:, 1:].reshape(-1)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets))


@pytest.mark.oracle
def test_folded_model_loss_is_below_the_base_and_equals_the_live_chain(cli, tmp_path):
    """The float32 fold (float64 forward) has the loss of the three links applied live at once
    (PEFT, float64) within 4e-8 x the chain's improvement over the base (which is above 0.1):
    the float32 rounding of the folded weights moves it by ~1.3e-8 x, every scale off by 1e-6
    by ~1.4e-7 x, which the check shows it would see."""
    folded = _fold(cli, tmp_path / "folded", CHAIN, "--dtype", "float32")
    chunks = _train_chunks(BASE)
    base_loss = _loss(base_logits(BASE, chunks), chunks)
    folded_loss = _loss(logits64(load64(folded), chunks), chunks)
    live = PeftOracle(list(LINKS), BASE)
    live_loss = _loss(live.logits(chunks), chunks)
    planted_loss = _loss(live.logits(chunks, 1 + PLANTED), chunks)
    assert live_loss < base_loss - 0.1, (live_loss, base_loss)
    tolerance = 4e-8 * (base_loss - live_loss)
    assert abs(planted_loss - live_loss) > tolerance, "the check could not see a 1e-6 scale error"
    assert abs(folded_loss - live_loss) <= tolerance, (folded_loss, live_loss)


def test_link_list_equals_the_chain_folder_self_consistency(cli, tmp_path):
    """Self-consistency (two ways of naming the same chain); the folds themselves are checked
    against the float64 sum and PEFT above."""
    as_list = _tensors(_fold(cli, tmp_path / "list", *LINKS))
    as_folder = _tensors(_fold(cli, tmp_path / "folder", CHAIN))
    assert as_list.keys() == as_folder.keys()
    for name, value in as_list.items():
        assert torch.equal(_bits(value), _bits(as_folder[name])), name


@pytest.mark.oracle
def test_a_manifest_weight_multiplies_its_links_scale(cli, tmp_path):
    chain = tmp_path / "weighted"
    shutil.copytree(CHAIN, chain)
    manifest = json.loads((chain / "cola_chain.json").read_text())
    manifest["links"][1]["weight"] = 0.5
    (chain / "cola_chain.json").write_text(json.dumps(manifest))
    out = _fold(cli, tmp_path / "w", chain, "--dtype", "float32")
    written, base = _tensors(out), _tensors(BASE)
    for name, terms in _chain_terms((1.0, 0.5, 1.0)).items():
        exact = base[name].double() + sum(s * (b.double() @ a.double()) for b, a, s in terms)
        assert (written[name].double() - exact).abs().max() <= 1e-6, name
        unweighted = sum(s * (b.double() @ a.double()) for b, a, s in _chain_terms()[name])
        assert (written[name].double() - base[name].double() - unweighted).abs().max() > 1e-4


@pytest.mark.oracle
def test_a_manifest_weight_reaches_the_adapter_and_the_report(cli, tmp_path):
    """With weights, `--as-lora` writes the float64 weighted sum and the report measures each
    link's weighted update and the chain's weighted sum."""
    weights = (1.0, 0.5, -2.0)
    chain = tmp_path / "weighted"
    shutil.copytree(CHAIN, chain)
    manifest = json.loads((chain / "cola_chain.json").read_text())
    for entry, weight in zip(manifest["links"], weights, strict=True):
        entry["weight"] = weight
    (chain / "cola_chain.json").write_text(json.dumps(manifest))
    result = cli("fold", chain, "-o", tmp_path / "a", "--as-lora", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name, terms in _chain_terms(weights).items():
        path = name.removesuffix(".weight")
        exact = sum(s * (b.double() @ a.double()) for b, a, s in terms)
        lora_b = tensors[f"{PREFIX}{path}.lora_B.weight"].double()
        lora_a = tensors[f"{PREFIX}{path}.lora_A.weight"].double()
        assert (lora_b @ lora_a - exact).abs().max() <= 1e-6 * exact.abs().max(), name
        norm = float(torch.linalg.matrix_norm(exact))
        assert report["chain_update_norm"][path] == pytest.approx(norm, rel=1e-9), name
    for link, weight, link_report in zip(LINKS, weights, report["links"], strict=True):
        for name, (lora_b, lora_a, scale) in _link_terms(link, weight).items():
            dense = scale * (lora_b.double() @ lora_a.double())
            got = link_report["modules"][name.removesuffix(".weight")]["update_norm"]
            assert got == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-9)


def _broken_link(tmp_path: Path, module: str) -> Path:
    """A copy of link 2 whose `module` A factor has 3 more input columns than the base."""
    link = tmp_path / "broken-link"
    shutil.copytree(LINKS[1], link)
    weights = load_file(link / "adapter_model.safetensors")
    key = f"{PREFIX}{module}.lora_A.weight"
    weights[key] = torch.cat([weights[key], torch.zeros(weights[key].shape[0], 3)], dim=1)
    save_file(weights, link / "adapter_model.safetensors")
    return link


def test_link_that_does_not_fit_the_base_is_refused(cli, tmp_path):
    module = "model.layers.1.self_attn.q_proj"
    link = _broken_link(tmp_path, module)
    out = tmp_path / "out"
    result = cli("fold", LINKS[0], link, LINKS[2], "--base", BASE, "-o", out)
    _assert_user_error(result, out, "link 2", module, str(link), "[64, 67]")
    # without a base, the links are checked against each other
    result = cli("fold", LINKS[0], link, "-o", out, "--as-lora")
    _assert_user_error(result, out, "link 2", module, "link 1")


def test_links_naming_different_base_models_warn(cli, tmp_path):
    link = tmp_path / "other-base"
    shutil.copytree(LINKS[2], link)
    config = json.loads((link / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (link / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = cli("fold", LINKS[0], LINKS[1], link, "--base", BASE, "-o", out)
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and "different base models" in result.stderr
    assert "someone/another-model" in result.stderr
    same = cli("fold", *LINKS, "--base", BASE, "-o", tmp_path / "same")
    assert same.exit_code == 0 and "different base models" not in same.stderr


@pytest.mark.parametrize("escape", ["../outside", "/etc", "inside/../../outside", "link"])
def test_manifest_paths_must_stay_in_the_folder(cli, tmp_path, escape):
    outside = tmp_path / "outside"
    shutil.copytree(LINKS[0], outside)
    chain = tmp_path / "chain"
    shutil.copytree(CHAIN, chain)
    if escape == "link":  # a symlink inside the folder that points outside it
        (chain / "link").symlink_to(outside, target_is_directory=True)
    manifest = json.loads((chain / "cola_chain.json").read_text())
    manifest["links"][0]["path"] = escape
    (chain / "cola_chain.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    result = cli("fold", chain, "--base", BASE, "-o", out)
    _assert_user_error(result, out, "cola_chain.json", "links[0].path")


def test_manifest_is_checked(cli, tmp_path):
    chain = tmp_path / "chain"
    shutil.copytree(CHAIN, chain)
    out = tmp_path / "out"
    for bad, needle in [
        ({"format": "other", "version": 1, "links": [{"path": "link-1"}]}, "format"),
        (
            {"format": "loramerge-cola-chain", "version": 9, "links": [{"path": "link-1"}]},
            "version",
        ),
        ({"format": "loramerge-cola-chain", "version": 1, "links": []}, "non-empty"),
        (
            {
                "format": "loramerge-cola-chain",
                "version": 1,
                "links": [{"path": "link-1", "wieght": 2}],
            },
            "wieght",
        ),
        (
            {
                "format": "loramerge-cola-chain",
                "version": 1,
                "links": [{"path": "link-1", "weight": "x"}],
            },
            "weight",
        ),
    ]:
        (chain / "cola_chain.json").write_text(json.dumps(bad))
        _assert_user_error(cli("fold", chain, "--base", BASE, "-o", out), out, needle)


def test_dora_link_is_refused(cli, tmp_path):
    out = tmp_path / "out"
    dora = FIXTURES / "adapters" / "llama-dora"
    result = cli("fold", LINKS[0], dora, "--base", BASE, "-o", out)
    _assert_user_error(result, out, "link 2", "DoRA")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--rank", "2"), ("'--rank'", "needs --as-lora")),
        (("--as-lora", "--rounding", "per-link"), ("'--rounding'", "--as-lora")),
        (("--rounding", "twice"), ("'--rounding twice'", "once, per-link")),
        (("--as-lora", "--rank", "0"), ("'--rank 0'", "at least 1")),
        (("--max-shard-size", "2"), ("'--max-shard-size'", "needs a unit")),
    ],
)
def test_option_errors(cli, tmp_path, args, needles):
    out = tmp_path / "out"
    assert_usage_error(cli("fold", CHAIN, "--base", BASE, "-o", out, *args), *needles)
    assert not out.exists()


def test_output_inside_the_chain_is_refused(cli, tmp_path):
    chain = tmp_path / "chain"
    shutil.copytree(CHAIN, chain)
    out = chain / "folded"
    result = cli("fold", chain, "--base", BASE, "-o", out)
    assert result.exit_code == 1 and "inside" in result.output
    assert not out.exists()


@pytest.mark.oracle
def test_library_reports_match_the_math():
    """ops.fold on the fixture links: the folded factors reproduce the float64 sum."""
    from loramerge.formats.cola_chain import read_chain
    from loramerge.ops.cola_fold import fold_chain

    chain = read_chain([CHAIN])
    folded = fold_chain([(link.adapter, link.weight) for link in chain.links], dtype=torch.float64)
    for name, terms in _chain_terms().items():
        module = folded.adapter.modules[name.removesuffix(".weight")]
        assert module.scale == 1.0 and module.r == sum(a.shape[0] for _, a, _ in terms)
        assert module.lora_A.dtype == module.lora_B.dtype == torch.float64
        dense = sum(s * (b.double() @ a.double()) for b, a, s in terms)
        got = module.lora_B.load() @ module.lora_A.load()
        assert math.isclose(float((got - dense).abs().max()), 0.0, abs_tol=1e-12)


def test_failed_per_link_fold_leaves_nothing_behind(tmp_path):
    """A failure in a later link's merge removes the temporary knots and writes no OUT."""
    from loramerge.jobs.fold_load import load_chain
    from loramerge.jobs.fold_model import fold_to_model

    chain, _ = load_chain([CHAIN], BASE)
    out = tmp_path / "out"
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if done * 3 > total * 2:  # inside the last link's merge
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        fold_to_model(chain, BASE, out, rounding="per-link", progress=progress)
    assert calls, "the merge must have started"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_library_does_not_import_the_terminal():
    import subprocess
    import sys

    code = "import loramerge.jobs.fold, sys; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "typer" not in loaded and "rich" not in loaded

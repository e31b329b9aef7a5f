"""`loramerge reslora` against float64 evaluations of docs/rules.md section 4, PEFT and
transformers.

The oracles here are written independently of loramerge: the checkpoints are read with
torch.load, the expected deltas are formed as full float64 matrices from the rules' formulas,
the written adapters are evaluated through PEFT's own layers, and the ResLoRA training-time
forward is a second implementation (wrapper modules around the base's linears, full matrices).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import BASES, FIXTURES, assert_usage_error, load_causal_lm, token_ids
from oracles import (
    PLANTED,
    assert_logits_match,
    base_logits,
    bits,
    half_ulp_bf16,
    load64,
    logits64,
    round_bf16,
)
from safetensors import safe_open

RESLORA = FIXTURES / "reslora"
BASE = BASES / "llama"
TEXT = FIXTURES / "text"
CHECK_ARGS = ("--seq-len", "64", "--batch-size", "4")


# ---------------------------------------------------------------- test-side readers


def _checkpoint(folder):
    """(config, chains {name: [paths in layer order]}, loras {path: [(B_i, A_i) float64]})."""
    config = json.loads((folder / "reslora_config.json").read_text())
    state = torch.load(folder / "pytorch_model_lora.bin", weights_only=True)
    loras: dict[str, list] = {}
    for key in sorted(state):
        if key.endswith(".lora_A"):
            path, index = key[: -len(".lora_A")].rsplit(".loras.", 1)
            pair = (state[key[: -len("A")] + "B"].double(), state[key].double())
            loras.setdefault(path, []).insert(int(index), pair)
    chains: dict[str, list] = {}
    for path in loras:
        chains.setdefault(path.rsplit(".", 1)[1], []).append(path)
    for paths in chains.values():
        paths.sort(key=lambda p: int(p.split(".")[2]))
    return config, chains, loras


def _base_weights(paths):
    index = json.loads((BASE / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for path in paths:
        with safe_open(BASE / index[f"{path}.weight"], "pt") as handle:
            weights[path] = handle.get_tensor(f"{path}.weight").double()
    return weights


def _tensors(folder):
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return found


def _product(pairs):
    return sum(B @ A for B, A in pairs)


def _expected(folder, estimator, stats=None):
    """Every block's dW_n as a float64 matrix, straight from docs/rules.md section 4."""
    config, chains, loras = _checkpoint(folder)
    s = config["lora_alpha"] / config["rank"]
    pre = config["pre_num"]
    flag = config["res_flag"]
    weights = _base_weights(list(loras))
    deltas = {}
    for paths in chains.values():
        W = [weights[p] for p in paths]
        P = [_product(loras[p]) for p in paths]  # sum of a block's LoRAs, B A
        f = [stats[p]["input_norm"] for p in paths] if stats else None
        g = [stats[p]["middle_norm"] for p in paths] if stats else None
        fstar = []
        a = []
        for n, path in enumerate(paths):
            m = n if pre < 0 else min(pre, n)
            if flag == 2:
                deltas[path] = s * sum(P[n - k] for k in range(m + 1))
            elif flag == 1:
                if estimator == "weights":
                    a_n = 1.0 if n < 2 else fstar[n - 2] / fstar[n - 1]
                    fstar.append(torch.linalg.matrix_norm(W[n] + (1 + a_n) * s * P[n]).item())
                elif estimator == "official":
                    fstar = [torch.linalg.matrix_norm(W[j] + P[j].T).item() for j in range(len(W))]
                    a_n = 1.0 if n < 2 else fstar[n - 2] / fstar[n - 1]
                else:
                    a_n = 1.0 if n == 0 else f[n - 1] / f[n]
                deltas[path] = (1 + a_n) * s * P[n]
            elif estimator == "scalar":
                a_n = sum(g[n - k] / g[n] for k in range(1, m + 1))
                deltas[path] = (1 + a_n) * s * P[n]
            else:  # ms A-merge
                a.append(1.0 if n < 2 else fstar[n - 2] / fstar[n - 1])
                if estimator == "inputs":
                    c = {k: f[n - k] / f[n] for k in range(1, m + 1)}
                else:
                    c = {k: math.prod(a[n - k + 1 : n + 1]) for k in range(1, m + 1)}
                delta = 0
                for i, (B, A) in enumerate(loras[path]):
                    merged_a = A + sum(c[k] * loras[paths[n - k]][i][1] for k in c)
                    delta = delta + s * B @ merged_a
                deltas[path] = delta
                fstar.append(torch.linalg.matrix_norm(W[n] + delta).item())
    return deltas


def _peft_deltas(adapter):
    """s B A of every module, evaluated from the layers PEFT builds from the written folder."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_causal_lm(BASE), adapter)
    deltas = {}
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            B = layer.lora_B["default"].weight.detach().double()
            A = layer.lora_A["default"].weight.detach().double()
            deltas[name] = B @ A * layer.scaling["default"]
    return deltas


def _assert_deltas(got, expected):
    assert set(got) == set(expected)
    for path, delta in expected.items():
        assert delta.abs().max() > 1e-3, f"{path}: the update must not be zero"
        torch.testing.assert_close(got[path], delta, rtol=1e-5, atol=1e-6, msg=path)


# ---------------------------------------------------------------- test-side ResLoRA forward


class _ResidualLinear(torch.nn.Module):
    """A base linear plus the training-time ResLoRA term of docs/rules.md section 4 (full
    matrices)."""

    def __init__(self, linear, shared, chain, n, flag, pre, s, loras, dtype=torch.float32):
        super().__init__()
        self.linear, self.shared, self.chain, self.n = linear, shared, chain, n
        self.flag, self.m, self.s = flag, (n if pre < 0 else min(pre, n)), s
        self.loras = [[(B.to(dtype), A.to(dtype)) for B, A in pairs] for pairs in loras]
        self.norms = []

    def forward(self, x):
        n, pairs = self.n, self.loras[self.n]
        product = sum(B @ A for B, A in pairs)
        middle = x @ torch.cat([A for _, A in pairs]).T
        self.norms.append((x.double().norm().item(), middle.double().norm().item()))
        if self.flag == 1:
            self.shared[(self.chain, n)] = x
            previous = x if n == 0 else self.shared[(self.chain, n - 1)]
            extra = (x + previous) @ product.T
        elif self.flag == 2:
            total = sum(sum(B @ A for B, A in self.loras[n - k]) for k in range(self.m + 1))
            extra = x @ total.T
        else:
            self.shared[(self.chain, n)] = [x @ A.T for _, A in pairs]
            extra = 0
            for i, (B, _) in enumerate(pairs):
                mids = sum(self.shared[(self.chain, n - k)][i] for k in range(self.m + 1))
                extra = extra + mids @ B.T
        return self.linear(x) + self.s * extra


def _residual_model(folder, dtype=torch.float32, factor=1.0):
    """The base with every block wrapped in the training-time ResLoRA forward; in float64 when
    asked, with every scale multiplied by `factor` (the planted error)."""
    config, chains, loras = _checkpoint(folder)
    model = load_causal_lm(BASE).to(dtype)
    shared: dict = {}
    wrappers = {}
    for name, paths in chains.items():
        for n, path in enumerate(paths):
            parent, _, attribute = path.rpartition(".")
            wrapper = _ResidualLinear(
                model.get_submodule(path),
                shared,
                name,
                n,
                config["res_flag"],
                config["pre_num"],
                config["lora_alpha"] / config["rank"] * factor,
                [loras[p] for p in paths],
                dtype,
            )
            setattr(model.get_submodule(parent), attribute, wrapper)
            wrappers[path] = wrapper
    return model, wrappers


def _chunks(text, seq_len=64, batch_size=4):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(BASE)(text.read_text())["input_ids"]
    count = len(ids) // seq_len
    return list(torch.tensor(ids[: count * seq_len]).view(count, seq_len).split(batch_size))


def _mean_loss(model, batches):
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch).logits[:, :-1].double()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            tokens += batch[:, 1:].numel()
    return total / tokens


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def stats_files(tmp_path_factory):
    """reslora-stats on train.txt for the is and ms fixtures, through the CLI."""
    from loramerge_cli.app import app
    from typer.testing import CliRunner

    folder = tmp_path_factory.mktemp("stats")
    files = {}
    for kind in ("is", "ms"):
        out = folder / f"{kind}.json"
        result = CliRunner().invoke(
            app,
            [
                "reslora-stats",
                str(RESLORA / kind),
                "--base",
                str(BASE),
                "--text",
                str(TEXT / "train.txt"),
                "-o",
                str(out),
                *CHECK_ARGS,
                "--quiet",
            ],
        )
        assert result.exit_code == 0, result.output
        files[kind] = out
    return files


def _run(cli, *args):
    result = cli("reslora", *args, "--base", BASE, "--quiet")
    assert result.exit_code == 0, result.output
    return result


# ---------------------------------------------------------------- the rules, through PEFT

CASES = [
    ("is", "weights", ()),
    ("is", "official", ("--norms", "official")),
    ("is", "inputs", ("--stats", "STATS")),
    ("bs", "exact", ()),
    ("ms", "weights", ()),
    ("ms", "inputs", ("--stats", "STATS")),
    ("ms", "scalar", ("--ms-rule", "scalar", "--stats", "STATS")),
]


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("kind", "estimator", "extra"), CASES, ids=[f"{k}-{e}" for k, e, _ in CASES]
)
def test_plain_deltas_follow_the_rules(cli, tmp_path, stats_files, kind, estimator, extra):
    args = [str(stats_files[kind]) if a == "STATS" else a for a in extra]
    out = tmp_path / "plain"
    _run(cli, RESLORA / kind, "-o", out, *args)
    stats = None
    if "--stats" in extra:
        stats = json.loads(stats_files[kind].read_text())["blocks"]
    _assert_deltas(_peft_deltas(out), _expected(RESLORA / kind, estimator, stats))


@pytest.mark.oracle
def test_bs_stacks_ranks_through_rank_pattern(cli, tmp_path):
    out = tmp_path / "plain"
    _run(cli, RESLORA / "bs", "-o", out)
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {path: config["rank_pattern"].get(path, config["r"]) for path in _peft_deltas(out)}
    # pre_num 2: layer n stacks min(n, 2) + 1 blocks of rank 4, with lora_alpha / r kept at 2
    assert {p: r for p, r in ranks.items() if ".layers.3." in p} == {
        "model.layers.3.self_attn.q_proj": 12,
        "model.layers.3.self_attn.v_proj": 12,
    }
    assert sorted(ranks.values()) == [4, 4, 8, 8, 12, 12, 12, 12]
    for path, r in ranks.items():
        assert config["alpha_pattern"].get(path, config["lora_alpha"]) == 2 * r


@pytest.mark.oracle
def test_bs_uniform_rank_is_exact(cli, tmp_path):
    out = tmp_path / "plain"
    _run(cli, RESLORA / "bs", "-o", out, "--uniform-rank")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (12, 24, {})
    _assert_deltas(_peft_deltas(out), _expected(RESLORA / "bs", "exact"))


@pytest.mark.oracle
def test_bs_rank_compresses_with_the_best_approximation(cli, tmp_path):
    out = tmp_path / "plain"
    result = cli("reslora", RESLORA / "bs", "--base", BASE, "-o", out, "--rank", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    got = _peft_deltas(out)
    for path, delta in _expected(RESLORA / "bs", "exact").items():
        U, S, Vh = torch.linalg.svd(delta)
        best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        torch.testing.assert_close(got[path], best, rtol=1e-5, atol=1e-6, msg=path)
        block = next(b for b in report["blocks"] if b["module"] == path)
        energy = (S[:4] ** 2).sum().item() / (S**2).sum().item()
        assert block["energy_kept"] == pytest.approx(energy, rel=1e-9)
        assert block["exact"] == (len(block["stacked"]) == 1)


@pytest.mark.oracle
@pytest.mark.parametrize("extra", [(), ("--norms", "official"), ("--stats", "STATS")])
def test_layer_zero_input_shortcut_blocks_are_exact(cli, tmp_path, stats_files, extra):
    extra = tuple(str(stats_files["is"]) if a == "STATS" else a for a in extra)
    result = cli("reslora", RESLORA / "is", "--base", BASE, "-o", tmp_path / "p", *extra, "--json")
    assert result.exit_code == 0, result.output
    blocks = [b for b in json.loads(result.stdout)["blocks"] if b["index"] == 0]
    assert len(blocks) == 2
    _, _, loras = _checkpoint(RESLORA / "is")
    got = _peft_deltas(tmp_path / "p")
    for block in blocks:
        assert block["exact"] and block["coefficients"] == {"a": 1.0}
        # training adds s B A (x_0 + x_0): coefficient 1 + a_0 = 2, s = 8 / 4
        expected = 2 * 2.0 * _product(loras[block["module"]])
        torch.testing.assert_close(got[block["module"]], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.oracle
def test_norms_without_forming_the_matrix_match_the_dense_norms():
    from loramerge.ops.reslora_rules import BaseProducts, merged_norm, official_norm

    generator = torch.Generator().manual_seed(3)
    W = torch.randn(24, 24, generator=generator, dtype=torch.float64)
    B = torch.randn(24, 6, generator=generator, dtype=torch.float64)
    A = torch.randn(6, 24, generator=generator, dtype=torch.float64)
    products = BaseProducts(float((W * W).sum()), B.T @ W, W @ B)
    for c in (0.0, 0.5, 3.0):
        dense = torch.linalg.matrix_norm(W + c * B @ A).item()
        assert merged_norm(products, B, A, c) == pytest.approx(dense, rel=1e-12)
    dense = torch.linalg.matrix_norm(W + (B @ A).T).item()
    assert official_norm(products, B, A) == pytest.approx(dense, rel=1e-12)


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("kind", "norms", "estimator"), [("is", "official", "official"), ("ms", None, "weights")]
)
def test_base_rows_streamed_in_small_tiles_give_the_same_norms(monkeypatch, kind, norms, estimator):
    import loramerge.jobs.reslora_weights as module
    from loramerge.jobs.reslora_conversion import convert_reslora
    from loramerge.jobs.reslora_options import ResLoraOptions

    monkeypatch.setattr(module, "TILE_BYTES", 8 * 64 * 5)  # five rows of a 64-wide weight
    conversion = convert_reslora(RESLORA / kind, BASE, ResLoraOptions(norms=norms))
    _assert_deltas(_adapter_deltas(conversion.adapter), _expected(RESLORA / kind, estimator))


# ---------------------------------------------------------------- forward, merged model, check


@pytest.mark.oracle
def test_bs_merged_float32_reproduces_the_reslora_forward(cli, tmp_path):
    """The bs merge in float32 (float64 forward) gives the logits of the training-time ResLoRA
    forward written here (float64) within 5e-7 x the adapter's effect: the float32 rounding of
    the merged weights moves them by ~2.4e-7 x, every scale off by 1e-6 by ~1.7e-6 x (checked)."""
    out = tmp_path / "merged"
    _run(cli, RESLORA / "bs", "-o", out, "--merge", "--dtype", "float32")
    assert not list(out.glob("adapter_*"))
    ids = token_ids(BASE)
    expected, planted = (
        logits64(_residual_model(RESLORA / "bs", torch.float64, factor)[0], ids)
        for factor in (1.0, 1 + PLANTED)
    )
    got = logits64(load64(out), ids)  # loads with transformers
    assert_logits_match(got, expected, planted, base_logits(BASE, ids), "bs merged")


@pytest.mark.oracle
@pytest.mark.parametrize(("kind", "extra"), [("is", ()), ("ms", ("--ms-rule", "scalar"))])
def test_stats_and_check_text_match_an_independent_forward(cli, tmp_path, stats_files, kind, extra):
    stats = json.loads(stats_files[kind].read_text())
    assert (stats["format"], stats["version"], stats["type"]) == (
        "loramerge-reslora-stats",
        1,
        kind,
    )
    batches = _chunks(TEXT / "train.txt")
    assert (stats["seq_len"], stats["batches"]) == (64, len(batches))
    residual, wrappers = _residual_model(RESLORA / kind)
    reference_loss = _mean_loss(residual, batches)
    assert reference_loss > 0
    for path, wrapper in wrappers.items():
        block = stats["blocks"][path]
        norms = torch.tensor(wrapper.norms, dtype=torch.float64).mean(dim=0)
        assert block["input_norm"] == pytest.approx(norms[0].item(), rel=1e-5)
        assert block["middle_norm"] == pytest.approx(norms[1].item(), rel=1e-5)
        assert block["batches"] == len(batches)

    out = tmp_path / "plain"
    args = ("--stats", str(stats_files[kind]), *extra, "--check-text", TEXT / "train.txt")
    result = cli("reslora", RESLORA / kind, "--base", BASE, "-o", out, *args, *CHECK_ARGS, "--json")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["check"]
    assert check["loss_reslora"] == pytest.approx(reference_loss, abs=1e-5)
    from peft import PeftModel

    plain_loss = _mean_loss(PeftModel.from_pretrained(load_causal_lm(BASE), out), batches)
    assert check["loss_plain"] == pytest.approx(plain_loss, abs=1e-5)
    assert check["loss_difference"] == pytest.approx(plain_loss - reference_loss, abs=2e-5)
    assert check["max_logit_difference"] > 1e-3  # is and ms merges are approximations


def test_check_text_prints_the_loss_difference(cli, tmp_path):
    out = tmp_path / "merged"
    result = cli(
        "reslora",
        RESLORA / "bs",
        "--base",
        BASE,
        "-o",
        out,
        "--merge",
        "--dtype",
        "float32",
        "--check-text",
        TEXT / "eval.txt",
        *CHECK_ARGS,
    )
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if "loss difference" in x)
    difference = float(line.split("loss difference ")[1].split(",")[0])
    logits = float(line.split("max logit difference ")[1])
    assert abs(difference) < 1e-6 and logits < 1e-4  # bs is exact: only float32 round-off


@pytest.mark.oracle
def test_merged_bf16_folder_is_the_rules_update_rounded_once(cli, tmp_path):
    """The ms merge in bf16 (the default dtype) loads with transformers, and every merged weight
    is W + dW_n (docs/rules.md section 4, float64) rounded to bf16: correctly rounded except where
    float32 accumulation reaches a rounding midpoint (within a few float32 epsilons, at most
    1 element in 10^3); every other tensor is the base's, bit for bit."""
    out = tmp_path / "merged"
    _run(cli, RESLORA / "ms", "-o", out, "--merge")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert torch.isfinite(logits64(load64(out), token_ids(BASE))).all()
    deltas = {
        f"{path}.weight": delta for path, delta in _expected(RESLORA / "ms", "weights").items()
    }
    written, base = _tensors(out), _tensors(BASE)
    assert set(written) == set(base)
    off = total = 0
    for name, original in base.items():
        got = written[name]
        assert got.dtype == torch.bfloat16, name
        if name not in deltas:
            assert torch.equal(bits(got), bits(original)), f"{name} must be copied as is"
            continue
        exact = original.double() + deltas[name]
        wrong = bits(got) != bits(round_bf16(exact))
        off, total = off + int(wrong.sum()), total + got.numel()
        magnitude = original.double().abs() + deltas[name].abs()
        bound = half_ulp_bf16(got) + 8 * 2.0**-24 * magnitude
        assert bool(((got.double() - exact).abs() <= bound).all()), name
    assert len(deltas) == 8 and off <= total * 1e-3, f"{off} of {total} not correctly rounded"


# ---------------------------------------------------------------- other layouts, summed LoRAs


def _copy(kind, tmp_path, name="ckpt"):
    folder = tmp_path / name
    shutil.copytree(RESLORA / kind, folder)
    return folder


def _save_state(folder, state):
    torch.save(state, folder / "pytorch_model_lora.bin")


def _state(folder):
    return torch.load(folder / "pytorch_model_lora.bin", weights_only=True)


def _config_edit(folder, **changes):
    config = json.loads((folder / "reslora_config.json").read_text())
    config.update(changes)
    (folder / "reslora_config.json").write_text(json.dumps(config))


def _adapter_deltas(adapter):
    return {
        path: (module.lora_B.load().double() @ module.lora_A.load().double()) * module.scale
        for path, module in adapter.modules.items()
    }


@pytest.mark.oracle
@pytest.mark.parametrize(("flag", "estimator"), [(1, "weights"), (2, "exact"), (3, "weights")])
def test_summed_loras_merge_like_their_sum(tmp_path, flag, estimator):
    from loramerge.jobs.reslora_conversion import convert_reslora

    folder = _copy("ms", tmp_path)
    state = _state(folder)
    generator = torch.Generator().manual_seed(7)
    for key in [k for k in state if ".loras.0." in k]:
        state[key.replace(".loras.0.", ".loras.1.")] = 0.1 * torch.randn(
            state[key].shape, generator=generator
        )
    _save_state(folder, state)
    _config_edit(folder, lora_num=2, res_flag=flag)
    conversion = convert_reslora(folder, BASE)
    assert min(b.rank for b in conversion.blocks) == 8  # two rank-4 LoRAs per block
    _assert_deltas(_adapter_deltas(conversion.adapter), _expected(folder, estimator))


@pytest.mark.oracle
def test_trainer_and_safetensors_layouts_follow_the_rules(tmp_path):
    from safetensors.torch import save_file

    from loramerge.jobs.reslora_conversion import convert_reslora

    state = _state(RESLORA / "ms")
    config = json.loads((RESLORA / "ms" / "reslora_config.json").read_text())
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    base_config = json.loads((BASE / "config.json").read_text())
    (trainer / "config.json").write_text(json.dumps({**base_config, "resconfig": config}))
    index = json.loads((BASE / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, shard in index.items():
        with safe_open(BASE / shard, "pt") as handle:
            tensors[name] = handle.get_tensor(name)
    save_file({**tensors, **state}, trainer / "model.safetensors")
    single = tmp_path / "single"
    single.mkdir()
    save_file(state, single / "loras.safetensors", metadata={"reslora_config": json.dumps(config)})

    expected = _expected(RESLORA / "ms", "weights")
    for source in (trainer, single / "loras.safetensors"):
        _assert_deltas(_adapter_deltas(convert_reslora(source, BASE).adapter), expected)


# ---------------------------------------------------------------- user errors


def _assert_user_error(result, out, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()


def _drop(folder, path):
    _save_state(folder, {k: v for k, v in _state(folder).items() if not k.startswith(path + ".")})


def test_missing_middle_block_is_refused(cli, tmp_path):
    folder = _copy("bs", tmp_path)
    _drop(folder, "model.layers.2.self_attn.q_proj")
    out = tmp_path / "out"
    result = cli("reslora", folder, "--base", BASE, "-o", out)
    _assert_user_error(result, out, "model.layers.2.self_attn.q_proj", "between layers 1 and 3")


def test_missing_first_block_is_refused(cli, tmp_path):
    folder = _copy("ms", tmp_path)
    _drop(folder, "model.layers.0.self_attn.v_proj")
    out = tmp_path / "out"
    result = cli("reslora", folder, "--base", BASE, "-o", out)
    _assert_user_error(result, out, "no block for model.layers.0.self_attn.v_proj", "missing")


def test_shape_change_between_layers_is_refused(cli, tmp_path):
    folder = _copy("bs", tmp_path)
    state = _state(folder)
    path = "model.layers.2.self_attn.q_proj.loras.0"
    state[f"{path}.lora_A"] = state[f"{path}.lora_A"][:, :32].clone()
    _save_state(folder, state)
    out = tmp_path / "out"
    result = cli("reslora", folder, "--base", BASE, "-o", out)
    _assert_user_error(result, out, "64 x 32", "change shape between", "layers.1.self_attn.q_proj")


def test_unknown_res_flag_is_refused(cli, tmp_path):
    folder = _copy("is", tmp_path)
    _config_edit(folder, res_flag=7)
    out = tmp_path / "out"
    result = cli("reslora", folder, "--base", BASE, "-o", out)
    _assert_user_error(result, out, "unknown res_flag 7", "reslora_config.json")


def test_missing_lora_b_is_refused(cli, tmp_path):
    folder = _copy("is", tmp_path)
    state = _state(folder)
    del state["model.layers.1.self_attn.o_proj.loras.0.lora_B"]
    _save_state(folder, state)
    out = tmp_path / "out"
    result = cli("reslora", folder, "--base", BASE, "-o", out)
    _assert_user_error(result, out, "model.layers.1.self_attn.o_proj", "loras.0.lora_B")


@pytest.mark.parametrize(
    ("kind", "extra", "needles"),
    [
        ("is", ("--norms", "inputs"), ("'--norms inputs'", "needs --stats")),
        ("bs", ("--rank", "4", "--uniform-rank"), ("'--rank'", "--uniform-rank")),
        ("bs", ("--dtype", "float32"), ("'--dtype'", "needs --merge")),
        ("is", ("--norms", "sideways"), ("'--norms sideways'", "weights, official, inputs")),
    ],
)
def test_contradicting_options_are_usage_errors(cli, tmp_path, kind, extra, needles):
    """Options wrong whatever the checkpoint: exit 2, Click's message, nothing written."""
    out = tmp_path / "out"
    result = cli("reslora", RESLORA / kind, "--base", BASE, "-o", out, *extra)
    assert_usage_error(result, *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("kind", "extra", "needles"),
    [
        ("ms", ("--ms-rule", "scalar"), ("--ms-rule scalar: needs --stats",)),
        ("ms", ("--norms", "official"), ("--norms official: applies to is checkpoints only",)),
        ("bs", ("--norms", "weights"), ("--norms weights: does not apply", "merge exactly")),
    ],
)
def test_options_that_do_not_fit_the_checkpoint_are_refused(cli, tmp_path, kind, extra, needles):
    """Options that this checkpoint's type cannot take: exit 1 naming the option."""
    out = tmp_path / "out"
    result = cli("reslora", RESLORA / kind, "--base", BASE, "-o", out, *extra)
    _assert_user_error(result, out, *needles)


def test_official_norms_need_square_weights(cli, tmp_path):
    folder = _copy("bs", tmp_path)  # q_proj (64 x 64) and v_proj (32 x 64)
    _config_edit(folder, res_flag=1)
    out = tmp_path / "out"
    result = cli("reslora", folder, "--base", BASE, "-o", out, "--norms", "official")
    _assert_user_error(result, out, "square", "32 x 64", "v_proj")


def test_stats_for_another_checkpoint_are_refused(cli, tmp_path, stats_files):
    out = tmp_path / "out"
    result = cli("reslora", RESLORA / "is", "--base", BASE, "-o", out, "--stats", stats_files["ms"])
    _assert_user_error(result, out, "no statistics for block", "reslora-stats")

"""PEFT as the oracle over the architecture suite (issue 18).

For every (architecture, PEFT option) case of `architectures.CASES`, an adapter is made with
PEFT's own `get_peft_model`, perturbed with seeded noise and saved. loramerge is driven only
through its command line:

- merge: `loramerge merge ADAPTER --base BASE -o OUT --dtype float32`, OUT loaded with the
  architecture's Auto class, outputs equal to PEFT's live forward
  (`PeftModel.from_pretrained(base, adapter)`) within 1e-5 of the output scale;
- bf16 (a subset): the merge into a bf16 base equals, bit for bit, PEFT's float32 merge rounded
  once to bf16 (only for cases where PEFT's merge equals its forward, which is checked too);
- convert: `loramerge convert ADAPTER --to peft -o X` (with and without `--base`), X loaded by
  PEFT on the base gives the source's outputs.

A case whose correct answer may be a refusal passes when loramerge exits non-zero with an error
naming the real reason (one of the case's needles). What loramerge gets wrong today is listed in
KNOWN as strict xfails: "silently wrong" (exit 0, wrong result) or "refused" (a refusal of
something PEFT supports, or a refusal that does not name the real reason). Each one turns into an
XPASS failure once fixed: then delete its line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from architectures import (
    ARCH,
    ARCHS,
    CASE,
    CASES,
    Case,
    build_adapter,
    forward,
    make_inputs,
    save_base,
)
from safetensors import safe_open

TOLERANCE = 1e-5  # max |got - ref| <= TOLERANCE * max |ref|

# PEFT and transformers warn about tiny models; loramerge's own deprecations stay errors (the last
# filter given wins)
pytestmark = pytest.mark.filterwarnings("ignore", "error::DeprecationWarning:loramerge.*")


# ---------------------------------------------------------------------------------------------
# What loramerge gets wrong today: (case id, test) -> reason. Tests: merge, bf16, convert,
# convert-base. Every entry is a strict xfail.

SILENT = "silently wrong: "
REFUSED = "refused: "

_MOE_RANK = REFUSED + ("3-D expert parameters (target_parameters, ParamWrapper with r * experts "
                       "rows): 'the config gives rank 4 but the tensors have rank 16/32'")
_MOE_ALL_LINEAR = REFUSED + ("all-linear on a fused-experts MoE adds target_parameters "
                             "(experts, router): 'config gives rank 4 but the tensors have "
                             "rank 32'")
_VIT_NAMES = REFUSED + ("in-memory ViT names (vit.layers.N.attention.q_proj) differ from the "
                        "file's (vit.encoder.layer.N.attention.attention.query): 'the base model "
                        "has no tensor'")
_TIED_HEAD_BASE = REFUSED + ("convert --base: the tied head is not stored in the base files: "
                             "'the base model has no tensor for module {head}'")
_TIED_HEAD_MERGE = REFUSED + ("LoRA on the tied head {head}, which the base files do not store: "
                              "'the base model has no tensor {head}.weight'")
_CONV1D_HEAD = SILENT + ("GPT-2 Conv1D attn.c_proj next to the Linear lm_head: the update of one "
                         "of them is applied in the wrong orientation (logits off)")
_SQUARE_HEAD = SILENT + ("Linear lm_head of a GPT-2 whose vocab equals its hidden size: the update "
                         "is transposed as if it were a Conv1D")
_UNTIE_WRONG_HEAD = SILENT + ("untying writes a stray lm_head.weight and sets "
                              "tie_word_embeddings false, but this architecture's head is {head}: "
                              "the merged model loads with {head} missing (randomly initialised)")
_BIAS_MERGE = REFUSED + ("bias='{bias}': PEFT saves the trained base biases as "
                         "<module>.base_layer.bias; 'the base model has no tensor "
                         "...base_layer.bias for this modules_to_save tensor'")
_BIAS_CONVERT = SILENT + ("bias='{bias}': the converted adapter has target_modules / "
                          "modules_to_save that PEFT cannot load (KeyError on base_layer or "
                          "norm weights)")
_TOKENS = REFUSED + "trainable_token_indices: 'which loramerge cannot merge yet'"
_ROUTER_MERGE = REFUSED + ("router LoRA (target_parameters on {param}): the in-memory router "
                           "name differs from the file's ({disk}): 'the base model has no tensor'")
_ROUTER_CONVERT = SILENT + ("router LoRA: convert rewrites target_parameters {param} as a "
                            "target module; PEFT cannot load the result")
_CONVND = REFUSED + "nn.Conv{n}d LoRA (A {a}, B {b}): 'are not LoRA factors'"
_CONV2D_DORA_MTS = SILENT + ("modules_to_save=['classifier'] on ResNet (saved as classifier.1): "
                             "convert writes modules_to_save ['1'], PEFT then wraps every module "
                             "named 1 and cannot load (KeyError on a convolution weight)")
_INIT_UNCONVERTED = SILENT + ("init_lora_weights='{init}' saved unconverted: PEFT rebuilds the "
                              "residual base at load; loramerge uses the original base")
_INIT_CONVERT = SILENT + ("init_lora_weights='{init}' saved unconverted: convert drops the field "
                          "(PEFT then loads a plain LoRA on the original base)")
_ALORA_MERGE = SILENT + ("aLoRA merged into every token; PEFT applies it only from the invocation "
                         "tokens on and refuses to merge it")
_ALORA_CONVERT = SILENT + "aLoRA: convert drops alora_invocation_tokens"
_REPLICATION_MERGE = REFUSED + ("layer_replication: 'the base model has no tensor "
                                "model.layers.2...' instead of naming layer_replication")
_REPLICATION_CONVERT = SILENT + "layer_replication: convert drops the field"
_REPLICATION_BASE = REFUSED + ("layer_replication, convert --base: 'the base model has no tensor "
                               "for module model.layers.2...'")
_BDLORA = REFUSED + ("BD-LoRA (use_bdlora, block-diagonal factors): 'rank of A [4, 32] and B "
                     "[48, 2] disagree', a misleading reason")
_KASA_MERGE = REFUSED + ("KaSA (lora_diag): 'the base model has no tensor ...lora_diag for this "
                         "modules_to_save tensor', a misleading reason")
_KASA_CONVERT = SILENT + ("KaSA: convert drops kasa_config and writes lora_diag as a module to "
                          "save: PEFT cannot load the result")
_T5_SHARED = SILENT + ("LoRA on T5's `shared` table: PEFT's forward never uses that module "
                       "(encoder/decoder embed_tokens are separate modules tied by weight), so the "
                       "adapter changes nothing; loramerge merges it into the shared weight")
_NESTED_MTS = SILENT + ("modules_to_save on a nested head (classifier.dense, classifier.out_proj): "
                        "convert writes the last name component ['dense', 'out_proj'], PEFT then "
                        "wraps every dense layer and cannot load")
_LORA_BIAS_BASE = REFUSED + ("lora_bias on layers without a base bias, convert --base: 'the base "
                             "model has no tensor ...bias for this LoRA bias' (convert needs none)")


def _case_kinds(case_ids, kinds, reason):
    return {(c, k): reason for c in case_ids for k in kinds}


EXPERTS = ["mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "granitemoe", "phimoe", "deepseek-v3"]
ALL = ("merge", "bf16", "convert", "convert-base")

KNOWN: dict[tuple[str, str], str] = {
    **_case_kinds([f"{a}-experts" for a in EXPERTS], ALL, _MOE_RANK),
    **_case_kinds(["mixtral-plain", "qwen3-moe-plain", "olmoe-plain", "deepseek-v3-plain"], ALL,
                  _MOE_ALL_LINEAR),
    **_case_kinds(["vit-plain", "vit-head", "vit-modules-to-save", "vit-conv2d", "vivit-plain"],
                  ("merge", "bf16", "convert-base"), _VIT_NAMES),
    ("llama-tied-head", "convert-base"): _TIED_HEAD_BASE.format(head="lm_head"),
    ("bart-head", "merge"): _TIED_HEAD_MERGE.format(head="lm_head"),
    ("bart-head", "convert-base"): _TIED_HEAD_BASE.format(head="lm_head"),
    ("gpt-neox-head", "merge"): REFUSED + ("LoRA on GPT-NeoX's lm_head, stored on disk as "
                                           "embed_out.weight: 'the base model has no tensor "
                                           "lm_head.weight for this saved base table'"),
    ("gpt-neox-head", "convert-base"): REFUSED + ("convert --base, GPT-NeoX lm_head (on disk "
                                                  "embed_out): 'the base model has no tensor for "
                                                  "module lm_head'"),
    ("t5-head", "merge"): _TIED_HEAD_MERGE.format(head="lm_head"),
    ("t5-head", "convert-base"): _TIED_HEAD_BASE.format(head="lm_head"),
    ("whisper-head", "merge"): _TIED_HEAD_MERGE.format(head="proj_out"),
    ("whisper-head", "convert-base"): _TIED_HEAD_BASE.format(head="proj_out"),
    ("bert-mlm-head", "merge"): _TIED_HEAD_MERGE.format(head="cls.predictions.decoder"),
    ("bert-mlm-head", "convert-base"): _TIED_HEAD_BASE.format(head="cls.predictions.decoder"),
    ("gpt2-cproj-head", "merge"): _CONV1D_HEAD,
    ("gpt2-cproj-head", "convert-base"): _TIED_HEAD_BASE.format(head="lm_head"),
    ("gpt2-square-head", "merge"): _SQUARE_HEAD,
    ("gpt2-square-head", "convert-base"): _TIED_HEAD_BASE.format(head="lm_head"),
    ("gpt2-square-cproj-head", "merge"): _CONV1D_HEAD,
    ("gpt2-square-cproj-head", "convert-base"): _TIED_HEAD_BASE.format(head="lm_head"),
    ("whisper-embed", "merge"): _UNTIE_WRONG_HEAD.format(head="proj_out"),
    ("bert-mlm-embed", "merge"): _UNTIE_WRONG_HEAD.format(head="cls.predictions.decoder"),
    ("t5-embed", "merge"): _T5_SHARED,
    **_case_kinds(["qwen2-bias-all", "bert-cls-bias-all", "gpt2-bias-all"],
                  ("merge", "convert-base"), _BIAS_MERGE.format(bias="all")),
    **_case_kinds(["qwen2-bias-all", "bert-cls-bias-all", "gpt2-bias-all"], ("convert",),
                  _BIAS_CONVERT.format(bias="all")),
    **_case_kinds(["qwen2-bias-lora-only", "bert-cls-bias-lora-only"], ("merge", "convert-base"),
                  _BIAS_MERGE.format(bias="lora_only")),
    **_case_kinds(["qwen2-bias-lora-only", "bert-cls-bias-lora-only"], ("convert",),
                  _BIAS_CONVERT.format(bias="lora_only")),
    ("llama-lora-bias", "convert-base"): _LORA_BIAS_BASE,
    **_case_kinds(["roberta-cls-modules-to-save"], ("convert", "convert-base"), _NESTED_MTS),
    **_case_kinds(["llama-trainable-tokens", "llama-tied-trainable-tokens",
                   "gemma-trainable-tokens"], ALL, _TOKENS),
    ("mixtral-router", "merge"): _ROUTER_MERGE.format(param="mlp.gate.weight",
                                                      disk="block_sparse_moe.gate.weight"),
    ("mixtral-router", "convert-base"): _ROUTER_MERGE.format(param="mlp.gate.weight",
                                                             disk="block_sparse_moe.gate.weight"),
    ("phimoe-router", "merge"): _ROUTER_MERGE.format(param="mlp.router.weight",
                                                     disk="block_sparse_moe.gate.weight"),
    ("phimoe-router", "convert-base"): _ROUTER_MERGE.format(param="mlp.router.weight",
                                                            disk="block_sparse_moe.gate.weight"),
    ("phimoe-router", "convert"): _ROUTER_CONVERT.format(param="mlp.router.weight"),
    ("granitemoe-router", "merge"): _ROUTER_MERGE.format(
        param="block_sparse_moe.router.weight", disk="block_sparse_moe.router.layer.weight"),
    ("granitemoe-router", "convert-base"): _ROUTER_MERGE.format(
        param="block_sparse_moe.router.weight", disk="block_sparse_moe.router.layer.weight"),
    ("granitemoe-router", "convert"): _ROUTER_CONVERT.format(
        param="block_sparse_moe.router.weight"),
    **_case_kinds(["wav2vec2-conv1d", "hubert-conv1d"], ALL,
                  _CONVND.format(n=1, a="[4, 1, 8]", b="[16, 4, 1]")),
    **_case_kinds(["resnet-conv2d"], ("convert", "convert-base"), _CONV2D_DORA_MTS),
    **_case_kinds(["videomae-conv3d", "vivit-conv3d"], ALL,
                  _CONVND.format(n=3, a="[4, 3, 2, 8, 8]", b="[32, 4, 1, 1, 1]")),
    **_case_kinds(["llama-pissa", "gpt2-pissa"], ("merge",),
                  _INIT_UNCONVERTED.format(init="pissa")),
    **_case_kinds(["llama-pissa", "gpt2-pissa"], ("convert", "convert-base"),
                  _INIT_CONVERT.format(init="pissa")),
    **_case_kinds(["llama-pissa-niter", "qwen2-pissa-niter"], ("merge",),
                  SILENT + ("init_lora_weights='pissa_niter_N' (randomised fast SVD) merged into "
                            "the original base instead of being refused")),
    **_case_kinds(["llama-pissa-niter", "qwen2-pissa-niter"], ("convert", "convert-base"),
                  _INIT_CONVERT.format(init="pissa_niter_N")),
    **_case_kinds(["llama-olora", "qwen2-olora"], ("merge",),
                  _INIT_UNCONVERTED.format(init="olora")),
    **_case_kinds(["llama-olora", "qwen2-olora"], ("convert", "convert-base"),
                  _INIT_CONVERT.format(init="olora")),
    **_case_kinds(["llama-alora", "qwen2-alora"], ("merge",), _ALORA_MERGE),
    **_case_kinds(["llama-alora", "qwen2-alora"], ("convert", "convert-base"), _ALORA_CONVERT),
    **_case_kinds(["llama-layer-replication", "mistral-layer-replication"], ("merge",),
                  _REPLICATION_MERGE),
    **_case_kinds(["llama-layer-replication", "mistral-layer-replication"], ("convert",),
                  _REPLICATION_CONVERT),
    **_case_kinds(["llama-layer-replication", "mistral-layer-replication"], ("convert-base",),
                  _REPLICATION_BASE),
    **_case_kinds(["llama-bdlora", "qwen2-bdlora"], ("merge", "convert", "convert-base"), _BDLORA),
    **_case_kinds(["llama-kasa", "qwen2-kasa"], ("merge", "convert-base"), _KASA_MERGE),
    **_case_kinds(["llama-kasa", "qwen2-kasa"], ("convert",), _KASA_CONVERT),
}
KNOWN = {key: why for key, why in KNOWN.items() if key[1] != "bf16" or CASE[key[0]].bf16}
# cases whose PEFT forward does not differ from the base (documented, not a test failure)
INERT = {"t5-embed": "PEFT's forward never calls T5's `shared` module"}


def _params(kind: str, cases: list[Case]):
    params = []
    for case in cases:
        reason = KNOWN.get((case.id, kind))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


# ---------------------------------------------------------------------------------------------
# Session state: every base built once, every adapter built once, PEFT references computed once


class Suite:
    def __init__(self, root: Path):
        self.root = root
        self._bases: dict[tuple[str, torch.dtype], Path] = {}
        self._adapters: dict[str, Path] = {}
        self._references: dict[str, torch.Tensor] = {}
        self._plain: dict[str, torch.Tensor] = {}
        self._load_info: dict[str, dict] = {}

    def base(self, arch: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (arch, dtype)
        if key not in self._bases:
            folder = self.root / "bases" / f"{arch}-{str(dtype).removeprefix('torch.')}"
            self._bases[key] = save_base(ARCH[arch], folder, dtype)
        return self._bases[key]

    def adapter(self, case: Case) -> Path:
        if case.id not in self._adapters:
            out = self.root / "adapters" / case.id
            self._adapters[case.id] = build_adapter(case, self.base(case.arch), out)
        return self._adapters[case.id]

    def inputs(self, case: Case) -> dict[str, torch.Tensor]:
        arch = ARCH[case.arch]
        return make_inputs(arch, arch.config())

    def load(self, arch: str, folder: Path, dtype: torch.dtype = torch.float32):
        model, info = ARCH[arch].auto_cls().from_pretrained(
            folder, dtype=dtype, output_loading_info=True
        )
        return model.eval(), info

    def peft_forward(self, case: Case, adapter: Path, base: Path | None = None) -> torch.Tensor:
        from peft import PeftModel

        model, _ = self.load(case.arch, base or self.base(case.arch))
        if case.seeded_load:
            torch.manual_seed(3)  # PEFT draws random numbers while loading this adapter
        peft_model = PeftModel.from_pretrained(model, adapter).eval()
        return forward(peft_model, self.inputs(case))

    def reference(self, case: Case) -> torch.Tensor:
        """PEFT's live forward of the adapter on the float32 base: the oracle."""
        if case.id not in self._references:
            self._references[case.id] = self.peft_forward(case, self.adapter(case))
        return self._references[case.id]

    def plain(self, case: Case) -> torch.Tensor:
        if case.arch not in self._plain:
            model, info = self.load(case.arch, self.base(case.arch))
            self._plain[case.arch] = forward(model, self.inputs(case))
            self._load_info[case.arch] = info
        return self._plain[case.arch]

    def base_load_info(self, arch: str) -> dict:
        self.plain(Case(arch, "", {}))
        return self._load_info[arch]


@pytest.fixture(scope="session")
def suite(tmp_path_factory) -> Suite:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return Suite(tmp_path_factory.mktemp("archsuite"))


def _error_line(result) -> str:
    return " ".join(result.output.split())


def _reason(message: str) -> str:
    """The error without its paths: the case id in a path must not pass for a reason."""
    return " ".join(w for w in message.split() if "/" not in w)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, f"output shape {tuple(got.shape)} != {tuple(ref.shape)}"
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _check_refusal(case: Case, kind: str, result, allowed: str) -> None:
    """loramerge exited non-zero: fine only where a refusal is correct and names the reason."""
    message = _error_line(result)
    if allowed == "exact":
        pytest.fail(f"{case.id}: {kind} refused an adapter PEFT supports: {message}")
    named = [n for n in case.needles if n.lower() in _reason(message).lower()]
    assert named, f"{case.id}: the refusal does not name the reason {case.needles}: {message}"


def _assert_close(case: Case, kind: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    error = _relative_error(got, ref)
    assert error <= TOLERANCE, (
        f"{case.id}: {kind} output differs from PEFT's forward by {error:.3g} of the output scale"
    )


def _assert_changes_model(suite: Suite, case: Case, ref: torch.Tensor) -> None:
    change = _relative_error(suite.plain(case), ref)
    if case.id in INERT:
        assert change == 0.0, f"{case.id}: expected PEFT's forward to ignore this adapter"
    else:
        assert change > 1e-3, f"{case.id}: the adapter must change the model ({change:.3g})"


# ---------------------------------------------------------------------------------------------
# merge, float32


@pytest.mark.parametrize("case", _params("merge", CASES))
def test_merge_matches_peft_forward(cli, suite, tmp_path, case):
    adapter, base = suite.adapter(case), suite.base(case.arch)
    ref = suite.reference(case)
    _assert_changes_model(suite, case, ref)
    out = tmp_path / "merged"
    result = cli("merge", adapter, "--base", base, "-o", out, "--dtype", "float32", "--quiet")
    if result.exit_code != 0:
        _check_refusal(case, "merge", result, case.merge)
        return
    assert case.merge != "refuse", (
        f"{case.id}: merge must be refused ({case.notes or case.needles}) but exited 0"
    )
    model, info = suite.load(case.arch, out)
    expected = suite.base_load_info(case.arch)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        extra = sorted(set(map(str, info[key])) - set(map(str, expected[key])))
        assert not extra, f"{case.id}: the merged folder loads with {key} {extra[:5]}"
    _assert_close(case, "merge", forward(model, suite.inputs(case)), ref)


# ---------------------------------------------------------------------------------------------
# merge into a bf16 base: one rounding of PEFT's float32 merge, bit for bit

BF16_CASES = [c for c in CASES if c.bf16]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                found[name] = handle.get_tensor(name)
    return found


def _peft_float32_merge(suite: Suite, case: Case, base: Path, folder: Path) -> Path:
    """PEFT's merge_and_unload on the bf16 base upcast to float32, saved in the on-disk layout
    by transformers itself (which reverts its in-memory renames and expert fusing)."""
    from peft import PeftModel

    model, _ = suite.load(case.arch, base, torch.float32)
    peft_model = PeftModel.from_pretrained(model, suite.adapter(case)).eval()
    live = forward(peft_model, suite.inputs(case))
    merged = peft_model.merge_and_unload()
    # the reference is valid only where PEFT's merge equals its own forward
    unloaded = forward(merged, suite.inputs(case))
    _assert_close(case, "PEFT merge_and_unload vs PEFT forward", unloaded, live)
    merged.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("case", _params("bf16", BF16_CASES))
def test_bf16_merge_rounds_once(cli, suite, tmp_path, case):
    base = suite.base(case.arch, torch.bfloat16)
    out = tmp_path / "merged"
    result = cli("merge", suite.adapter(case), "--base", base, "-o", out, "--quiet")
    if result.exit_code != 0:
        _check_refusal(case, "bf16 merge", result, case.merge)
        return
    reference = _tensors(_peft_float32_merge(suite, case, base, tmp_path / "reference"))
    written = _tensors(out)
    assert sorted(written) == sorted(reference), (
        f"{case.id}: tensor names differ: only written {sorted(set(written) - set(reference))[:5]}"
        f", only in the reference {sorted(set(reference) - set(written))[:5]}"
    )
    for name, value in reference.items():
        expected = value.to(torch.bfloat16)
        got = written[name]
        assert got.dtype == torch.bfloat16, f"{case.id}: {name} is {got.dtype}"
        assert got.shape == expected.shape, f"{case.id}: {name} shape {tuple(got.shape)}"
        differ = int((got.view(torch.int16) != expected.view(torch.int16)).sum())
        assert differ == 0, f"{case.id}: {name}: {differ} elements differ from one rounding"


# ---------------------------------------------------------------------------------------------
# convert --to peft, without and with --base


def _convert(cli, suite, tmp_path, case, kind, *extra):
    out = tmp_path / "converted"
    result = cli("convert", suite.adapter(case), "--to", "peft", "-o", out, *extra)
    if result.exit_code != 0:
        _check_refusal(case, kind, result, case.convert)
        return
    ref = suite.reference(case)
    try:
        got = suite.peft_forward(case, out)
    except Exception as error:  # PEFT itself cannot load what was written
        pytest.fail(f"{case.id}: PEFT cannot load the converted adapter: {error!r}"[:600])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config.get("peft_type") == "LORA"
    _assert_close(case, kind, got, ref)


@pytest.mark.parametrize("case", _params("convert", CASES))
def test_convert_to_peft_matches_source(cli, suite, tmp_path, case):
    _convert(cli, suite, tmp_path, case, "convert")


@pytest.mark.parametrize("case", _params("convert-base", CASES))
def test_convert_to_peft_with_base_matches_source(cli, suite, tmp_path, case):
    _convert(cli, suite, tmp_path, case, "convert --base", "--base", suite.base(case.arch))


# ---------------------------------------------------------------------------------------------
# the suite itself


def test_suite_covers_the_matrix():
    families = {a.family for a in ARCHS}
    assert len(ARCHS) >= 40
    assert {"decoder", "moe", "encdec", "encoder", "vision", "speech"} <= families
    plain = {c.arch for c in CASES if c.option == "plain"}
    assert plain == {a.name for a in ARCHS}, "every architecture has a plain LoRA case"
    by_option: dict[str, set[str]] = {}
    for case in CASES:
        by_option.setdefault(case.option, set()).add(case.arch)
    single = {o: a for o, a in by_option.items() if len(a) < 2}
    assert not single, f"options on fewer than two architectures: {single}"
    for key in KNOWN:
        assert key[0] in {c.id for c in CASES}, f"KNOWN names an unknown case {key}"
        assert KNOWN[key].startswith((SILENT, REFUSED)), key

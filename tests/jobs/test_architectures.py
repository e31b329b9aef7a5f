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
# What loramerge gets wrong: (case id, test) -> reason, each a strict xfail. Tests: merge, bf16,
# convert, convert-base. A reason starts with "silently wrong: " (exit 0, wrong result) or
# "refused: " (a refusal of something PEFT supports, or one that does not name the real reason).
# Empty: every case of the suite is exact or refused with its reason.

SILENT = "silently wrong: "
REFUSED = "refused: "
KNOWN: dict[tuple[str, str], str] = {}
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
    assert case.convert != "refuse", f"{case.id}: convert must be refused but exited 0"
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


def test_the_docs_table_is_what_the_suite_asserts(suite):
    """docs/what-merges.md lists every option with the outcomes this suite asserts and the
    engine profiles' own answers (rewrite it with python tests/support_table.py)."""
    import support_table

    written = support_table.block(support_table.PAGE.read_text())
    assert written == support_table.table(suite.adapter, lambda case: suite.base(case.arch)), (
        "docs/what-merges.md is out of date: run python tests/support_table.py"
    )

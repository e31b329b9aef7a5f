"""The Stable Diffusion tools themselves, run again (slow; skipped unless an interpreter that has
them is named in LORAMERGE_SD_TOOLS_PYTHON, e.g. the tools venv of fixtures/tools/README-sd.md):

- LyCORIS 4.1.3 rebuilds its fixtures in a scratch copy of fixtures/, and the reader is checked
  against those fresh outputs, not the committed ones;
- diffusers' own load_lora_weights loads what loramerge's diffusers writer wrote, and every
  module it wraps gives the source adapter's output."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sd_fixtures import (
    FIXTURES,
    SD_BASE,
    base_weights,
    find,
    kohya_index,
    output,
    reference,
    relative_error,
    where,
)

from loramerge.formats import lycoris
from loramerge.formats.registry import read_adapter
from loramerge.jobs.convert import convert_adapter

pytestmark = [pytest.mark.slow, pytest.mark.oracle]
TESTS = Path(__file__).resolve().parents[1]


def _tools_python(*modules: str) -> str:
    python = os.environ.get("LORAMERGE_SD_TOOLS_PYTHON")
    if not python:
        pytest.skip("LORAMERGE_SD_TOOLS_PYTHON names no interpreter with the SD tools")
    probe = "import " + ", ".join(modules)
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        pytest.skip(f"{python} cannot import {', '.join(modules)}")
    return python


def _run(python: str, *args: object, cwd: Path | None = None) -> None:
    done = subprocess.run(
        [python, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_reader_against_a_fresh_lycoris_build(tmp_path):
    python = _tools_python("lycoris", "diffusers")
    scratch = tmp_path / "fixtures"
    for name in ("tools", "sd-base"):
        shutil.copytree(FIXTURES / name, scratch / name)
    _run(python, scratch / "tools" / "make_lycoris.py", cwd=tmp_path)
    built = sorted((scratch / "lycoris").glob("*.safetensors"))
    files = [p for p in built if not p.name.endswith(".ref.safetensors")]
    assert len(files) >= 13
    for path in files:
        adapter = read_adapter(path)
        if lycoris.needs_dora_fold(adapter):
            adapter = lycoris.fold_dora_epsilon(
                adapter, lambda key, m: base_weights()[f"{m.component}.{m.path}.weight"]
            )
        ref = reference(path)
        prefix = "out_blocks1" if adapter.source_format == "lycoris-dylora" else "out"
        if prefix == "out_blocks1":
            from loramerge.ops.rank_truncation import truncate_prefix

            adapter, _ = truncate_prefix(adapter, int(adapter.metadata["dylora.unit"]))
        for key in (k for k in ref if k.startswith(f"{prefix}.lora_")):
            component, module_path = kohya_index()[key.split(".", 1)[1]]
            module = find(adapter, component, module_path)
            assert relative_error(output(module, component), ref[key]) < 1e-5, (path.name, key)


CASES = [
    (FIXTURES / "kohya-sd" / "sd1-lora.safetensors", False, None),
    (FIXTURES / "kohya-sd" / "sdxl-te1te2-lora.safetensors", True, None),
    (FIXTURES / "lycoris" / "loha.safetensors", False, None),
    (FIXTURES / "lycoris" / "locon-dora.safetensors", False, SD_BASE),
    (FIXTURES / "diffusers" / "sdxl-converted-keys", True, None),
]


@pytest.mark.parametrize(("source", "sdxl", "base"), CASES, ids=lambda v: getattr(v, "stem", ""))
def test_diffusers_loads_what_the_diffusers_writer_wrote(tmp_path, source, sdxl, base):
    python = _tools_python("diffusers", "peft")
    folder = tmp_path / "written"
    convert_adapter(source, folder, to="diffusers", base=base)
    written = read_adapter(folder)
    probe = tmp_path / "probe.safetensors"
    _run(python, TESTS / "sd_tools_probe.py", FIXTURES / "tools", folder, int(sdxl), probe)
    loaded = load_file(probe)
    assert len(loaded) == len(written.modules)  # diffusers wrapped every module, no other
    for module in written.modules.values():
        key = f"out.{where(module.component, module.path)}"
        assert relative_error(output(module, module.component), loaded[key]) < 1e-5, key

"""The real tools, re-run: each fixtures/tools script rebuilds its adapters and references in a
scratch copy of fixtures/, and the readers are checked against those fresh references; mlx-lm
also loads what the mlx-lm writer wrote.

A tool is used when it is importable by this interpreter or by one named in the environment
variable LORAMERGE_TOOLS_PYTHON (interpreters separated by the path separator, e.g.
/work/venv-tools-lm/bin/python:/work/venv-tools-lm-tt/bin/python); otherwise its test is
skipped. CI installs none of them except PEFT, a dev dependency.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BASES, FIXTURES
from tool_fixtures import assert_matches_tool, reference

from loramerge.jobs.convert import convert_adapter

pytestmark = [pytest.mark.slow, pytest.mark.oracle]

LLAMA = BASES / "llama"
# the PEFT tuners whose rules are least obvious (the script takes ~3 s per tuner; the others
# are checked against their stored references)
PEFT_NAMES = ["adalora", "loha", "lokr-full-w1"]


def _python_with(*modules: str) -> str | None:
    """An interpreter that imports every module: this one, or one named in the environment."""
    listed = [p for p in os.environ.get("LORAMERGE_TOOLS_PYTHON", "").split(os.pathsep) if p]
    check = "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in "
    check += f"{list(modules)!r}) else 1)"
    for exe in [sys.executable, *listed]:
        try:
            done = subprocess.run([exe, "-c", check], capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return exe
    return None


def _sandbox(root: Path) -> Path:
    """A scratch fixtures/ tree with what the scripts read: the scripts write next to
    themselves (fixtures/<tool>/), never into the real fixtures."""
    sandbox = root / "fixtures"
    for part in ("tools", "text", "bases/llama"):
        shutil.copytree(FIXTURES / part, sandbox / part)
    return sandbox


def _run(python: str, script: Path, *args: str, timeout: int = 1200) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [python, str(script), *args],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    output = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"{script.name} failed:\n{output}"


def test_peft_tuners_rebuilt_by_peft(tmp_path):
    python = _python_with("peft", "transformers")
    if python is None:
        pytest.skip("PEFT is not installed")
    sandbox = _sandbox(tmp_path)
    _run(python, sandbox / "tools" / "make_peft_tuners.py", *PEFT_NAMES)
    for name in PEFT_NAMES:
        fresh = sandbox / "peft-tuners" / name
        out = tmp_path / "out" / name
        # lokr-full-w1's q_proj is a full-rank form: written when capped at its own rank
        cap = 64 if name == "lokr-full-w1" else None
        convert_adapter(fresh, out, to="peft", base=LLAMA, max_rank=cap)
        assert_matches_tool(out, LLAMA, fresh)


def test_mlx_lm_rebuilt_and_loads_the_mlx_writer(tmp_path):
    python = _python_with("mlx_lm", "torch", "safetensors")
    if python is None:
        pytest.skip("mlx-lm is not installed")
    sandbox = _sandbox(tmp_path)
    _run(python, sandbox / "tools" / "make_mlx_lm.py")
    for name in ("lora", "dora", "lora-scale"):
        fresh = sandbox / "mlx-lm" / name
        out = tmp_path / "out" / name
        convert_adapter(fresh, out, to="peft")
        assert_matches_tool(out, LLAMA, fresh)

    # mlx-lm loads what the writer wrote, and computes the source tool's logits with it
    written = {
        "loha": FIXTURES / "peft-tuners" / "loha",
        "dora": sandbox / "mlx-lm" / "dora",
        "lora-scale": sandbox / "mlx-lm" / "lora-scale",
    }
    for name, source in written.items():
        convert_adapter(source, tmp_path / "mlx" / name, to="mlx-lm", base=LLAMA)
    script = tmp_path / "mlx_check.py"
    script.write_text(_MLX_CHECK)
    cases = [f"{tmp_path / 'mlx' / n}={source}" for n, source in written.items()]
    done = subprocess.run(
        [python, str(script), str(sandbox / "tools"), str(tmp_path / "base32"), *cases],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for line in done.stdout.splitlines():
        name, error = line.split()
        assert float(error) <= 1e-5, f"mlx-lm with the written {name}: {error}"
    assert len(done.stdout.splitlines()) == len(written)


# Run by the mlx-lm interpreter: load each written folder with mlx_lm.load on a float32 copy of
# bases/llama and print the largest logit difference from the source's stored reference,
# relative to its largest logit.
_MLX_CHECK = """
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import make_mlx_lm
import mlx.core as mx
import numpy as np
from mlx_lm import load
from safetensors.numpy import load_file

base32 = make_mlx_lm.make_base32(Path(sys.argv[2]))
for case in sys.argv[3:]:
    written, source = case.split("=")
    ref = load_file(str(Path(source) / "reference.safetensors"))
    model, _ = load(str(base32), adapter_path=written)
    logits = np.array(model(mx.array(ref["input_ids"])).astype(mx.float32))
    error = np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max()
    print(Path(written).name, float(error))
"""


def test_torchtune_rebuilt_by_torchtune(tmp_path):
    python = _python_with("torchtune", "torchao")
    if python is None:
        pytest.skip("torchtune is not installed")
    sandbox = _sandbox(tmp_path)
    _run(python, sandbox / "tools" / "make_torchtune.py")
    base = sandbox / "torchtune" / "base"
    for name in ("lora", "dora"):
        fresh = sandbox / "torchtune" / name
        assert reference(fresh)["logits"].shape[0] == 2
        out = tmp_path / "out" / name
        convert_adapter(fresh / "adapter_model.pt", out, to="peft", base=base)
        assert_matches_tool(out, base, fresh)

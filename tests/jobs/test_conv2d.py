"""Conv2d LoRA (and DoRA) merged by loramerge against PEFT on a small hand-built network."""

from __future__ import annotations

import json

import pytest
import torch
from oracles import PLANTED, assert_logits_match
from safetensors.torch import load_file, save_file


class TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.pointwise = torch.nn.Conv2d(8, 6, kernel_size=1)
        self.head = torch.nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(self.pointwise(x))
        return self.head(x.flatten(1))


@pytest.mark.oracle
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv2d_merge_matches_peft(tmp_path, use_dora):
    """The merged network (float64 forward of the float32 weights) gives PEFT's live output in
    float64 within 2e-7 x the adapter's effect: float32 rounding of the merged weights moves it
    by ~8e-8 x, every scale off by 1e-6 by 4e-7 x (DoRA) to 2e-6 x (checked each run)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loramerge.formats.registry import read_adapter
    from loramerge.jobs.merge import merge_adapter

    torch.manual_seed(7)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    model = TinyConvNet()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, base_dir / "model.safetensors"
    )
    (base_dir / "config.json").write_text(json.dumps({"model_type": "tiny-conv"}))

    config = LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["conv", "pointwise", "head"],
        init_lora_weights=False,
        use_dora=use_dora,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")

    def network(path) -> TinyConvNet:
        net = TinyConvNet()
        net.load_state_dict(load_file(path))
        return net.eval()

    live = PeftModel.from_pretrained(network(base_dir / "model.safetensors"), tmp_path / "adapter")
    live = live.eval().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    def live_output(factor: float) -> torch.Tensor:
        from peft.tuners.lora import LoraLayer

        layers = [m for m in live.modules() if isinstance(m, LoraLayer)]
        saved = [layer.scaling["default"] for layer in layers]
        for layer in layers:
            layer.scaling["default"] *= factor
        with torch.no_grad():
            output = live(x)
        for layer, scale in zip(layers, saved, strict=True):
            layer.scaling["default"] = scale
        return output

    expected, planted = live_output(1.0), live_output(1 + PLANTED)
    merge_adapter(read_adapter(tmp_path / "adapter"), base_dir, tmp_path / "merged")
    with torch.no_grad():
        got = network(tmp_path / "merged" / "model.safetensors").double()(x)
        plain = network(base_dir / "model.safetensors").double()(x)
    assert_logits_match(got, expected, planted, plain, "conv2d merge", 2e-7)

"""Conv2d LoRA (and DoRA) merged by loramerge against PEFT on a small hand-built network."""

from __future__ import annotations

import json

import pytest
import torch
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


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv2d_merge_matches_peft(tmp_path, use_dora):
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

    fresh = TinyConvNet()
    fresh.load_state_dict(load_file(base_dir / "model.safetensors"))
    live = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = live(x)

    merge_adapter(read_adapter(tmp_path / "adapter"), base_dir, tmp_path / "merged")
    merged = TinyConvNet()
    merged.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    with torch.no_grad():
        got = merged.eval()(x)
        plain = TinyConvNet()
        plain.load_state_dict(load_file(base_dir / "model.safetensors"))
        assert (expected - plain(x)).abs().max() > 1e-3, "the adapter must change the output"
    assert (got - expected).abs().max().item() <= 1e-5

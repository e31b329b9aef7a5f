"""Run by an interpreter that has the Stable Diffusion tools (diffusers, peft, transformers; see
fixtures/tools/README-sd.md), never by the test interpreter itself:

    python tests/sd_tools_probe.py FIXTURES_TOOLS FOLDER SDXL OUT

loads the diffusers LoRA folder FOLDER (written by loramerge) into the fixture pipeline with
diffusers' own `load_lora_weights`, and saves every adapted module's output on its reference
input to OUT as `out.<component>.<path>`, with the modules diffusers wrapped in the metadata."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    tools, folder, sdxl, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    sys.path.insert(0, str(tools))
    import torch
    from make_diffusers import adapted, make_pipe
    from safetensors.torch import load_file, save_file
    from sd_common import SD_BASE, disk_path, setup

    setup()
    pipe = make_pipe(sdxl)
    pipe.load_lora_weights(str(folder))
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if sdxl:
        models["text_encoder_2"] = pipe.text_encoder_2
    inputs = load_file(SD_BASE / "reference.safetensors")
    outputs = {}
    with torch.no_grad():
        for component, model in models.items():
            for path, layer in adapted(model).items():
                where = f"{component}.{disk_path(component, path)}"
                outputs[f"out.{where}"] = layer(inputs[f"in.{where}"]).contiguous()
    save_file(outputs, out, metadata={"wrapped": json.dumps(sorted(outputs))})
    return 0


if __name__ == "__main__":
    sys.exit(main())

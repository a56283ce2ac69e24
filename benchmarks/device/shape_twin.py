"""A model directory with another's config and tokenizer but random weights: the same shapes, the same cost.

For throughput where a model's weights cannot travel (the device tool carries 64 MiB; SmolLM2-135M is
0.5 GB): training speed depends on the shapes, not on the values.

    python benchmarks/device/shape_twin.py SRC DST     # copy SRC's config and tokenizer files to DST
    python benchmarks/device/shape_twin.py --weights DST   # give DST seeded random weights
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt")


def copy_shape(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHTS) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)
    print("copied", sorted(p.name for p in dst.iterdir()))


def add_weights(dst: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dst), dtype=torch.float32)
    model.save_pretrained(dst)
    print(f"{sum(p.numel() for p in model.parameters()):,} random parameters written to {dst}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--weights":
        add_weights(Path(sys.argv[2]))
    elif len(sys.argv) == 3:
        copy_shape(Path(sys.argv[1]), Path(sys.argv[2]))
    else:
        sys.exit(__doc__)

"""The LoRA before/after grid of docs/finetunes.md: one PEFT adapter trained a few steps on the tiny preset's
U-Net, applied by the runtime (ONNX Runtime, no re-export) at scales 0 (the base), 0.5 and 1, for two seeds.

    python3 verify/experiments/lora_grid.py --work /tmp/lora-grid --out docs/images/lora_grid.png

The tiny preset has random weights: the pictures are texture, not subjects; what they show is that the adapter
changes the image in proportion to its scale and that scale 0 is the base image (checked bit for bit here).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SCALES = (0.0, 0.5, 1.0)
SEEDS = (1, 2)
SIZE, STEPS, PROMPT = 64, 8, "a red fox in a snowy forest"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a new folder for the preset, artifacts and adapter")
    parser.add_argument("--out", required=True, help="the grid PNG")
    args = parser.parse_args()
    from PIL import Image

    from k3trt.export.presets import write_preset
    from k3trt.export.sources import open_model_dir
    from k3trt.export.writer import export_artifacts
    from k3trt.runtime.pipeline import Pipeline
    from k3trt.verify.lora_training import train_peft_lora

    work = Path(args.work)
    model = write_preset("tiny", work / "tiny")
    export_artifacts(open_model_dir(model), work / "art", log=print)
    train_peft_lora(model, work / "adapter", rank=8, alpha=16, steps=20)
    pipe = Pipeline.from_artifacts(work / "art", "ort")
    base = [pipe.generate(PROMPT, seed=s, steps=STEPS, height=SIZE, width=SIZE, output_type="np")[0] for s in SEEDS]
    rows = []
    for seed, base_image in zip(SEEDS, base):
        row = []
        for scale in SCALES:
            pipe.set_lora(f"{work / 'adapter'}:{scale}")
            row.append(pipe.generate(PROMPT, seed=seed, steps=STEPS, height=SIZE, width=SIZE, output_type="np")[0])
        assert np.array_equal(row[0], base_image), "scale 0 must be the base image bit for bit"
        rows.append(np.concatenate(row, axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).round().astype("uint8")
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: rows seeds {SEEDS}, columns LoRA scale {SCALES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

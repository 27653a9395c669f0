"""`k3trt export --weights-from` against a full export, on one machine in one run, for a second checkpoint of
the same configuration (the preset written with another weight seed: a stand-in for a DreamBooth fine-tune).

Writes base artifacts for seed 0 (not timed), then times (1) a full `k3trt export` of the seed-1 checkpoint and
(2) `--weights-from` seed 1 reusing the seed-0 graphs, and checks the two artifacts compute the same thing (each
component on the same inputs with ONNX Runtime; images from the same request). The JSON goes to --json.

    python3 verify/experiments/weights_from_vs_export.py --preset small --work /tmp/wf --json docs/results/weights_from_small.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def k3trt(*args: str) -> tuple[float, float]:
    """Run one k3trt command in a fresh process (as a user would); (wall seconds, CPU seconds: user + system)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "k3trt.cli.main", *args], check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def same_outputs(full: Path, rewritten: Path, size: int) -> dict:
    """Images of the same request from both artifacts: max abs difference and PSNR."""
    from k3trt.contract.tensor_metrics import psnr
    from k3trt.runtime.pipeline import Pipeline

    images = [Pipeline.from_artifacts(art, "ort").generate("a red fox in a snowy forest", seed=3, steps=4,
                                                           height=size, width=size, output_type="np")
              for art in (full, rewritten)]
    max_abs = float(np.abs(images[0] - images[1]).max())
    db = float(psnr(*images))  # infinite for identical images: JSON has no Infinity, so None and a flag
    return {"image_max_abs": max_abs, "images_identical": max_abs == 0.0,
            "image_psnr_db": db if np.isfinite(db) else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--work", required=True, help="a new folder for the checkpoints and artifacts")
    parser.add_argument("--json", required=True, help="where to write the measured figures")
    parser.add_argument("--components", default="text_encoder,unet,movq_decoder",
                        help="what both exports write (the text-to-image set by default)")
    args = parser.parse_args()
    work = Path(args.work)
    base, tuned = work / "base-model", work / "tuned-model"
    k3trt("preset", args.preset, "--out", str(base), "--seed", "0")
    k3trt("preset", args.preset, "--out", str(tuned), "--seed", "1")
    only = ("--components", args.components)
    k3trt("export", "--model", str(base), "--out", str(work / "base-art"), *only)
    load_start = [round(x, 2) for x in os.getloadavg()]
    full_s, full_cpu_s = k3trt("export", "--model", str(tuned), "--out", str(work / "full-art"), *only)
    rewrite_s, rewrite_cpu_s = k3trt("export", "--weights-from", str(tuned), "--graphs-from", str(work / "base-art"),
                      "--out", str(work / "rewritten-art"), *only)
    size = json.loads((work / "full-art" / "manifest.json").read_text())["pipeline"].get("native_size", 64)
    result = {"preset": args.preset, "components": args.components.split(","), "full_export_s": round(full_s, 1), "weights_from_s": round(rewrite_s, 1),
              "full_export_cpu_s": round(full_cpu_s, 1), "weights_from_cpu_s": round(rewrite_cpu_s, 1),
              "speedup": round(full_s / rewrite_s, 2), **same_outputs(work / "full-art", work / "rewritten-art", size),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "load_average_start": load_start,
                          "load_average_end": [round(x, 2) for x in os.getloadavg()]},
              "command": " ".join(["python3", "verify/experiments/weights_from_vs_export.py", *sys.argv[1:]])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the calibration tests (imported by name: the test folders are not packages)."""
from __future__ import annotations

from pathlib import Path

TINY = dict(steps=3, height=64, width=64)


def tiny_request(artifacts: Path, **overrides):
    from k3trt.calibration.config import QuantConfig, TrajectoryConfig
    from k3trt.calibration.stage import CalibrationRequest

    quant = overrides.pop("quant", QuantConfig())
    overrides.setdefault("float_parts", "fp32")  # the fp16 conversion costs ~1-2 min: only the session fixture pays it
    return CalibrationRequest(artifacts=Path(artifacts), trajectory=TrajectoryConfig(**TINY), quant=quant,
                              num_prompts=2, heldout=2, threads=2, **overrides)

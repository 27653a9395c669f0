"""Helpers shared by the calibration tests (imported by name: the test folders are not packages)."""
from __future__ import annotations

from pathlib import Path

TINY = dict(steps=3, height=64, width=64)


def tiny_request(artifacts: Path, **overrides):
    from k3trt.calibration.config import QuantConfig, TrajectoryConfig
    from k3trt.calibration.stage import CalibrationRequest

    quant = overrides.pop("quant", QuantConfig())
    overrides.setdefault("float_parts", "fp32")  # the fp16 conversion costs ~1-2 min: only the session fixture pays it
    overrides.setdefault("threads", 2)
    overrides.setdefault("collector", "ort")  # the stage tests' collector; test_cal_torch_collector.py runs torch's
    return CalibrationRequest(artifacts=Path(artifacts), trajectory=TrajectoryConfig(**TINY), quant=quant,
                              num_prompts=2, heldout=2, **overrides)


def checked_int8_record(manifest, component: str):
    """(fp32, int8) records of `component`, after the checks every int8 variant must pass against its fp32
    export: its files verify, it has its own folder, the same I/O and axes, and it names the fp32 export and
    multiples it was made from."""
    fp32, int8 = manifest.onnx(component), manifest.onnx(component, "int8")
    manifest.verify_onnx(int8)
    assert int8.graph.path.startswith(f"{component}/int8-{int8.export_key[:12]}/")
    assert (int8.inputs, int8.outputs, int8.axes) == (fp32.inputs, fp32.outputs, fp32.axes)
    assert int8.extra["fp32_export_key"] == fp32.export_key
    assert int8.extra["multiples"] == fp32.extra["multiples"]
    return fp32, int8

"""The calibrated explicit Q/DQ U-Net builds as a strongly typed int8 engine (through Polygraphy, against the
TensorRT stand-in in tests/trt_sim) and computes what ONNX Runtime computes for the fp32 U-Net, within the
card's int8 engine bound. Reuses the session's calibrated tiny artifacts (no extra calibration)."""
from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = [pytest.mark.trt_sim, pytest.mark.usefixtures("trt_sim")]


def test_int8_qdq_unet_builds_strongly_typed_and_matches_fp32(calibrated, tmp_path, trt_sim):
    from k3trt.engines.build import build_engines
    from k3trt.engines.plan import make_plan
    from k3trt.engines.selftest import SHAPES
    from k3trt.export.components import SPECS
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.ort import OrtBackend
    from k3trt.contract.cards import card
    from k3trt.contract.tensor_metrics import compare

    root = tmp_path / "art"
    shutil.copytree(calibrated[0], root)
    manifest = Manifest.load(root)
    plan = make_plan(manifest, precision="int8", components="unet", resolutions=["64x64"], batch="1")
    assert build_engines(plan, manifest, log=lambda *_: None)["built"] == ["unet-int8"]
    build = trt_sim._sim.state().builds[-1]
    assert build["strongly_typed"] and "TF32" in build["flags"] and build["profiles"]

    entry = Manifest.load(root).data["engines"]["unet-int8"]
    engine = trt_sim.Runtime(trt_sim.Logger()).deserialize_cuda_engine((root / entry["file"]["path"]).read_bytes())
    ops = {n.op_type for n in engine._executor.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # the engine runs the Q/DQ graph, not the fp32 one
    inputs = SPECS["unet"].make_inputs(SHAPES["unet"], {"vocab_size": 300, "context_dim": 64},
                                       torch.Generator().manual_seed(3))
    got = trt_sim._sim.run(engine, inputs)["noise_pred"]
    with OrtBackend(Manifest.load(root), "fp32") as ort:
        want = ort.run("unet", inputs)["noise_pred"]
    metrics = compare(want, got.float())
    assert metrics.within(**card("unet").engine_tolerance("int8").bounds()), metrics

"""Sensitivity: the Q/DQ toggle is exact at both ends, and the ranking covers every block."""
import numpy as np
import onnx
import pytest

from k3trt.calibration import sensitivity as S
from k3trt.calibration.collect import plan
from k3trt.calibration.config import TrajectoryConfig
from k3trt.calibration.prompts import heldout_prompts
from k3trt.calibration.quality import fake_quant_session
from k3trt.calibration.quantize import qdq_summary
from k3trt.calibration.stage import qdq_fp32_graph
from k3trt.contract.manifest import Manifest

from cal_helpers import TINY


@pytest.fixture(scope="module")
def setup(calibrated):
    manifest = Manifest.load(calibrated[0])
    int8_path = qdq_fp32_graph(manifest, manifest.onnx("unet", "int8"))  # fp32 float parts: swaps node for node
    fp32_path = manifest.path(manifest.onnx("unet").graph.path)
    heldout = plan(manifest, heldout_prompts(2), TrajectoryConfig(**TINY))  # cached by the fixture's run
    return int8_path, fp32_path, heldout, calibrated[1]


def test_group_of_follows_module_paths():
    assert S.group_of("/unet/down_blocks.1/attentions.2/attention/to_q/MatMul") == "/unet/down_blocks.1/attentions.2/"
    assert S.group_of("/unet/up_blocks.3/resnets_out.0/resnet_blocks.1/projection/Conv") == \
        "/unet/up_blocks.3/resnets_out.0/"
    assert S.group_of("/unet/conv_out/Conv") == "/unet/conv_out/"


def test_toggle_is_exact_at_both_ends(setup):
    int8_path, fp32_path, heldout, _ = setup
    model = onnx.load(str(int8_path))
    quantized = qdq_summary(model)["quantized_nodes"]
    toggle = S.QdqToggle(model, onnx.load(str(fp32_path)))
    call = next(heldout.unet_calls())
    run = lambda m: fake_quant_session(m, 2).run(["noise_pred"], call.feeds)[0]  # noqa: E731
    np.testing.assert_allclose(run(toggle.variant(quantized)), call.noise_pred, rtol=1e-3, atol=1e-4)  # all float
    untouched = run(toggle.variant([]))
    np.testing.assert_array_equal(untouched, run(str(int8_path)))  # nothing toggled: the int8 model itself
    assert not np.allclose(untouched, call.noise_pred, rtol=1e-3, atol=1e-4)  # which does differ from fp32


@pytest.mark.slow
def test_ranking_covers_every_block(setup):
    int8_path, fp32_path, heldout, payload = setup
    quantized = qdq_summary(onnx.load(str(int8_path)))["quantized_nodes"]
    config = S.SensitivityConfig(top_groups=1, probe_timesteps=1, probe_prompts=1, suggest=2)
    result = S.analyze(int8_path, fp32_path, quantized, heldout, payload["components"]["unet"]["per_timestep"],
                       config, threads=2, log=lambda *_: None)
    assert sum(r["nodes"] for r in result["blocks"]) == len(quantized)
    costs = [r["cost"] for r in result["blocks"]]
    assert costs == sorted(costs, reverse=True) and costs[0] > 0
    assert {r["name"] for r in result["layers"]} <= set(quantized) and len(result["suggested_exclusions"]) == 2
    assert result["probe_calls"] == 1

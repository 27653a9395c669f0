"""Limits from the built engines' profiles (Pipeline, serving's BatchingEngine) and end-to-end parity of the
TensorRT backend (stand-in engines, host-simulated device) with ONNX Runtime, `k3trt generate` included."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from k3trt.contract.manifest import Manifest
from k3trt.contract.errors import InvalidArgumentError, ShapeError
from k3trt.contract.tensor_metrics import compare, psnr
from k3trt.runtime.pipeline import Pipeline

from host_device import host_devices
from trt_helpers import PROMPTS, build_tiny_engines

pytestmark = pytest.mark.trt_sim

# The stand-in runs each engine's fp32 ONNX on ONNX Runtime, so the TensorRT path must reproduce ONNX Runtime up to
# the backend's own work (copies into its buffers, batching): equal within float32 rounding. A real GPU's engines are
# held to the cards' engine tolerances instead (tests/engines/test_eng_gpu.py).
PARITY = {"max_abs": 1e-5, "rel_l2": 1e-6, "cosine": 0.999999}
MIN_PSNR_DB = 60.0


@pytest.fixture(scope="module")
def built(trt_sim_module, tiny_artifacts, tmp_path_factory):
    """fp32 engines at 64x64 for one image per call (--batch 1: the U-Net takes 2 rows, guidance doubled)."""
    with host_devices():
        yield build_tiny_engines(tiny_artifacts, tmp_path_factory.mktemp("trt-serving") / "art", batch="1")


def _counting(pipe: Pipeline) -> collections.Counter:
    """Rows of every backend call, per component (wraps the pipeline's backend.run)."""
    rows: collections.Counter = collections.Counter()
    calls = rows.calls = []  # type: ignore[attr-defined]
    run = pipe.backend.run

    def counted(component, feeds):
        batch = len(next(iter(feeds.values())))
        calls.append((component, batch))
        rows[component] = max(rows[component], batch)
        return run(component, feeds)

    pipe.backend.run = counted
    return rows


def test_pipeline_refuses_what_the_engines_cannot_take_before_any_work(built):
    pipe = Pipeline.from_artifacts(built, "trt", "fp32")
    rows = _counting(pipe)
    with pytest.raises(InvalidArgumentError, match="2 images in one call; accepted: at most 1"):
        pipe.generate(PROMPTS[0], steps=1, num_images=2)  # the ONNX allows 32; the engine was built for 1
    with pytest.raises(ShapeError, match="height 128 px.*accepted: 64..64 px"):
        pipe.generate(PROMPTS[0], steps=1, height=128, width=64)
    assert rows.calls == []  # type: ignore[attr-defined]


def test_batching_engine_with_max_batch_above_the_built_batch(built):
    """`serve --max-batch 4` against a `--batch 1` build: requests share rounds, every call fits the profiles."""
    from k3trt.runtime.serving.engine import BatchingEngine, EngineConfig

    pipe = Pipeline.from_artifacts(built, "trt", "fp32")
    requests = [dict(prompt=p, seed=i, steps=2) for i, p in enumerate(PROMPTS + ("a fox",))]
    alone = [pipe.generate(**r, output_type="np") for r in requests]
    rows = _counting(pipe)
    engine = BatchingEngine(pipe, EngineConfig(max_batch=4)).start()
    try:
        jobs = [engine.submit(_request(**r)) for r in requests]
        served = [job.result(timeout=300) for job in jobs]
    finally:
        engine.stop()
    for want, got in zip(alone, served):
        assert np.array_equal(want, got)
    profile = {c: Manifest.load(built).data["engines"][f"{c}-fp32"]["axes"]["batch"][2]
               for c in ("text_encoder", "unet", "movq_decoder")}
    assert dict(rows) == profile  # every component called, none beyond its engine's batch


def _request(prompt, seed, steps):
    from k3trt.runtime.pipeline import make_request

    return make_request(prompt, seed=seed, steps=steps, height=64, width=64)


def test_trt_pipeline_matches_onnx_runtime(built):
    trt = Pipeline.from_artifacts(built, "trt", "fp32")
    ort = Pipeline.from_artifacts(built, "ort", "fp32")
    for prompt in PROMPTS:
        want = ort.generate(prompt, steps=3, seed=11, output_type="np")
        got = trt.generate(prompt, steps=3, seed=11, output_type="np")
        metrics = compare(want, got)
        assert metrics.within(**PARITY), (prompt, metrics)
        assert psnr(want, got) >= MIN_PSNR_DB


def test_generate_command_with_the_trt_backend(built, tmp_path):
    from k3trt.cli.main import main

    images = {}
    for backend in ("ort", "trt"):
        out = tmp_path / f"{backend}.png"
        assert main(["generate", "--artifacts", str(built), "--backend", backend, "--precision", "fp32",
                     "--prompt", PROMPTS[1], "--steps", "3", "--seed", "5", "--out", str(out)]) == 0
        images[backend] = np.asarray(Image.open(out), dtype=np.float64) / 255
    assert psnr(images["ort"], images["trt"]) >= MIN_PSNR_DB

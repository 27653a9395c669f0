"""Build, run, refit, CUDA graphs and parity with TensorRT engines on the tiny preset, twice over:

- `stand-in` (markers trt_sim and slow: `pytest -m trt_sim`): the same tests against the TensorRT stand-in,
  for everything that needs no real kernels: builds through Polygraphy, manifest records, refit, numerics of
  the built engines (the stand-in runs their ONNX on ONNX Runtime);
- `gpu` (marker gpu, `pytest -m gpu`): real TensorRT on an NVIDIA GPU; skips with the reason elsewhere.
Tests of TrtBackend itself (device buffers, streams, CUDA graphs) run on `gpu` only: on the stand-in they need
the backend's host device seam (runtime/backends/trt.py, not in this module's scope), and say so when skipped.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from k3trt.engines.selftest import SHAPES

COMPARED = tuple(SHAPES)  # the components these tests feed and compare (the tiny preset exports more)
# The stand-in run converts the tiny U-Net to fp16 (1-2 min on 2 cores), so it is `slow` too: the default run
# covers the same build, refit and numerics paths on the smaller graphs (test_eng_sim_build.py, int8 in
# tests/calibration/test_cal_trt_sim.py); `pytest -m trt_sim` runs this one as well.
KINDS = [pytest.param("stand-in", marks=[pytest.mark.trt_sim, pytest.mark.slow]), pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module", params=KINDS)
def gpu(request):
    """(kind, the device environment) with TensorRT importable: the stand-in, or a real GPU."""
    if request.param == "stand-in":
        with request.getfixturevalue("trt_sim_installer")():
            from k3trt.runtime.tensorrt_env import current_env

            yield request.param, current_env()
        return
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'kandinsky3-trt[gpu-cu13]' on a "
                                           "machine with an NVIDIA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch (a CUDA build of torch and an NVIDIA driver are needed)")
    from k3trt.runtime.tensorrt_env import current_env

    yield request.param, current_env()


def needs_real_device(gpu):
    if gpu[0] == "stand-in":
        pytest.skip("runs TrtBackend, whose device buffers/streams need CUDA or the backend's host device seam "
                    "(runtime/backends/trt.py); the stand-in covers the engines themselves here")


@pytest.fixture(scope="module")
def built(gpu, request, tmp_path_factory):
    """A private copy of the tiny artifacts with refittable default-precision engines at 64x64, batch 1, for the
    components these tests compare. The session's tiny export is requested only after the GPU check."""
    from k3trt.engines.build import build_engines
    from k3trt.engines.plan import BuildFlags, make_plan
    from k3trt.contract.manifest import Manifest

    root = tmp_path_factory.mktemp("gpu") / "art"
    shutil.copytree(request.getfixturevalue("tiny_artifacts"), root)
    manifest = Manifest.load(root)
    plan = make_plan(manifest, components=",".join(COMPARED), resolutions=["64x64"], batch="1",
                     flags=BuildFlags(refittable=True), create_variants=True)
    summary = build_engines(plan, manifest, log=print)
    assert summary["built"] == [cp.name for cp in plan.components] and len(plan.components) == len(COMPARED)
    return root, plan


def _feeds(component):
    from k3trt.export.components import SPECS

    info = {"vocab_size": 300, "context_dim": 64}
    return SPECS[component].make_inputs(SHAPES[component], info, torch.Generator().manual_seed(3))


def _run_engine(gpu, manifest, name, feeds):
    """One engine's outputs: through TrtBackend on a GPU, through the stand-in's runtime otherwise."""
    entry = manifest.data["engines"][name]
    if gpu[0] == "gpu":
        from k3trt.runtime.backends.trt import TrtBackend

        with TrtBackend(manifest, {entry["component"]: entry["precision"]}) as backend:
            return {k: v.cpu() for k, v in backend.run(entry["component"], feeds).items()}
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(manifest.path(entry["file"]["path"]).read_bytes())
    return trt._sim.run(engine, feeds)


def test_build_records_engines(built, gpu):
    from k3trt.engines.build import timing_cache_path
    from k3trt.contract.manifest import FileRecord, Manifest

    root, plan = built
    env = gpu[1]
    manifest = Manifest.load(root)
    for cp in plan.components:
        entry = manifest.data["engines"][cp.name]
        manifest.verify([FileRecord(**entry["file"])])
        assert entry["tensorrt"] == env.trt_version and tuple(entry["gpu"]["compute_capability"]) == \
            env.compute_capability
        assert entry["onnx_sha256"] == manifest.onnx(cp.component, cp.precision.variant).graph.sha256
        assert entry["flags"]["strongly_typed"] and entry["variant"] == cp.precision.variant
    assert timing_cache_path(root, env).is_file()
    assert manifest.data["engines"]["text_encoder-bf16"]["fp32_nodes"] > 0


def test_rebuild_is_skipped_when_up_to_date(built):
    from k3trt.engines.build import build_engines
    from k3trt.contract.manifest import Manifest

    root, plan = built
    assert build_engines(plan, Manifest.load(root), log=print)["up_to_date"] == [c.name for c in plan.components]


def test_engines_match_onnx_runtime(built, gpu):
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.ort import OrtBackend
    from k3trt.contract.cards import card
    from k3trt.contract.tensor_metrics import compare

    root, plan = built
    manifest = Manifest.load(root)
    with OrtBackend(manifest, "fp32") as ort:
        for cp in plan.components:
            feeds = _feeds(cp.component)
            got, want = _run_engine(gpu, manifest, cp.name, feeds), ort.run(cp.component, feeds)
            precision = cp.precision.precision.value
            for name in want:
                metrics = compare(want[name], got[name].float())
                bounds = card(cp.component).engine_tolerance(precision).bounds()
                assert metrics.within(**bounds), f"{cp.component}.{name} {precision}: {metrics}"


def test_trt_backend_records_gpu_time(built, gpu):
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.trt import TrtBackend

    needs_real_device(gpu)
    with TrtBackend(Manifest.load(built[0])) as trt:
        for component in COMPARED:
            trt.run(component, _feeds(component))
            assert trt.timings[component] and trt.timings[component][-1] > 0


def test_feeds_outside_the_profile_are_refused(built, gpu):
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.trt import TrtBackend
    from k3trt.contract.errors import ShapeError

    needs_real_device(gpu)
    with TrtBackend(Manifest.load(built[0])) as trt:
        feeds = _feeds("movq_decoder")
        feeds["latents"] = torch.randn(1, 4, 16, 16)  # engine is static at 8x8
        with pytest.raises(ShapeError, match="movq_decoder-fp16"):
            trt.run("movq_decoder", feeds)


def test_cuda_graph_replay_matches_direct_runs(built, gpu):
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.trt import TrtBackend

    needs_real_device(gpu)
    manifest = Manifest.load(built[0])
    with TrtBackend(manifest) as direct, TrtBackend(manifest, cuda_graphs=True) as graphs:
        for seed in (3, 4):
            feeds = {k: (v * (seed - 2.5) if k == "sample" else v) for k, v in _feeds("unet").items()}
            want = direct.run("unet", feeds)["noise_pred"]
            graphs.run("unet", feeds)
            got = graphs.run("unet", feeds)["noise_pred"]  # replayed
            assert torch.allclose(want, got, atol=1e-5, rtol=1e-4)


def test_refit_to_another_seed(built, gpu, tmp_path):
    from k3trt.engines.refit import refit_artifacts
    from k3trt.export.components import SPECS
    from k3trt.export.presets import write_preset
    from k3trt.export.sources import open_model_dir
    from k3trt.contract.manifest import Manifest
    from k3trt.contract.tensor_metrics import compare

    root = tmp_path / "art"
    shutil.copytree(built[0], root)  # module fixtures stay as built for the other tests
    model_dir = write_preset("tiny", tmp_path / "seed1", seed=1)
    feeds = _feeds("text_encoder")
    old = _run_engine(gpu, Manifest.load(root), "text_encoder-bf16", feeds)["last_hidden_state"]
    assert refit_artifacts(str(root), str(model_dir), components=["text_encoder"]) == ["text_encoder-bf16"]
    manifest = Manifest.load(root)
    assert manifest.data["engines"]["text_encoder-bf16"]["refit"]["source"] == str(model_dir)
    source = open_model_dir(model_dir)
    spec = SPECS["text_encoder"]
    with torch.no_grad():
        want = spec.wrapper(source.load(spec.folder)).eval()(feeds["input_ids"], feeds["attention_mask"])
    new = _run_engine(gpu, manifest, "text_encoder-bf16", feeds)["last_hidden_state"]
    assert compare(want, new.float()).cosine > 0.995 and compare(old.float(), new.float()).cosine < 0.99


def test_engine_from_another_tensorrt_is_refused(built, gpu, tmp_path):
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.trt import TrtBackend
    from k3trt.contract.errors import EngineCompatibilityError
    from k3trt.writing.atomic import save_manifest

    needs_real_device(gpu)
    root = tmp_path / "art"
    shutil.copytree(built[0], root)
    manifest = Manifest.load(root)
    manifest.data["engines"]["unet-fp16"]["tensorrt"] = "9.9.9"
    save_manifest(manifest)
    with TrtBackend(Manifest.load(root)) as trt, pytest.raises(EngineCompatibilityError, match="9.9.9"):
        trt.run("unet", _feeds("unet"))


def test_selftest_gpu_passes(gpu, tmp_path):
    from k3trt.engines.selftest import run_selftest

    needs_real_device(gpu)
    assert run_selftest(gpu=True, precisions=["fp32", "fp16"], keep=str(tmp_path), log=print) == 0


def test_int8_qdq_unet_builds_and_runs(gpu, request, tmp_path):
    """The calibration stage's explicit Q/DQ U-Net is accepted by the engine build and runs finite. (On the
    stand-in: tests/calibration/test_cal_trt_sim.py, on the session's calibrated artifacts.)"""
    from k3trt.calibration.config import QuantConfig, TrajectoryConfig
    from k3trt.calibration.stage import CalibrationRequest, calibrate
    from k3trt.engines.build import build_engines
    from k3trt.engines.plan import make_plan
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.trt import TrtBackend

    needs_real_device(gpu)
    root = tmp_path / "art"
    shutil.copytree(request.getfixturevalue("tiny_artifacts"), root)
    calibrate(CalibrationRequest(artifacts=root, trajectory=TrajectoryConfig(steps=3, height=64, width=64),
                                 quant=QuantConfig(), num_prompts=2, heldout=2, threads=2), log=print)
    manifest = Manifest.load(root)
    plan = make_plan(manifest, precision="int8", components="unet", resolutions=["64x64"], batch="1")
    assert build_engines(plan, manifest, log=print)["built"]
    backend = TrtBackend(Manifest.load(root), {"unet": "int8"})
    out = backend.run("unet", {k: v.cuda() for k, v in _feeds("unet").items()})["noise_pred"]
    assert torch.isfinite(out).all() and out.abs().max() > 0

"""`k3trt build` / `check` / `refit` end to end on the tiny preset, through Polygraphy's real loaders, against the
TensorRT stand-in (tests/trt_sim): strongly typed fp32/fp16/bf16 builds, their numerics, and the build defects of
issue 18 (each test names the one it guards). int8 is in tests/calibration/test_cal_trt_sim.py (it reuses the
calibrated session fixture)."""
from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = [pytest.mark.trt_sim]
COMPONENTS = "text_encoder,movq_decoder"  # the small graphs: the U-Net's builds are covered by int8 (calibration)


@pytest.fixture(scope="module")
def art(tiny_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("sim-build") / "art"
    shutil.copytree(tiny_artifacts, root)
    return root


def build(root, log=None, **request):
    from k3trt.engines.build import build_engines
    from k3trt.engines.plan import make_plan
    from k3trt.contract.manifest import Manifest

    manifest = Manifest.load(root)
    plan = make_plan(manifest, resolutions=["64x64"], batch="1", create_variants=True, log=lambda *_: None,
                     **request)
    return plan, build_engines(plan, manifest, log=log or (lambda *_: None))


@pytest.fixture(scope="module")
def default_build(art, trt_sim_module):
    """The cards' default precisions (text encoder bf16, MoVQ fp16), as a plain `k3trt build` makes them."""
    trt_sim_module._sim.state().builds.clear()
    plan, summary = build(art, components=COMPONENTS)
    return plan, summary, list(trt_sim_module._sim.state().builds), trt_sim_module._sim.state().host_memory_copies


def feeds(component):
    from k3trt.engines.selftest import SHAPES
    from k3trt.export.components import SPECS

    info = {"vocab_size": 300, "context_dim": 64}
    return SPECS[component].make_inputs(SHAPES[component], info, torch.Generator().manual_seed(3))


def run_engine(trt, root, name, inputs):
    from k3trt.contract.manifest import Manifest

    manifest = Manifest.load(root)
    plan = manifest.path(manifest.data["engines"][name]["file"]["path"]).read_bytes()
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    assert engine is not None, f"{name} did not deserialize"
    return trt._sim.run(engine, inputs)


def assert_matches_onnx_runtime(trt, root, component, precision):
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.ort import OrtBackend
    from k3trt.contract.cards import card
    from k3trt.contract.tensor_metrics import compare

    inputs = feeds(component)
    got = run_engine(trt, root, f"{component}-{precision}", inputs)
    with OrtBackend(Manifest.load(root), "fp32") as ort:
        want = ort.run(component, inputs)
    bounds = card(component).engine_tolerance(precision).bounds()
    for name, reference in want.items():
        metrics = compare(reference, got[name].float())
        assert metrics.within(**bounds), f"{component}.{name} {precision}: {metrics} (bounds {bounds})"


def test_default_build_runs_polygraphy_strongly_typed_and_computes_like_onnx_runtime(default_build, art, trt_sim):
    from k3trt.contract.manifest import FileRecord, Manifest

    plan, summary, builds, _ = default_build
    assert summary["built"] == [cp.name for cp in plan.components] == ["text_encoder-bf16", "movq_decoder-fp16"]
    manifest = Manifest.load(art)
    for cp in plan.components:
        entry = manifest.data["engines"][cp.name]
        manifest.verify([FileRecord(**entry["file"])])
        assert entry["tensorrt"] == trt_sim.__version__ and entry["flags"]["strongly_typed"]
        assert entry["onnx_sha256"] == manifest.onnx(cp.component, cp.precision.variant).graph.sha256
    assert all(b["strongly_typed"] and not b["problems"] for b in builds)
    assert_matches_onnx_runtime(trt_sim, art, "text_encoder", "bf16")
    assert_matches_onnx_runtime(trt_sim, art, "movq_decoder", "fp16")


def test_a_current_build_is_skipped(default_build, art, trt_sim):
    plan, *_ = default_build
    assert build(art, components=COMPONENTS)[1]["up_to_date"] == [cp.name for cp in plan.components]


def test_fp32_islands_may_use_tf32_and_strict_fp32_may_not(default_build, art, trt_sim):
    """Issue 18: fp32 islands of fp16/bf16 builds ran without TF32 (Polygraphy clears the flag unless asked)."""
    _, _, builds, _ = default_build
    assert all("TF32" in b["flags"] for b in builds)
    trt_sim._sim.state().builds.clear()
    build(art, components="movq_decoder", precision="fp32")
    assert [("TF32" in b["flags"]) for b in trt_sim._sim.state().builds] == [False]


def test_the_plan_is_written_without_a_host_copy(default_build):
    """Issue 18: `bytes(build())` copied the serialized plan (a ~17 GB text encoder: twice the host RAM)."""
    *_, copies = default_build
    assert copies == 0


def test_the_timing_cache_is_keyed_by_tensorrt_version_and_gpu(default_build, art, trt_sim):
    """Issue 18: one timing.cache for every TensorRT version and GPU; a cache is valid for one of each."""
    assert (art / "engines" / "timing-trt11.4.0.106-sm80.cache").is_file()
    trt_sim._sim.set_device("NVIDIA H100 80GB HBM3 (TensorRT stand-in)", (9, 0))
    build(art, components="movq_decoder")
    assert (art / "engines" / "timing-trt11.4.0.106-sm90.cache").is_file()
    assert not (art / "engines" / "timing.cache").exists()


def test_bf16_build_keeps_resize_fp32_and_passes_check(art, trt_sim):
    """Issue 18: AutoCast made the MoVQ decoder's Resize nodes bf16; TensorRT has no bf16 Resize, and the build
    failed after the parser had accepted the graph. The export keeps them fp32; the build and the lint pass."""
    from k3trt.engines.check import check_artifacts, tensor_types
    import onnx

    from k3trt.contract.manifest import Manifest

    plan, summary = build(art, components="movq_decoder", precision="bf16")
    assert summary["built"] == ["movq_decoder-bf16"]
    manifest = Manifest.load(art)
    model = onnx.load(str(manifest.path(manifest.onnx("movq_decoder", "bf16").graph.path)), load_external_data=False)
    types = tensor_types(model)
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resizes and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in resizes)
    assert sum(types.get(t.name) == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer) > 0  # still bf16
    assert_matches_onnx_runtime(trt_sim, art, "movq_decoder", "bf16")
    results = [r for r in check_artifacts(art, trt_version=(11, 4)) if r.label == "movq_decoder/bf16"]
    assert results and results[0].errors == []


def test_the_stand_in_fails_a_bf16_resize_build_as_tensorrt_does(trt_sim, tmp_path):
    """What the export now avoids: the parser accepts a bf16 Resize, the builder finds no implementation."""
    import onnx
    from onnx import TensorProto

    from test_eng_parser_support import resize_model

    path = tmp_path / "resize.onnx"
    onnx.save(resize_model(TensorProto.BFLOAT16), path)
    logger = trt_sim.Logger()
    builder = trt_sim.Builder(logger)
    network = builder.create_network(0)
    parser = trt_sim.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path))
    assert builder.build_serialized_network(network, builder.create_builder_config()) is None
    assert "Could not find any implementation for node /decoder/up.0/upsample/Resize" in logger._messages[-1][1]


def test_a_null_builder_is_a_typed_error_naming_the_driver(art, trt_sim):
    """Issue 18: a driver older than the TensorRT wheel's CUDA gives a null Builder (a bare pybind11 TypeError)."""
    from k3trt.contract.errors import BackendUnavailableError

    trt_sim._sim.set_driver_ok(False)
    with pytest.raises(BackendUnavailableError, match="driver") as caught:
        build(art, components="movq_decoder", flags=_flags(force=True))
    assert "R580" in str(caught.value) and "gpu-cu12" in str(caught.value)


def _flags(**kwargs):
    from k3trt.engines.plan import BuildFlags

    return BuildFlags(**kwargs)


@pytest.mark.parametrize("version", ["10.0.1", "11.4.0.106"])
def test_both_major_versions_build_through_polygraphy(art, trt_sim, version):
    trt_sim._sim.impersonate(version)
    trt_sim._sim.state().builds.clear()
    _, summary = build(art, components="movq_decoder", flags=_flags(force=True))
    assert summary["built"] == ["movq_decoder-fp16"]
    assert trt_sim._sim.state().builds[-1]["strongly_typed"]  # STRONGLY_TYPED on 10, every network on 11
    assert_matches_onnx_runtime(trt_sim, art, "movq_decoder", "fp16")


def test_refit_replaces_weights_by_name(art, trt_sim, tmp_path):
    """A refittable engine takes another checkpoint's weights (k3trt refit): same outputs as that checkpoint."""
    from k3trt.engines.refit import refit_artifacts
    from k3trt.export.components import SPECS
    from k3trt.export.presets import write_preset
    from k3trt.export.sources import open_model_dir
    from k3trt.contract.manifest import Manifest
    from k3trt.contract.cards import card
    from k3trt.contract.tensor_metrics import compare

    build(art, components="text_encoder", precision="fp32", flags=_flags(refittable=True))
    inputs = feeds("text_encoder")
    old = run_engine(trt_sim, art, "text_encoder-fp32", inputs)["last_hidden_state"]
    model_dir = write_preset("tiny", tmp_path / "seed1", seed=1)
    assert refit_artifacts(str(art), str(model_dir), components=["text_encoder"], log=lambda *_: None) == \
        ["text_encoder-fp32"]
    assert Manifest.load(art).data["engines"]["text_encoder-fp32"]["refit"]["source"] == str(model_dir)
    new = run_engine(trt_sim, art, "text_encoder-fp32", inputs)["last_hidden_state"]
    spec = SPECS["text_encoder"]
    with torch.no_grad():
        want = spec.wrapper(open_model_dir(model_dir).load(spec.folder)).eval()(*(inputs[n] for n in spec.input_names))
    assert compare(want, new).within(**card("text_encoder").engine_tolerance("fp32").bounds())
    assert compare(old, new).cosine < 0.99

"""`k3trt selftest --gpu`'s TensorRT path on the TensorRT stand-in (tests/trt_sim): it builds only the three
components it compares (fp16 by default: 3 builds, not 6 components x 4 precisions), and a precision that fails
is that precision's failed row while the next precision still builds and runs."""
from __future__ import annotations

import shutil

import pytest

pytestmark = [pytest.mark.trt_sim, pytest.mark.usefixtures("trt_sim")]


@pytest.fixture()
def compared(tiny_artifacts, tiny_model_dir, tmp_path):
    """A copy of the tiny artifacts and the self-test's feeds and fp32 references (CPU)."""
    from k3trt.contract.manifest import Manifest
    from k3trt.engines import selftest
    from k3trt.export.sources import open_model_dir

    root = tmp_path / "art"
    shutil.copytree(tiny_artifacts, root)
    source, manifest = open_model_dir(tiny_model_dir), Manifest.load(root)
    feeds = {c: selftest._feeds(source, c) for c in selftest.SHAPES}
    return manifest, feeds, selftest._references(source, manifest, feeds)


@pytest.mark.slow  # 2-4.5 min on 2 cores: it converts the tiny U-Net to fp16 (the selftest's default)
def test_default_precision_builds_the_three_compared_components(compared, trt_sim):
    from k3trt.contract.manifest import Manifest
    from k3trt.engines import selftest

    manifest, feeds, refs = compared
    parts = selftest.tensorrt_parts(manifest, feeds, refs, None, print)
    assert [p.name for p in parts] == ["TensorRT fp16", "TensorRT CUDA graph"]
    built = sorted(Manifest.load(manifest.root).data.get("engines", {}))
    assert built == ["movq_decoder-fp16", "text_encoder-fp16", "unet-fp16"]
    assert len(trt_sim._sim.state().builds) == 3


@pytest.mark.slow  # 2-4.5 min on 2 cores: it converts the tiny U-Net to fp16 (the selftest's default)
def test_a_failing_precision_is_a_failed_row_not_an_abort(compared, trt_sim, monkeypatch, capsys):
    from k3trt.contract.manifest import Manifest
    from k3trt.engines import build, selftest

    real_build = build.build_engines

    def bf16_fails(plan, manifest, **options):
        if any(c.precision.precision.value == "bf16" for c in plan.components):
            raise RuntimeError("planted bf16 build failure")
        return real_build(plan, manifest, **options)

    monkeypatch.setattr(build, "build_engines", bf16_fails)
    manifest, feeds, refs = compared
    parts = selftest.tensorrt_parts(manifest, feeds, refs, ["bf16", "fp16"], print)
    status = {p.name: p for p in parts}
    assert status["TensorRT bf16"].status == "failed" and "planted bf16 build failure" in status["TensorRT bf16"].why
    assert status["TensorRT fp16"].status != "skipped"  # it ran after the bf16 failure
    assert sorted(Manifest.load(manifest.root).data["engines"]) == ["movq_decoder-fp16", "text_encoder-fp16",
                                                                    "unet-fp16"]
    code = selftest.report(parts, print)
    assert code == selftest.EXIT_FAILED
    assert "failed   TensorRT bf16: RuntimeError: planted bf16 build failure" in capsys.readouterr().out

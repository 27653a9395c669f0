"""`k3trt export --preset tiny` end to end in a subprocess, with its own preset cache (item 9)."""
from __future__ import annotations

import os
import subprocess
import sys


from k3trt.contract.manifest import Manifest


def k3trt(*args: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "K3TRT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "k3trt.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_export_preset_end_to_end_then_up_to_date(tmp_path):
    cache, art = tmp_path / "cache", tmp_path / "ART"
    args = ("export", "--preset", "tiny", "--out", str(art), "--components", "text_encoder")

    first = k3trt(*args, cache=cache)
    assert first.returncode == 0, first.stderr
    assert "building preset 'tiny'" in first.stderr and "text_encoder: ok" in first.stderr, first.stderr
    assert "exported ['text_encoder']" in first.stderr
    presets = list((cache / "presets").iterdir())
    assert len(presets) == 1 and presets[0].name.startswith("tiny-"), presets  # built in the given cache only
    manifest = Manifest.load(art)
    assert manifest.components() == ["text_encoder"]
    record = manifest.onnx("text_encoder")
    manifest.verify_onnx(record)
    assert manifest.data["source"]["label"] == "preset tiny seed 0"
    graph = manifest.path(record.graph.path)
    mtime = graph.stat().st_mtime_ns

    second = k3trt(*args, cache=cache)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stderr and "building preset" not in second.stderr, second.stderr
    assert "exported nothing" in second.stderr
    assert graph.stat().st_mtime_ns == mtime
    assert Manifest.load(art).data["onnx"] == manifest.data["onnx"]


def capture_export_call(monkeypatch) -> dict:
    """Replace the export itself: these tests are about how the CLI maps flags to `export_artifacts`."""
    import k3trt.export.writer as writer

    seen = {}

    def fake_export(source, out, **kwargs):
        seen.update(kwargs, source=source, out=out)
        return {"exported": [], "up_to_date": list(kwargs["components"]), "peak_rss_mb": 0.0}

    monkeypatch.setattr(writer, "export_artifacts", fake_export)
    return seen


def test_cli_flags_reach_export_artifacts(tiny_model_dir, tmp_path, monkeypatch):
    from k3trt.export.onnx_export import DEFAULT_OPSET, PROTOBUF_LIMIT
    from k3trt.cli.main import main

    seen = capture_export_call(monkeypatch)
    base = ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "A")]
    assert main(base) == 0
    assert seen["components"] == ["text_encoder", "unet", "movq_decoder", "movq_encoder", "unet_inpainting",
                                  "unet_flash"]  # every component the preset has weights for
    assert (seen["opset"], seen["external_threshold"], seen["force"]) == (DEFAULT_OPSET, PROTOBUF_LIMIT, False)
    assert seen["source"].root == tiny_model_dir and seen["source"].variant is None
    assert main(base + ["--components", " unet, movq_decoder ", "--opset", "18", "--force",
                        "--external-data-threshold-mb", "0.5"]) == 0
    assert seen["components"] == ["unet", "movq_decoder"]
    assert (seen["opset"], seen["external_threshold"], seen["force"]) == (18, 512 * 1024, True)


def test_cli_zero_external_data_threshold_is_honoured(tiny_model_dir, tmp_path, monkeypatch):
    from k3trt.cli.main import main

    seen = capture_export_call(monkeypatch)
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "A"),
                 "--external-data-threshold-mb", "0"]) == 0
    assert seen["external_threshold"] == 0

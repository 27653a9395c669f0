"""Tampered, missing and foreign artifacts are detected with an ArtifactError that names them (item 6)."""
from __future__ import annotations

import json
import os

import pytest

from k3trt.export.writer import export_artifacts
from k3trt.contract.manifest import Manifest
from k3trt.runtime.backends.ort import OrtBackend
from k3trt.contract.errors import ArtifactError

from export_helpers import quiet


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(root, edit) -> None:
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data, indent=2))


def test_flipped_byte_is_reported_as_modified(artifacts_copy):
    manifest = Manifest.load(artifacts_copy)
    record = manifest.onnx("unet")
    flip_byte(manifest.path(record.graph.path))
    with pytest.raises(ArtifactError) as excinfo:
        manifest.verify_onnx(record)
    message = str(excinfo.value)
    assert record.graph.path in message and "was modified" in message and "fix:" in message
    with pytest.raises(ArtifactError, match="was modified") as excinfo:
        OrtBackend(manifest, threads=1).session("unet")
    assert record.graph.path in str(excinfo.value)
    manifest.verify_onnx(manifest.onnx("text_encoder"))  # the others are still fine


def test_deleted_file_is_reported_as_missing(artifacts_copy):
    manifest = Manifest.load(artifacts_copy)
    record = manifest.onnx("movq_decoder")
    os.remove(manifest.path(record.graph.path))
    with pytest.raises(ArtifactError) as excinfo:
        manifest.verify_onnx(record)
    assert record.graph.path in str(excinfo.value) and "missing" in str(excinfo.value)
    with pytest.raises(ArtifactError, match="missing"):
        OrtBackend(manifest, threads=1).session("movq_decoder")


def test_reexport_repairs_a_tampered_component(artifacts_copy, tiny_source):
    """Unchanged inputs are not enough to skip a component: its files must still hash to the manifest."""
    manifest = Manifest.load(artifacts_copy)
    flip_byte(manifest.path(manifest.onnx("text_encoder").graph.path))
    summary = export_artifacts(tiny_source, artifacts_copy, components=("text_encoder", "movq_decoder"), log=quiet)
    assert summary["exported"] == ["text_encoder"] and summary["up_to_date"] == ["movq_decoder"]
    manifest = Manifest.load(artifacts_copy)
    manifest.verify_onnx(manifest.onnx("text_encoder"))


@pytest.mark.parametrize("version", [2, 0, None])
def test_other_schema_version_refused(artifacts_copy, tiny_source, version):
    edit_manifest(artifacts_copy, lambda d: d.update(schema_version=version))
    before = (artifacts_copy / "manifest.json").read_bytes()
    with pytest.raises(ArtifactError) as excinfo:
        Manifest.load(artifacts_copy)
    message = str(excinfo.value)
    assert f"schema version {version!r}" in message and "accepted: 1" in message, message
    assert "manifest.json" in message
    # the export stage refuses to update it too, and leaves it as it was
    with pytest.raises(ArtifactError, match="accepted: 1"):
        export_artifacts(tiny_source, artifacts_copy, components=("text_encoder",), log=quiet)
    assert (artifacts_copy / "manifest.json").read_bytes() == before


def test_malformed_manifest_refused(artifacts_copy):
    (artifacts_copy / "manifest.json").write_text('{"schema_version": 1,')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Manifest.load(artifacts_copy)


@pytest.mark.parametrize("escape", ["../x", "../../etc/passwd", "/etc/passwd", "unet/../../x", "symlink"])
def test_manifest_path_escaping_the_directory_refused(artifacts_copy, tmp_path, escape):
    if escape == "symlink":  # a link inside the directory that resolves outside it
        outside = tmp_path / "outside.onnx"
        outside.write_bytes(b"not an artifact")
        (artifacts_copy / "link.onnx").symlink_to(outside)
        escape = "link.onnx"
    edit_manifest(artifacts_copy, lambda d: d["onnx"]["unet"]["fp32"]["graph"].update(path=escape))
    manifest = Manifest.load(artifacts_copy)
    with pytest.raises(ArtifactError) as excinfo:
        manifest.verify_onnx(manifest.onnx("unet"))
    message = str(excinfo.value)
    assert repr(escape) in message and "outside the artifact directory" in message, message
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        OrtBackend(manifest, threads=1).session("unet")


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        Manifest.load(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="manifest.json' is missing"):
        Manifest.load(tmp_path)

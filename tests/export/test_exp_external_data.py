"""External data: weights in `model.onnx.data` beside the graph, hashed in the manifest, and refused when an
initializer's location points outside the artifact directory (issue 2, item 3)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from k3trt.export.components import SPECS
from k3trt.export.writer import export_artifacts
from k3trt.contract.manifest import Manifest, check_external_data_paths, sha256_file
from k3trt.runtime.backends.ort import OrtBackend
from k3trt.contract.errors import ArtifactError
from k3trt.contract.tensor_metrics import compare

from export_helpers import quiet


@pytest.fixture(scope="module")
def external_art(tiny_source, tmp_path_factory):
    """The tiny MoVQ decoder exported with a 1 KiB external-data threshold (read-only: copy to tamper)."""
    out = tmp_path_factory.mktemp("external") / "art"
    summary = export_artifacts(tiny_source, out, components=("movq_decoder",), external_threshold=1024, log=quiet)
    return out, summary


def external_locations(graph: onnx.GraphProto) -> list[str]:
    return [next(e.value for e in t.external_data if e.key == "location")
            for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def test_external_data_file_written_and_recorded(external_art, tiny_artifacts):
    out, summary = external_art
    assert summary["exported"] == ["movq_decoder"] and summary["up_to_date"] == []
    manifest = Manifest.load(out)
    assert manifest.components() == ["movq_decoder"]
    record = manifest.onnx("movq_decoder")
    graph, data = manifest.path(record.graph.path), manifest.path(record.external_data.path)
    assert data == graph.with_name("model.onnx.data") and data.is_file()
    assert record.external_data.sha256 == sha256_file(data)
    assert record.external_data.bytes == data.stat().st_size
    manifest.verify_onnx(record)
    # the weights live in the data file; the graph keeps only structure and tensors under 1 KiB
    inline = Manifest.load(tiny_artifacts).onnx("movq_decoder").graph.bytes  # the same model, one file
    assert data.stat().st_size > 0.8 * inline and graph.stat().st_size < 0.2 * inline
    assert abs(data.stat().st_size + graph.stat().st_size - inline) < 0.05 * inline
    locations = external_locations(onnx.load(str(graph), load_external_data=False).graph)
    assert locations and set(locations) == {"model.onnx.data"}
    # the threshold is an export option: it is part of the key, so these files never alias the inline export
    assert record.export_key != Manifest.load(tiny_artifacts).onnx("movq_decoder").export_key
    check_external_data_paths(graph, manifest.root)  # legitimate locations pass


def test_external_data_model_runs_and_matches_torch(external_art, tiny_source):
    out, _ = external_art
    manifest = Manifest.load(out)
    latents = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        expected = SPECS["movq_decoder"].wrapper(tiny_source.load("movq")).eval()(latents).numpy()

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(manifest.path(manifest.onnx("movq_decoder").graph.path)), options,
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(["image"], {"latents": latents.numpy()})
    assert compare(expected, got).within(rel_l2=1e-4), str(compare(expected, got))

    with OrtBackend(manifest, threads=1) as backend:  # the runtime path: verify, path check, session
        image = backend.run("movq_decoder", {"latents": latents})["image"]
    assert np.array_equal(image.numpy(), got)


def tamper_location(root, location: str) -> Manifest:
    """Point the first external initializer at `location`, re-hash the graph in the manifest, reload it."""
    manifest = Manifest.load(root)
    record = manifest.onnx("movq_decoder")
    graph_file = manifest.path(record.graph.path)
    model = onnx.load(str(graph_file), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entry = next(e for e in tensor.external_data if e.key == "location")
    entry.value = location
    graph_file.write_bytes(model.SerializeToString())
    data = json.loads((root / "manifest.json").read_text())
    data["onnx"]["movq_decoder"]["fp32"]["graph"].update(sha256=sha256_file(graph_file),
                                                         bytes=graph_file.stat().st_size)
    (root / "manifest.json").write_text(json.dumps(data, indent=2))
    manifest = Manifest.load(root)
    manifest.verify_onnx(manifest.onnx("movq_decoder"))  # hashes are consistent: only the location is bad
    return manifest


@pytest.mark.parametrize("location", ["../../../etc/passwd", "/etc/passwd"])
def test_external_location_outside_directory_refused(external_art, tmp_path, location):
    root = tmp_path / "art"
    shutil.copytree(external_art[0], root)
    manifest = tamper_location(root, location)
    graph_file = manifest.path(manifest.onnx("movq_decoder").graph.path)
    assert location in external_locations(onnx.load(str(graph_file), load_external_data=False).graph)

    with pytest.raises(ArtifactError) as excinfo:
        check_external_data_paths(graph_file, manifest.root)
    assert "outside the artifact directory" in str(excinfo.value)
    assert "etc/passwd" in str(excinfo.value)

    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        OrtBackend(manifest, threads=1).session("movq_decoder")


def test_ort_backend_opens_relative_artifact_directory(tiny_artifacts, monkeypatch):
    monkeypatch.chdir(tiny_artifacts.parent)
    manifest = Manifest.load(tiny_artifacts.name)
    session = OrtBackend(manifest, threads=1).session("text_encoder")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]

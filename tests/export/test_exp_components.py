"""Each component's export and validation, read from the session's `tiny_artifacts` (issue 2, item 1)."""
from __future__ import annotations

import importlib.metadata as md
import json
import platform

import numpy as np
import onnx
import pytest

from k3trt.export.components import SPECS
from k3trt.export.onnx_export import DEFAULT_OPSET
from k3trt.export.presets import SCHEDULER_CONFIG
from k3trt.contract.manifest import Manifest, TensorSpec, sha256_file, sha256_json

# What the tiny preset's manifest must say, written out by hand from export/components.py and the preset's
# config (d_model = encoder_hid_dim = 64): constants resolved to numbers, dynamic axes kept as names.
EXPECTED_IO = {
    "text_encoder": (
        (TensorSpec("input_ids", "int32", ("batch", "sequence")),
         TensorSpec("attention_mask", "int32", ("batch", "sequence"))),
        (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 64)),),
    ),
    "unet": (
        (TensorSpec("sample", "float32", ("batch", 4, "height", "width")),
         TensorSpec("timestep", "float32", ("batch",)),
         TensorSpec("encoder_hidden_states", "float32", ("batch", "context", 64)),
         TensorSpec("encoder_attention_mask", "float32", ("batch", "context"))),
        (TensorSpec("noise_pred", "float32", ("batch", 4, "height", "width")),),
    ),
    "movq_decoder": (
        (TensorSpec("latents", "float32", ("batch", 4, "height", "width")),),
        (TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
    ),
    "movq_encoder": (
        (TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        (TensorSpec("latents", "float32", ("batch", 4, "height", "width")),),
    ),
}
for _name, _channels in (("unet_inpainting", 9), ("unet_flash", 4)):  # the base U-Net's I/O, own input channels
    EXPECTED_IO[_name] = ((TensorSpec("sample", "float32", ("batch", _channels, "height", "width")),
                           *EXPECTED_IO["unet"][0][1:]), EXPECTED_IO["unet"][1])


@pytest.fixture(scope="module")
def manifest(tiny_artifacts) -> Manifest:
    return Manifest.load(tiny_artifacts)


def test_manifest_has_three_fp32_components(manifest):
    assert manifest.data["schema_version"] == 1
    assert sorted(manifest.components()) == sorted(SPECS)
    for name in SPECS:
        assert list(manifest.data["onnx"][name]) == ["fp32"], name
        record = manifest.onnx(name)
        assert (record.component, record.variant, record.opset) == (name, "fp32", DEFAULT_OPSET)
        assert record.external_data is None  # a few MB: far below the 2 GB protobuf limit
        assert record.extra["source_folder"] == SPECS[name].folder


@pytest.mark.parametrize("name", list(SPECS))
def test_record_io_matches_component_spec(manifest, name):
    record, spec = manifest.onnx(name), SPECS[name]
    assert (record.inputs, record.outputs) == EXPECTED_IO[name]
    assert record.axes == spec.axes
    assert record.extra["multiples"] == spec.multiples
    for axis, (lo, hi) in record.axes.items():
        assert 1 <= lo <= hi, (axis, lo, hi)


@pytest.mark.parametrize("name", list(SPECS))
def test_onnx_graph_io_matches_manifest(manifest, name):
    """Names, element types and ranks agree; fixed dims are numbers; every dynamic axis is a dim_param."""
    record = manifest.onnx(name)
    graph = onnx.load(str(manifest.path(record.graph.path)), load_external_data=False).graph
    for specs, values, label in ((record.inputs, graph.input, "input"), (record.outputs, graph.output, "output")):
        assert [v.name for v in values] == [t.name for t in specs], label
        for spec, value in zip(specs, values):
            ttype = value.type.tensor_type
            assert onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type) == np.dtype(spec.dtype), spec.name
            dims = list(ttype.shape.dim)
            assert len(dims) == len(spec.shape), spec.name
            for dim, want in zip(dims, spec.shape):
                if isinstance(want, int):
                    assert dim.WhichOneof("value") == "dim_value" and dim.dim_value == want, (spec.name, dim)
                else:
                    assert dim.WhichOneof("value") == "dim_param" and dim.dim_param, (spec.name, want, dim)
                    if label == "input":  # inputs keep the axis names given to torch.onnx.export
                        assert dim.dim_param == want, (spec.name, dim.dim_param, want)


@pytest.mark.parametrize("name", list(SPECS))
def test_validation_cases_all_ok(manifest, name):
    record, spec = manifest.onnx(name), SPECS[name]
    validation = record.validation
    assert validation["bound_rel_l2"] == pytest.approx(1e-4)
    cases = validation["cases"]
    assert len(cases) == len(spec.validate) * len(spec.outputs)
    assert [c["dims"] for c in cases] == [dims for dims in spec.validate for _ in spec.outputs]
    for case in cases:
        assert case["ok"] is True and case["finite"] is True, case
        assert 0.0 <= case["rel_l2"] <= 1e-4, case
        assert case["cosine"] > 0.99999, case
        assert np.isfinite(case["max_abs"]), case


@pytest.mark.parametrize("name", list(SPECS))
def test_validation_shapes_exercise_every_dynamic_axis(name):
    """A dimension baked in as a constant at trace time can only be caught at a different value: each dynamic
    axis must take a non-trace value in some validation case, inside its declared range and multiple."""
    spec = SPECS[name]
    for axis, (lo, hi) in spec.axes.items():
        values = [dims[axis] for dims in spec.validate]
        assert any(v != spec.trace[axis] for v in values), (axis, values, spec.trace[axis])
        for v in values:
            assert lo <= v <= hi and v % spec.multiples.get(axis, 1) == 0, (axis, v)


@pytest.mark.parametrize("name", list(SPECS))
def test_files_match_their_hashes(manifest, name):
    record = manifest.onnx(name)
    manifest.verify_onnx(record)  # raises ArtifactError on any mismatch
    path = manifest.path(record.graph.path)
    assert sha256_file(path) == record.graph.sha256
    assert path.stat().st_size == record.graph.bytes
    # content-addressed folder: <component>/fp32-<hash of graph + external data>/model.onnx
    digest = sha256_json([record.graph.sha256, record.external_data.sha256 if record.external_data else None])
    assert record.graph.path == f"{name}/fp32-{digest[:12]}/model.onnx"


def test_source_hashes_recorded(manifest, tiny_source):
    for name, spec in SPECS.items():
        assert manifest.onnx(name).source_hash == tiny_source.source_hash(spec.folder), name
    assert manifest.data["source"] == {"label": str(tiny_source.root), "path": str(tiny_source.root),
                                       "variant": None}


def test_library_versions_recorded(manifest):
    for name in SPECS:
        versions = manifest.onnx(name).versions
        assert versions["python"] == platform.python_version()
        for dist in ("kandinsky3-trt", "torch", "onnx", "onnxruntime", "diffusers", "transformers"):
            assert versions[dist] == md.version(dist), (name, dist)


def test_tokenizer_scheduler_and_pipeline_entries(manifest, tiny_model_dir):
    from tokenizers import Tokenizer

    tok, sched = manifest.file_record("tokenizer"), manifest.file_record("scheduler")
    manifest.verify([tok, sched])
    assert tok.path.startswith("tokenizer/") and sched.path.startswith("scheduler/")
    assert manifest.data["tokenizer"]["max_length"] == 128
    assert manifest.data["tokenizer"]["pad_id"] == 0
    assert Tokenizer.from_file(str(manifest.path(tok.path))).get_vocab_size() > 100
    scheduler = json.loads(manifest.path(sched.path).read_text())
    source_config = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == source_config
    for key, value in SCHEDULER_CONFIG.items():
        assert scheduler[key] == value, key
    assert manifest.data["pipeline"] == {
        "latent_channels": 4, "movq_scale_factor": 8, "context_dim": 64, "max_text_length": 128,
        "reference": "diffusers.Kandinsky3Pipeline", "native_size": 64,
    }


def test_no_stray_files(tiny_artifacts, manifest):
    """Everything in the directory is referenced by the manifest: no staging folders, no raw exports."""
    present = {str(p.relative_to(tiny_artifacts)) for p in tiny_artifacts.rglob("*") if p.is_file()}
    assert present == manifest.referenced_paths() | {"manifest.json", ".k3trt-output.json", ".k3trt.lock"}

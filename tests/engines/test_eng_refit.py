"""Refit name matching on real exports: the tiny preset with two seeds, and a PEFT-renamed copy."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from k3trt.engines.refit import (match_weights, raise_on_mismatch, refittable_engines, suggest_renames)
from k3trt.contract.manifest import Manifest
from k3trt.contract.errors import ArtifactError


@pytest.fixture(scope="module")
def seed1_text_encoder(tmp_path_factory):
    """The text encoder of the tiny preset with seed 1, exported like `k3trt refit` does (~5 s)."""
    from k3trt.export.components import SPECS, model_info
    from k3trt.export.onnx_export import export_onnx
    from k3trt.export.presets import write_preset
    from k3trt.export.sources import open_model_dir

    root = tmp_path_factory.mktemp("seed1")
    source = open_model_dir(write_preset("tiny", root / "model", seed=1))
    spec = SPECS["text_encoder"]
    inputs = spec.make_inputs(spec.trace, model_info(source, spec), torch.Generator().manual_seed(0))
    graph, _ = export_onnx(spec, source.load(spec.folder), inputs, root / "onnx")
    return initializers(graph)


def initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def seed0_text_encoder(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    return initializers(manifest.path(manifest.onnx("text_encoder").graph.path))


def engine_view(weights: dict[str, np.ndarray]) -> dict[str, int]:
    """What a refitter would list: the float weights (shape constants are not refittable), by element count."""
    return {n: int(a.size) for n, a in weights.items() if a.dtype.kind == "f" and a.size > 1}


def test_two_seeds_match_by_name_and_differ_in_value(seed0_text_encoder, seed1_text_encoder):
    engine = engine_view(seed0_text_encoder)
    match = match_weights(engine, {n: a.shape for n, a in seed1_text_encoder.items()})
    assert match.ok and len(match.matched) == len(engine) > 10
    assert "encoder.shared.weight" in match.matched
    assert all(n not in engine for n in match.extra)  # extras are the non-refittable constants
    changed = [n for n in match.matched if not np.array_equal(seed0_text_encoder[n], seed1_text_encoder[n])]
    assert len(changed) > len(match.matched) // 2  # a refit would really change the engine
    raise_on_mismatch(match, "text_encoder-bf16", "seed1")  # no error


def test_peft_renamed_weights_fail_with_a_merge_hint(seed0_text_encoder, seed1_text_encoder):
    renamed = {(n.replace(".weight", ".base_layer.weight") if n.startswith("encoder.shared") else n): a.shape
               for n, a in seed1_text_encoder.items()}
    match = match_weights(engine_view(seed0_text_encoder), renamed)
    assert match.missing == ("encoder.shared.weight",)
    assert suggest_renames(match.missing, match.extra) == {"encoder.shared.weight": "encoder.shared.base_layer.weight"}
    with pytest.raises(ArtifactError) as err:
        raise_on_mismatch(match, "text_encoder-bf16", "/models/lora")
    text = str(err.value)
    assert "encoder.shared.weight" in text and "merge" in text and "base_layer" in text


def test_size_mismatch_is_reported():
    match = match_weights({"w": 12, "b": (3,)}, {"w": (3, 5), "b": (3,)})
    assert match.size_mismatch == (("w", 12, 15),) and not match.ok
    with pytest.raises(ArtifactError, match=r"size differs: w \(12 vs 15\)"):
        raise_on_mismatch(match, "unet-fp16", "/other")


def test_refittable_engines_selection():
    fp16 = {"component": "unet", "variant": "fp32", "flags": {"refittable": True}}
    plain = {"component": "movq_decoder", "variant": "fp32", "flags": {"refittable": False}}
    int8 = {"component": "unet", "variant": "int8", "flags": {"refittable": True}}
    assert refittable_engines({"unet-fp16": fp16, "movq_decoder-fp16": plain}, None) == [("unet-fp16", fp16)]
    with pytest.raises(ArtifactError, match="--refittable"):
        refittable_engines({"movq_decoder-fp16": plain}, ["movq_decoder"], "/art")
    with pytest.raises(ArtifactError, match="calibrate"):
        refittable_engines({"unet-int8": int8}, ["unet"])


# ----------------------------------------------------------------------------------------- reduced-precision refit
def test_fp16_and_bf16_initializers_become_bit_exact_host_tensors():
    import ml_dtypes

    from k3trt.engines.refit import host_tensor

    values = np.array([1.0, -2.5, 3.140625, 65504.0], np.float32)
    half = host_tensor(values.astype(np.float16))
    assert half.dtype == torch.float16 and torch.equal(half.float(), torch.from_numpy(values))
    bf16 = host_tensor(values[:3].astype(ml_dtypes.bfloat16))
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.float(), torch.from_numpy(values[:3]))
    assert host_tensor(values.astype(np.float16), torch.float32).dtype == torch.float32


@pytest.fixture(scope="module")
def fp16_layouts(tiny_artifacts, tmp_path_factory):
    """The engine's source variant (seed 0, fp16 with the T5 policy) and the same conversion of seed 1."""
    from k3trt.engines.refit import export_weights
    from k3trt.export.fp32_islands import fp32_nodes
    from k3trt.export.presets import write_preset
    from k3trt.export.sources import open_model_dir
    from k3trt.export.precision_variants import convert

    manifest = Manifest.load(tiny_artifacts)
    fp32 = manifest.path(manifest.onnx("text_encoder").graph.path)
    keep = fp32_nodes("t5_norms_wo_residual", onnx.load(str(fp32)))
    engine_source = convert(fp32, "fp16", keep)
    root = tmp_path_factory.mktemp("seed1-fp16")
    source = open_model_dir(write_preset("tiny", root / "model", seed=1))
    weights, _, path = export_weights(source, "text_encoder", root / "onnx", manifest.onnx("text_encoder").opset,
                                      variant="fp16", keep_fp32=keep)
    return engine_source, onnx.load(str(path)), weights


def test_converted_refit_weights_keep_the_engine_sources_names_and_types(fp16_layouts):
    from k3trt.engines.refit import check_same_layout, initializer_layout

    engine_source, new, weights = fp16_layouts
    check_same_layout(engine_source, new, "text_encoder-fp16", "seed1")  # no error
    layout = initializer_layout(new)
    assert {t for t, _ in layout.values()} >= {"FLOAT16", "FLOAT"}  # fp16 weights and fp32-island weights
    assert layout["encoder.shared.weight"][0] == "FLOAT16" and weights["encoder.shared.weight"].dtype == np.float16
    wo = [i for node in new.graph.node if "/DenseReluDense/wo/MatMul" in node.name for i in node.input
          if i in layout]
    assert len(wo) == 2 and all(layout[n][0] == "FLOAT" for n in wo), wo  # `wo` is an fp32 island
    match = match_weights({n: int(np.prod(s)) for n, (_, s) in initializer_layout(engine_source).items()},
                          {n: a.shape for n, a in weights.items()})
    assert match.ok


def test_a_renamed_or_retyped_initializer_is_listed(fp16_layouts):
    from k3trt.engines.refit import check_same_layout

    engine_source, new, _ = fp16_layouts
    changed = onnx.ModelProto()
    changed.CopyFrom(new)
    changed.graph.initializer[0].name = "renamed_by_a_converter"
    retyped = next(t for t in changed.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    retyped.data_type = onnx.TensorProto.BFLOAT16
    with pytest.raises(ArtifactError, match="not in the new one: .*type/shape differs: .*FLOAT16.*BFLOAT16") as err:
        check_same_layout(engine_source, changed, "text_encoder-fp16", "seed1")
    assert "renamed_by_a_converter" in str(err.value)

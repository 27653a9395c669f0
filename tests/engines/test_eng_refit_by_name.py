"""Refit by name through the weight map: only the weights that changed, nothing exported.

The TensorRT calls are checked against a recording Refitter that keeps TensorRT's documented contract for the
calls used (names from `get_all_weights`, `set_named_weights` with a prototype's type and count, weights that
must be set together reported by `get_missing_weights` until given)."""
from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
from k3trt.contract.errors import AdapterError


def _fine_tune(tiny_model_dir, tmp_path, parameter: str, factor: float = 1.5):
    """A copy of the tiny preset with one U-Net parameter scaled (a one-weight 'fine-tune')."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, model)
    file = next((model / "unet").glob("*.safetensors"))
    tensors = load_file(str(file))
    tensors[parameter] = tensors[parameter] * factor
    save_file(tensors, str(file), metadata={"format": "pt"})
    return model, tensors[parameter]


def test_refit_by_name_sends_only_the_changed_weight(tiny_artifacts, tiny_model_dir, tmp_path):
    import json

    from k3trt.engines.refit import changed_weights
    from k3trt.export.sources import open_model_dir
    from k3trt.contract.manifest import Manifest

    manifest = Manifest.load(tiny_artifacts)
    same, _ = changed_weights(manifest, "unet", "fp32", open_model_dir(tiny_model_dir))
    assert same == {}
    parameter = "down_blocks.1.attentions.0.attention.to_k.weight"  # a Linear on 3-D input: a transposed MatMul
    tuned, value = _fine_tune(tiny_model_dir, tmp_path, parameter)
    changed, base = changed_weights(manifest, "unet", "fp32", open_model_dir(tuned))
    weight_map = json.loads(manifest.path(manifest.onnx("unet").extra["weight_map"]["path"]).read_text())
    entry = weight_map["parameters"][parameter]
    assert entry["transpose"] == [1, 0] and list(changed) == [entry["initializer"]]
    np.testing.assert_array_equal(changed[entry["initializer"]], value.numpy().T)
    assert base([entry["initializer"]])[entry["initializer"]].shape == tuple(entry["shape"])


def test_refit_by_name_refuses_another_configuration(tiny_artifacts, tiny_model_dir, tmp_path):
    import json

    from k3trt.engines.refit import changed_weights
    from k3trt.export.sources import open_model_dir
    from k3trt.contract.manifest import Manifest
    from k3trt.contract.errors import ModelSourceError

    model = tmp_path / "other"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "groups": 4}))
    with pytest.raises(ModelSourceError, match="groups"):
        changed_weights(Manifest.load(tiny_artifacts), "unet", "fp32", open_model_dir(model))


class _Refitter:
    """TensorRT's Refitter contract for the calls refit_named makes (a recording test double)."""

    def __init__(self, engine, logger):
        self.engine, self.set, self.refitted = engine, {}, False

    def get_all_weights(self):
        return list(self.engine["weights"])

    def get_weights_prototype(self, name):
        dtype, count = self.engine["weights"][name]
        return types.SimpleNamespace(dtype=dtype, size=count)

    def set_named_weights(self, name, weights):
        self.set[name] = weights
        return True

    def get_missing_weights(self):  # weights fused at build time must be given together
        return [partner for name in self.set for partner in self.engine["fused"].get(name, ())
                if partner not in self.set]

    def refit_cuda_engine(self):
        self.refitted = not self.get_missing_weights()
        self.engine["refitter"] = self
        return self.refitted


def _fake_trt():
    trt = types.SimpleNamespace(float32="float32", float16="float16")
    trt.Refitter = _Refitter
    trt.Weights = lambda dtype, pointer, count: (dtype, count)
    return trt


def test_refit_named_sets_the_given_weights_and_their_fused_partners_from_the_base():
    from k3trt.runtime.backends.trt_refit import refit_named

    engine = {"weights": {"a": ("float16", 6), "b": ("float32", 2), "c": ("float32", 3)}, "fused": {"a": ["b"]}}
    asked = []

    def base(names):
        asked.extend(names)
        return {n: np.zeros(2, np.float32) for n in names}

    count = refit_named(_fake_trt(), engine, {"a": np.ones((2, 3), np.float32)}, base, "unet-fp16", None)
    refitter = engine["refitter"]
    assert count == 2 and asked == ["b"] and sorted(refitter.set) == ["a", "b"] and refitter.refitted
    assert refitter.set["a"] == ("float16", 6)  # the prototype's type and count
    with pytest.raises(AdapterError, match="no refittable weight named"):
        refit_named(_fake_trt(), engine, {"zz": np.ones(1, np.float32)}, base, "unet-fp16", None)
    with pytest.raises(AdapterError, match="has 4 values"):
        refit_named(_fake_trt(), engine, {"c": np.ones(4, np.float32)}, base, "unet-fp16", None)


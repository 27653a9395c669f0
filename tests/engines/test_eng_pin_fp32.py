"""pin_fp32 against a fake TensorRT network: which layers get fp32 precision and output types."""
from __future__ import annotations

import sys
import types

import pytest

from k3trt.engines.build import pin_fp32
from k3trt.runtime.errors import ArtifactError

FLOAT32, FLOAT16, BFLOAT16, INT32 = "float32", "float16", "bfloat16", "int32"


class Tensor:
    def __init__(self, dtype):
        self.dtype = dtype


class Layer:
    def __init__(self, name, dtypes, metadata=""):
        self.name, self.metadata, self.precision = name, metadata, None
        self.outputs = [Tensor(d) for d in dtypes]
        self.output_types = {}

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_output(self, i):
        return self.outputs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class Network:
    def __init__(self, layers):
        self.layers = layers

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


@pytest.fixture()
def fake_trt(monkeypatch):
    module = types.SimpleNamespace(__version__="10.3.0", Builder=object, float32=FLOAT32, float16=FLOAT16,
                                   bfloat16=BFLOAT16)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def test_pins_float_layers_of_the_requested_nodes(fake_trt):
    layers = [Layer("/n/Pow", [FLOAT32]), Layer("/n/Pow_2", [FLOAT32]),  # a helper layer of /n/Pow
              Layer("(Unnamed Layer* 7)", [FLOAT32], "[ONNX Layer: /n/Div]"),
              Layer("/n/Shape", [INT32]), Layer("/n/Mul_1", [FLOAT32]), Layer("/other/MatMul", [FLOAT32])]
    report = {}
    pin_fp32(Network(layers), fp32_nodes={"/n/Pow", "/n/Div", "/n/Shape", "/n/Mul"},
             all_nodes={"/n/Pow", "/n/Div", "/n/Shape", "/n/Mul", "/n/Mul_1", "/other/MatMul"}, report=report)
    pinned = [l.name for l in layers if l.precision == FLOAT32]
    assert pinned == ["/n/Pow", "/n/Pow_2", "(Unnamed Layer* 7)"]  # not the int Shape, not the real /n/Mul_1
    assert layers[0].output_types == {0: FLOAT32}
    assert report == {"pinned_layers": 3, "matched_nodes": 2, "requested_nodes": 4}


def test_no_match_at_all_refuses_to_drop_the_guard(fake_trt):
    with pytest.raises(ArtifactError, match="none of the 2 fp32 nodes"):
        pin_fp32(Network([Layer("x", [FLOAT32])]), fp32_nodes={"/a", "/b"}, all_nodes={"/a", "/b", "x"}, report={})

"""INetworkDefinition, ITensor, ILayer and the ONNX parser of the stand-in.

Rules and their sources:
- The parser refuses operators onnx-tensorrt's operator table marks unsupported, or that need a newer release
  (engines/parser_support.py, the table `k3trt check` reads too), and nodes of a custom domain without a
  plugin ("No importer registered for op"); it does NOT judge data types: onnx-tensorrt's parser imports a
  bf16 Resize, the builder then finds no kernel (NVIDIA/TensorRT demo/Diffusion base_model.py, 11.1).
- Strongly typed networks (developer guide, "Strongly Typed Networks"; TensorRT 11.0 release notes: every
  network is strongly typed, STRONGLY_TYPED is accepted and ignored): each layer's type is the type of its
  ONNX tensors, so `layer.precision` (10.x only) reads the node's output type and `precision_is_set` is False.
- EXPLICIT_BATCH exists on 10.x only (deprecated, ignored: 10.0 release notes) and is gone on 11.x.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from ._api import STATE, Api
from ._types import DataType, Dims, LayerType, NetworkDefinitionCreationFlag, onnx_to_trt

LAYER_TYPES = {"Conv": "CONVOLUTION", "ConvTranspose": "DECONVOLUTION", "MatMul": "MATRIX_MULTIPLY",
               "Gemm": "MATRIX_MULTIPLY", "Resize": "RESIZE", "Cast": "CAST", "Softmax": "SOFTMAX",
               "Shape": "SHAPE", "Constant": "CONSTANT", "Gather": "GATHER", "Concat": "CONCATENATION",
               "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Slice": "SLICE", "QuantizeLinear": "QUANTIZE",
               "DequantizeLinear": "DEQUANTIZE", "Where": "SELECT", "Sigmoid": "ACTIVATION", "Relu": "ACTIVATION",
               "Tanh": "ACTIVATION", "InstanceNormalization": "NORMALIZATION", "GroupNormalization": "NORMALIZATION",
               "LayerNormalization": "NORMALIZATION", "ReduceMean": "REDUCE", "ReduceSum": "REDUCE",
               "Add": "ELEMENTWISE", "Sub": "ELEMENTWISE", "Mul": "ELEMENTWISE", "Div": "ELEMENTWISE",
               "Pow": "ELEMENTWISE", "Max": "ELEMENTWISE", "Min": "ELEMENTWISE", "Equal": "ELEMENTWISE",
               "Sqrt": "UNARY", "Exp": "UNARY", "Erf": "UNARY", "Log": "UNARY", "Neg": "UNARY", "Abs": "UNARY"}


class ITensor(Api):
    _trt_name = "ITensor"

    def __init__(self, name: str, dtype, shape, *, is_input=False, is_output=False):
        self._name, self._dtype, self._shape = name, dtype, Dims(shape)
        self._is_input, self._is_output = is_input, is_output

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def dtype(self):
        return self._dtype

    @property
    def shape(self):
        return self._shape

    @property
    def is_network_input(self) -> bool:
        return self._is_input

    @property
    def is_network_output(self) -> bool:
        return self._is_output

    @property
    def is_shape_tensor(self) -> bool:
        return False

    @property
    def is_execution_tensor(self) -> bool:
        return True


class ILayer(Api):
    _trt_name = "ILayer"

    def __init__(self, node, types: dict[str, int], tensors: dict[str, ITensor]):
        self._node, self._types, self._tensors = node, types, tensors
        self._name = node.name

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def type(self):
        return getattr(LayerType, LAYER_TYPES.get(self._node.op_type, "PLUGIN_V3" if self._node.domain else "UNARY"))

    @property
    def num_inputs(self) -> int:
        return len(self._node.input)

    @property
    def num_outputs(self) -> int:
        return len(self._node.output)

    def _tensor(self, name: str):
        if name not in self._tensors:
            dtype = onnx_to_trt(self._types.get(name, 0)) or "FLOAT"
            self._tensors[name] = ITensor(name, getattr(DataType, dtype), ())
        return self._tensors[name]

    def get_input(self, index: int):
        return self._tensor(self._node.input[index]) if self._node.input[index] else None

    def get_output(self, index: int):
        return self._tensor(self._node.output[index])

    def get_output_type(self, index: int):
        return self._tensor(self._node.output[index]).dtype

    # 10.x only (the surfaces gate them on 11): a strongly typed layer runs in the type of its output
    @property
    def precision(self):
        return self.get_output_type(0)

    @property
    def precision_is_set(self) -> bool:
        return False


class INetworkDefinition(Api):
    _trt_name = "INetworkDefinition"

    def __init__(self, builder, flags: int):
        self._builder, self._flags = builder, int(flags)
        self._model = None
        self._onnx_dir: Path | None = None
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._layers: list[ILayer] = []
        self._types: dict[str, int] = {}
        self._name = "Unnamed Network 0"

    @property
    def builder(self):
        return self._builder

    @property
    def flags(self) -> int:
        return self._flags

    def get_flag(self, flag) -> bool:
        return bool(self._flags & (1 << int(flag)))

    @property
    def _strongly_typed(self) -> bool:
        if STATE.version.startswith("11"):
            return True  # 11.0 release notes: every network is strongly typed
        return self.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_input(self, index: int):
        return self._inputs[index]

    def get_output(self, index: int):
        return self._outputs[index]

    def get_layer(self, index: int):
        return self._layers[index]

    def __iter__(self):
        return iter(self._layers)

    def __len__(self):
        return len(self._layers)

    def _populate(self, model, onnx_dir: Path | None) -> None:
        self._model, self._onnx_dir = model, onnx_dir
        self._types = tensor_types(model)
        tensors: dict[str, ITensor] = {}
        initializers = {t.name for t in model.graph.initializer}
        for value in model.graph.input:
            if value.name in initializers:
                continue
            tensor = ITensor(value.name, _dtype(value), _dims(value), is_input=True)
            tensors[value.name] = tensor
            self._inputs.append(tensor)
        for value in model.graph.output:
            tensor = ITensor(value.name, _dtype(value), _dims(value), is_output=True)
            tensors[value.name] = tensor
            self._outputs.append(tensor)
        self._layers = [ILayer(node, self._types, tensors) for node in model.graph.node]


def _dtype(value):
    return getattr(DataType, onnx_to_trt(value.type.tensor_type.elem_type) or "FLOAT")


def _dims(value) -> list[int]:
    return [d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]


def tensor_types(model) -> dict[str, int]:
    """Element type of every tensor: the same inference `k3trt check` uses (engines/check.py)."""
    from k3trt.engines.check import tensor_types as infer

    return infer(model)


class _ParserError:
    """IParserError: printable (Polygraphy logs `str(parser.get_error(i))`)."""

    def __init__(self, node: str, op: str, desc: str):
        self._node, self._op, self._desc = node, op, desc

    def desc(self) -> str:
        return self._desc

    def __str__(self):
        return f"In node {self._node} with name: {self._node} and operator: {self._op} (parseGraph): " \
               f"UNSUPPORTED_NODE: {self._desc}"


class OnnxParser(Api):
    _trt_name = "OnnxParser"

    def __init__(self, network, logger):
        self._network, self._logger = network, logger
        self._errors: list[_ParserError] = []
        self._flags = 1  # NATIVE_INSTANCENORM is set by default on 10.x and 11.x (NvOnnxParser.h)
        self._builder_config = None

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int):
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    @property
    def flags(self) -> int:
        return self._flags

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = int(value)

    def set_flag(self, flag) -> None:
        self._flags |= 1 << int(flag)

    def clear_flag(self, flag) -> None:
        self._flags &= ~(1 << int(flag))

    def get_flag(self, flag) -> bool:
        return bool(self._flags & (1 << int(flag)))

    def set_builder_config(self, builder_config) -> bool:
        self._builder_config = builder_config
        return True

    def supports_operator(self, op_name: str) -> bool:
        from k3trt.engines.parser_support import parser_rejects

        return parser_rejects(op_name, _release()) is None

    def parse(self, model, path=None) -> bool:
        folder = Path(path).parent if path else None
        proto = onnx.load_from_string(bytes(model))
        if folder is not None:
            onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
        return self._parse(proto, folder)

    def parse_from_file(self, model: str) -> bool:
        try:
            proto = onnx.load(str(model), load_external_data=True)
        except Exception as exc:  # the parser logs and returns False for an unreadable file
            self._errors.append(_ParserError("(model)", "-", f"Failed to parse ONNX model from file {model}: {exc}"))
            return False
        return self._parse(proto, Path(model).parent)

    def _parse(self, model, folder) -> bool:
        from k3trt.engines.parser_support import parser_rejects

        version = _release()
        for index, node in enumerate(model.graph.node):
            label = node.name or f"node_{index}"
            if node.domain not in ("", "ai.onnx"):
                self._errors.append(_ParserError(label, node.op_type, f"No importer registered for op: "
                                                 f"{node.op_type}. Attempting to import as plugin."))
            elif parser_rejects(node.op_type, version):
                self._errors.append(_ParserError(label, node.op_type, parser_rejects(node.op_type, version)))
        if self._errors:
            return False
        self._network._populate(model, folder)
        return True


def _release() -> tuple[int, int]:
    major, minor = STATE.version.split(".")[:2]
    return int(major), int(minor)

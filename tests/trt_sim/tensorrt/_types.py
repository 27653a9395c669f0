"""Enums, Dims, loggers, host memory and weights of the stand-in.

Every enum of the real bindings is made from the surfaces (engines/api), members gated per release; DataType
keeps TensorRT's numbering (NvInferRuntimeBase.h, enum class DataType).
"""
from __future__ import annotations

import onnx

from ._api import STATE, Api, ApiType, enum_names, make_enum, surface_enums

# NvInferRuntimeBase.h: kFLOAT 0, kHALF 1, kINT8 2, kINT32 3, kBOOL 4, kUINT8 5, kFP8 6, kBF16 7, kINT64 8,
# kINT4 9, kFP4 10, kE8M0 11
DATA_TYPES = {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6, "BF16": 7,
              "INT64": 8, "INT4": 9, "FP4": 10, "E8M0": 11}
ENUMS = {name: make_enum(name, DATA_TYPES if name == "DataType" else enum_names(name)) for name in surface_enums()}
globals().update(ENUMS)
DataType = ENUMS["DataType"]
TensorIOMode = ENUMS["TensorIOMode"]
TensorLocation = ENUMS["TensorLocation"]
ExecutionContextAllocationStrategy = ENUMS["ExecutionContextAllocationStrategy"]
BuilderFlag = ENUMS["BuilderFlag"]
NetworkDefinitionCreationFlag = ENUMS["NetworkDefinitionCreationFlag"]
LayerType = ENUMS["LayerType"]
# module-level aliases of the real module (`trt.float32` is `DataType.FLOAT`)
DTYPE_ALIASES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8", "int32": "INT32",
                 "int64": "INT64", "bool": "BOOL", "uint8": "UINT8", "fp8": "FP8", "int4": "INT4", "fp4": "FP4",
                 "e8m0": "E8M0"}
ALIASES = {alias: type.__getattribute__(DataType, "_all_members")[member] for alias, member in DTYPE_ALIASES.items()}

ONNX_TO_TRT = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT8: "INT8", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
               onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.UINT8: "UINT8",
               onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.INT4: "INT4"}


def onnx_to_trt(onnx_type: int) -> str | None:
    """DataType member name for an ONNX element type (operators.md's list of types TensorRT maps)."""
    return ONNX_TO_TRT.get(onnx_type)


class Dims(tuple, Api, metaclass=ApiType):
    """trt.Dims: a sequence of ints (-1 for a dynamic dimension)."""

    _trt_name = "Dims"
    MAX_DIMS = 8

    def __new__(cls, shape=()):
        return tuple.__new__(cls, (int(d) for d in shape))

    def __repr__(self):
        return "(" + ", ".join(str(d) for d in self) + ")"


class _Severity:
    """ILogger.Severity (a nested enum: values as NvInferRuntimeBase.h numbers them)."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __int__(self):
        return self.value

    def __eq__(self, other):
        return isinstance(other, _Severity) and other.value == self.value

    def __hash__(self):
        return hash(("Severity", self.value))

    def __lt__(self, other):
        return self.value < other.value

    def __le__(self, other):
        return self.value <= other.value

    def __repr__(self):
        return f"<Severity.{self.name}: {self.value}>"


class _SeverityEnum:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (_Severity(n, i) for i, n in enumerate(
        ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")))


class ILogger(Api):
    _trt_name = "ILogger"
    Severity = _SeverityEnum
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (_SeverityEnum.INTERNAL_ERROR, _SeverityEnum.ERROR,
                                                     _SeverityEnum.WARNING, _SeverityEnum.INFO,
                                                     _SeverityEnum.VERBOSE)

    def __init__(self):
        pass

    def log(self, severity, msg: str) -> None:
        pass


class Logger(ILogger):
    _trt_name = "Logger"

    def __init__(self, min_severity=_SeverityEnum.WARNING):
        self._min = min_severity
        self._messages: list = []

    @property
    def min_severity(self):
        return self._min

    @min_severity.setter
    def min_severity(self, value):
        self._min = value

    def log(self, severity, msg: str) -> None:
        self._messages.append((severity, msg))


def log_error(logger, message: str) -> None:
    """Report through the user's logger, as TensorRT does (Polygraphy's logger forwards to G_LOGGER)."""
    if logger is not None:
        logger.log(ILogger.ERROR, message)


class IHostMemory(bytearray, Api, metaclass=ApiType):
    """A serialized engine or timing cache: a buffer (memoryview/file.write take it without a copy).
    `bytes(host_memory)` copies it, as it does for the real one; the stand-in counts those copies."""

    _trt_name = "IHostMemory"

    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def dtype(self):
        return DataType.UINT8

    def __bytes__(self) -> bytes:
        STATE.host_memory_copies += 1
        return bytes(memoryview(self))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Weights(Api):
    """trt.Weights(type, ptr, count): host memory the refitter reads at refit time."""

    _trt_name = "Weights"

    def __init__(self, type, ptr, count):  # noqa: A002 (the real overload's parameter names)
        self._type, self._ptr, self._count = type, int(ptr), int(count)

    @property
    def dtype(self):
        return self._type

    @property
    def size(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        from ._execute import numpy_dtype

        onnx_type = next(k for k, v in ONNX_TO_TRT.items() if v == self._type.name)
        return self._count * numpy_dtype(onnx_type).itemsize


class IStreamReader(Api):  # 10.x: Polygraphy's FileReader subclasses it and implements read(size)
    _trt_name = "IStreamReader"

    def __init__(self):
        pass


class IStreamReaderV2(Api):  # 11.x: read(num_bytes, stream) and seek(offset, where)
    _trt_name = "IStreamReaderV2"

    def __init__(self):
        pass

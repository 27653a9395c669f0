"""What TensorRT's ONNX parser and builder accept, per operator and data type: one table, two readers.

`k3trt check` (engines/check.py) lints ONNX against it before a build; the TensorRT stand-in the tests run
(tests/trt_sim/tensorrt) parses and builds against the same table, so the lint and the simulated build cannot
disagree. Pure data and small functions: no onnx, no TensorRT import.

Sources (each table says which it comes from):
- onnx/onnx-tensorrt docs/operators.md, "Operator Support Matrix" at the 10.1 GA release (commit 96e7811): the
  Supported (Y/N) and "Supported Types" columns, copied row by row into OP_TYPES / UNSUPPORTED below;
- onnx/onnx-tensorrt docs/Changelog.md for operators a release added (ADDED_IN);
- NVIDIA/TensorRT demo/Diffusion (release 11.1, demo_diffusion/model/base_model.py, `optimize`): "TRT does not
  support BF16 for the Resize operator", the reason its `cast_resize_io` runs every Resize in fp32 for
  strongly typed bf16 builds. operators.md's row still lists BF16 for Resize: the parser accepts the node and
  the builder then finds no implementation (BUILDER_HAS_NO_KERNEL).
"""
from __future__ import annotations

# ONNX TensorProto element types (onnx.TensorProto.DataType values) by the names operators.md uses.
ONNX_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
                   16: "BF16", 17: "FP8", 22: "INT4"}
TYPE_NUMBERS = {name: number for number, name in ONNX_TYPE_NAMES.items()}

_FLOAT = "FP32 FP16 BF16"
_NUMERIC = "FP32 FP16 BF16 INT32 INT64"
_ANY = "FP32 FP16 BF16 INT32 INT64 BOOL"
# operators.md 10.1 GA, "Supported Types" per supported operator (rows grouped by identical type lists; the
# ConstantOfShape row's "INF64" typo read as INT64, the Selu row's trailing comma dropped).
_GROUPS = {
    _FLOAT: """Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos
        Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
        GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf
        LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool
        MeanVarianceNormalization ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
        RandomUniform RandomUniformLike Reciprocal Resize RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax
        Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample""",
    _NUMERIC: """Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod
        Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
        ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK""",
    _ANY: """Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop
        OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where""",
    "FP32 FP16": "DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign",
    "BOOL": "And Not Or Xor",
    "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL": "Cast CastLike",
    "INT8 FP8 INT4": "DequantizeLinear",
    "FP32 FP16 BF16 INT8 INT32 INT64": "Gelu",
    "FP32 FP16 BF16 FP8 INT32 INT64": "Mean",
}
OP_TYPES: dict[str, frozenset[str]] = {op: frozenset(types.split()) for types, ops in _GROUPS.items()
                                       for op in ops.split()}
SUPPORTED = frozenset(OP_TYPES)

# The same matrix's 'N' rows, plus opset 18-20 operators a later TensorRT 11.2 derived table still lists as
# unsupported. Operators that a later release added (ADDED_IN) are supported from that release on.
UNSUPPORTED = frozenset("""
Bernoulli BitShift Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear MatMulInteger MaxRoiPool
MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement
QLinearConv QLinearMatMul SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer TfIdfVectorizer Unique
AffineGrid BitwiseAnd BitwiseNot BitwiseOr BitwiseXor CenterCropPad Col2Im ImageDecoder RegexFullMatch
StringConcat StringSplit
""".split())
# Changelog.md: 8.6 EA GroupNormalization, LayerNormalization, IsInf; 9.2 Hardmax; 10.1 DeformConv; 10.4 the
# window functions; 10.5 real-valued STFT.
ADDED_IN = {"GroupNormalization": (8, 6), "LayerNormalization": (8, 6), "IsInf": (8, 6), "Hardmax": (9, 2),
            "DeformConv": (10, 1), "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),
            "STFT": (10, 5)}

# (op, type) pairs the parser accepts but no TensorRT builder implements, with the fix k3trt applies.
BUILDER_HAS_NO_KERNEL = {
    ("Resize", "BF16"): "run the Resize in fp32: cast its data input to fp32 and its output back to bf16, as "
                        "NVIDIA's demo/Diffusion does (`k3trt export --precision bf16` does it for you)",
}


def parser_rejects(op: str, version: tuple[int, int]) -> str | None:
    """Why TensorRT `version`'s ONNX parser refuses an operator of the default domain, or None."""
    if op in UNSUPPORTED:
        return "not supported by TensorRT's ONNX parser (onnx-tensorrt docs/operators.md)"
    if op in ADDED_IN and version < ADDED_IN[op]:
        need = ADDED_IN[op]
        return f"parsed only from TensorRT {need[0]}.{need[1]}"
    return None


def type_problem(op: str, input_type: int | None, output_type: int | None) -> str | None:
    """Why no TensorRT engine can run `op` on these ONNX element types (data input 0, output 0), or None.

    operators.md's "Supported Types" name the op's data type, an input for some ops (DequantizeLinear: INT8)
    and the output for others (ConstantOfShape's input is its INT64 shape): a pair is refused only when
    neither the data input's nor the output's type is listed. Unknown ops and unknown types are not judged."""
    names = [ONNX_TYPE_NAMES.get(t) for t in (input_type, output_type) if t]
    if op not in OP_TYPES or not names or None in names:
        return None
    for name in names:
        if (op, name) in BUILDER_HAS_NO_KERNEL:
            return f"TensorRT has no {name} {op} implementation: {BUILDER_HAS_NO_KERNEL[(op, name)]}"
    if any(name in OP_TYPES[op] for name in names):
        return None
    listed = ", ".join(sorted(OP_TYPES[op]))
    return f"{'/'.join(dict.fromkeys(names))} is not among the types TensorRT supports for {op} ({listed})"

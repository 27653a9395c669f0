"""The ONNX format settings of an export, light enough for the command line's --help."""

PROTOBUF_LIMIT = 2 * 1024**3
DEFAULT_OPSET = 19
MIN_OPSET = 17  # LayerNormalization/GroupNorm-friendly; TensorRT 10 parses 9..20
MAX_OPSET = 20  # the newest opset TensorRT 10.0's parser covers (engines/check.py: PARSER_MAX_OPSET)

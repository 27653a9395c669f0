"""k3trt.engines: ONNX -> TensorRT engines, profiles, precision selection and TensorRT-compatibility checks."""

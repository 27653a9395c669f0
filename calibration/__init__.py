"""k3trt.calibration: calibration prompts -> trajectory activations -> INT8 explicit Q/DQ ONNX."""

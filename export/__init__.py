"""k3trt.export: checkpoints and presets -> torch modules -> validated ONNX + artifact manifest."""

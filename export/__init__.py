"""k3trt.export: checkpoints and presets -> torch modules -> validated ONNX + artifact manifest.

Importing it registers the PyTorch reference backend with the runtime (`make_backend("torch", ...)`), so the
runtime itself never imports model code or this package."""


def _torch_backend(manifest, precision="fp32", **options):
    from .reference import TorchBackend

    return TorchBackend(manifest, precision, **options)


def _register() -> None:
    from ..runtime.backends.base import register_backend

    register_backend("torch", _torch_backend)


_register()

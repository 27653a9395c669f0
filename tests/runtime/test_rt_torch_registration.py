"""The torch reference backend is registered explicitly (k3trt.verify); the runtime never imports it."""
import subprocess
import sys


def test_runtime_alone_does_not_know_the_torch_backend():
    code = ("import sys, k3trt.runtime.pipeline as p, k3trt.runtime.tasks\n"
            "from k3trt.runtime.backends.registry import make_backend\n"
            "from k3trt.contract.errors import BackendUnavailableError\n"
            "try:\n    make_backend('torch', None)\nexcept BackendUnavailableError as e:\n    print('refused', e)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('k3trt.export', 'k3trt.engines', 'diffusers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "refused" in out and "register_torch_backend()" in out
    assert out.strip().endswith("[]")  # no export, engines or diffusers module was loaded


def test_explicit_registration_makes_it_available(tiny_model_dir, tiny_artifacts):
    from k3trt.runtime import Pipeline
    from k3trt.verify.torch_reference import register_torch_backend

    register_torch_backend()

    pipe = Pipeline.from_artifacts(tiny_artifacts, "torch", model_dir=tiny_model_dir)
    assert type(pipe.backend).__name__ == "TorchBackend"
    assert pipe.generate("a fox", steps=1, height=64, width=64, output_type="np").shape == (1, 64, 64, 3)

"""The torch reference backend registers itself from k3trt.export; the runtime never imports it."""
import subprocess
import sys


def test_runtime_alone_does_not_know_the_torch_backend():
    code = ("import sys, k3trt.runtime.pipeline as p, k3trt.runtime.tasks\n"
            "from k3trt.runtime.backends.base import make_backend\n"
            "from k3trt.runtime.errors import BackendUnavailableError\n"
            "try:\n    make_backend('torch', None)\nexcept BackendUnavailableError as e:\n    print('refused', e)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('k3trt.export', 'k3trt.engines', 'diffusers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "refused" in out and "import k3trt.export" in out
    assert out.strip().endswith("[]")  # no export, engines or diffusers module was loaded


def test_importing_export_registers_it(tiny_model_dir, tiny_artifacts):
    import k3trt.export  # noqa: F401  (registers)
    from k3trt.runtime import Pipeline

    pipe = Pipeline.from_artifacts(tiny_artifacts, "torch", model_dir=tiny_model_dir)
    assert type(pipe.backend).__name__ == "TorchBackend"
    assert pipe.generate("a fox", steps=1, height=64, width=64, output_type="np").shape == (1, 64, 64, 3)


FORBIDDEN = ("k3trt.export", "k3trt.calibration", "k3trt.engines", "diffusers", "transformers")
_PROBE = ("import importlib, json, sys\n"
          "for name in json.loads(sys.argv[1]):\n    importlib.import_module(name)\n"
          "print(json.dumps(sorted({m.split('.')[0] if not m.startswith('k3trt.') else '.'.join(m.split('.')[:2])\n"
          "                         for m in sys.modules if m.startswith(%r)})))" % (FORBIDDEN,))


def _loaded_after_importing(modules: list[str]) -> list[str]:
    import json

    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(modules)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_no_runtime_module_imports_a_later_stage_or_model_code():
    """Every module under k3trt.runtime (found by walking the package, so new ones are covered), imported in one
    fresh interpreter, loads none of the later stages nor diffusers/transformers. Commands that compare with
    diffusers (parity, bench, demo) import the reference inside the command, not at import time."""
    import pkgutil

    import k3trt.runtime

    modules = sorted(m.name for m in pkgutil.walk_packages(k3trt.runtime.__path__, "k3trt.runtime."))
    assert {"k3trt.runtime.tasks", "k3trt.runtime.stages", "k3trt.runtime.official_sampler", "k3trt.runtime.images",
            "k3trt.runtime.task_commands", "k3trt.runtime.cards", "k3trt.runtime.serving.http"} <= set(modules)
    assert _loaded_after_importing(modules) == []
    # the probe does see such imports: the export stage's task reference pulls in the export package
    assert "k3trt.export" in _loaded_after_importing(["k3trt.export.task_reference"])

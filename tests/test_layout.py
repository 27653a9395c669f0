"""The layout is the architecture (issue 17): imports point one way, the runtime loads nothing above it, and the
command line answers --version without torch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layout_rules import check

ROOT = Path(__file__).resolve().parents[1]


def test_the_project_follows_the_import_rules():
    assert check(ROOT) == []


def _planted_tree(tmp_path: Path, folder: str, module: str, source: str) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", "tests", "docs", "*.egg-info", "__pycache__",
                                                              ".venv", "site"))
    (root / folder / f"{module}.py").write_text(source)
    return root


@pytest.mark.parametrize("folder, source, expected", [
    ("runtime", "def f():\n    from k3trt.export.writer import export_artifacts\n", "runtime/ may not import export/"),
    ("contract", "import k3trt.runtime.pipeline\n", "contract/ may not import runtime/"),
    ("export", "def f():\n    from k3trt.cli.main import main\n", "export/ may not import cli/"),
    ("engines", "from ..runtime import pipeline\n", "relative import"),
    ("runtime", "def f():\n    import diffusers\n", "never imports model code"),
])
def test_a_planted_upward_import_fails(tmp_path, folder, source, expected):
    problems = check(_planted_tree(tmp_path, folder, "planted", source))
    assert any(expected in p and "planted" in p for p in problems), problems


def test_a_planted_cycle_fails_even_inside_functions(tmp_path):
    root = _planted_tree(tmp_path, "runtime", "planted_a", "def f():\n    from k3trt.runtime import planted_b\n")
    (root / "runtime" / "planted_b.py").write_text("from k3trt.runtime import planted_a\n")
    problems = check(root)
    assert any("import cycle" in p and "k3trt.runtime.planted_a" in p and "k3trt.runtime.planted_b" in p
               for p in problems), problems


ABOVE_RUNTIME = ("k3trt.export", "k3trt.calibration", "k3trt.engines", "k3trt.verify", "k3trt.cli", "k3trt.writing",
                 "diffusers", "transformers")
_PROBE = ("import importlib, json, pkgutil, sys\n"
          "import k3trt.runtime\n"
          "names = sorted(m.name for m in pkgutil.walk_packages(k3trt.runtime.__path__, 'k3trt.runtime.'))\n"
          "for name in names:\n    importlib.import_module(name)\n"
          "print(json.dumps({'modules': names, 'loaded': sorted(m for m in sys.modules if m.startswith(%r))}))"
          % (ABOVE_RUNTIME,))


def test_importing_every_runtime_module_loads_nothing_above_it():
    """Every module under k3trt.runtime (walked, so new ones are covered) in one fresh interpreter."""
    out = json.loads(subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                                    check=True).stdout)
    assert {"k3trt.runtime.pipeline", "k3trt.runtime.denoise_loop", "k3trt.runtime.serving.http",
            "k3trt.runtime.backends.registry"} <= set(out["modules"])
    assert out["loaded"] == []


def test_version_and_help_do_not_import_torch():
    code = ("import sys\nfrom k3trt.cli.main import main\n"
            "for argv in (['--version'], ['--help'], ['generate', '--help'], ['export', '--bogus']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'diffusers', 'k3trt.export.writer', 'k3trt.runtime.pipeline') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_generate_with_the_torch_backend_from_a_fresh_interpreter(tiny_model_dir, tiny_artifacts, tmp_path):
    """The console script registers the torch reference explicitly for --backend torch (no import side effect)."""
    out = tmp_path / "torch.png"
    run = subprocess.run([sys.executable, "-m", "k3trt.cli.main", "generate", "--artifacts", str(tiny_artifacts),
                          "--backend", "torch", "--model", str(tiny_model_dir), "--prompt", "a fox", "--steps", "1",
                          "--resolution", "64x64", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.is_file()

"""The Python API surface of each supported TensorRT release, read from its real bindings, without a GPU.

The `tensorrt-cu12-bindings` / `tensorrt-cu13-bindings` wheels on PyPI hold the real `tensorrt.so` (only the
`-libs` packages are download stubs). It will not import without libnvinfer & co, but it needs only about ten
symbols from them (`createInferBuilder_INTERNAL`, `getPluginRegistry`, ...), none called while the module
registers its classes. So this script compiles three tiny stub libraries that define those symbols, imports the
real module against them, and writes every module attribute and every class's members (enum members included)
to `engines/api/tensorrt-<version>.json`. tests/engines/test_eng_api_conformance.py checks every TensorRT call
the project makes against the oldest and newest of these files.

Regenerate (needs gcc and PyPI; ~10 MB download):
    python -m k3trt.engines.api_surface 10.0.1 11.4.0.106
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

API_DIR = Path(__file__).resolve().parent / "api"
OLDEST, NEWEST = "10.0.1", "11.4.0.106"  # the supported range's ends (pyproject.toml: tensorrt>=10.0,<12)
STUB_SYMBOLS = """
void* createInferBuilder_INTERNAL(void* a, int b) { return 0; }
void* createInferRefitter_INTERNAL(void* a, void* b, int c) { return 0; }
void* createInferRuntime_INTERNAL(void* a, int b) { return 0; }
void* createNvOnnxParserRefitter_INTERNAL(void* a, void* b, int c) { return 0; }
void* createNvOnnxParser_INTERNAL(void* a, void* b, int c) { return 0; }
void* getBuilderPluginRegistry(int a) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
void* getPluginRegistry(void) { return 0; }
int initLibNvInferPlugins(void* a, const char* b) { return 0; }
int getInferLibVersion(void) { return 0; }
"""
PROBE = """
import importlib.machinery, importlib.util, json, sys
loader = importlib.machinery.ExtensionFileLoader("tensorrt", sys.argv[1])
module = importlib.util.module_from_spec(importlib.util.spec_from_loader("tensorrt", loader))
loader.exec_module(module)
members = {}
for name in dir(module):
    value = getattr(module, name)
    if isinstance(value, type):
        members[name] = sorted(n for n in dir(value) if not n.startswith("__"))
json.dump({"module": sorted(n for n in dir(module) if not n.startswith("__")), "members": members}, sys.stdout)
"""


def surface_path(version: str) -> Path:
    return API_DIR / f"tensorrt-{version}.json"


def load_surface(version: str) -> dict:
    return json.loads(surface_path(version).read_text())


def _wheel(version: str, folder: Path) -> Path:
    package = "tensorrt-cu12-bindings" if version.startswith("10.") else "tensorrt-cu13-bindings"
    platform = "manylinux_2_17_x86_64" if version.startswith("10.") else "manylinux_2_28_x86_64"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.11", "--platform", platform, f"{package}=={version}", "-d", str(folder)],
                   check=True)
    return next(folder.glob(f"{package.replace('-', '_')}-{version}-*.whl"))


def _stubs(folder: Path, major: str) -> None:
    source = folder / "stub.c"
    source.write_text(STUB_SYMBOLS)
    for lib in ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin"):
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / f"{lib}.so.{major}"), str(source)], check=True)


def extract(version: str) -> dict:
    """Download the cp311 bindings wheel of `version`, import its tensorrt.so against stubs, list the API."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wheel = _wheel(version, folder)
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith("tensorrt.so"))
            archive.extract(member, folder)
        _stubs(folder, version.split(".")[0])
        env = {**os.environ, "LD_LIBRARY_PATH": str(folder)}
        out = subprocess.run([sys.executable, "-c", PROBE, str(folder / member)], env=env, check=True,
                             capture_output=True, text=True).stdout
    return {"version": version, "source": f"{wheel.name} (tensorrt.so imported against stub libraries)",
            **json.loads(out)}


def main(argv: list[str] | None = None) -> int:
    versions = (argv if argv is not None else sys.argv[1:]) or [OLDEST, NEWEST]
    API_DIR.mkdir(exist_ok=True)
    for version in versions:
        surface = extract(version)
        surface_path(version).write_text(json.dumps(surface, indent=0, sort_keys=True) + "\n")
        print(f"{surface_path(version)}: {len(surface['module'])} names, {len(surface['members'])} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

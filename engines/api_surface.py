"""The Python API surface of each supported TensorRT release, read from its real bindings, without a GPU.

The `tensorrt-cu12-bindings` / `tensorrt-cu13-bindings` wheels on PyPI hold the real `tensorrt.so` (only the
`-libs` packages are download stubs). It will not import without libnvinfer & co, but it needs only about ten
symbols from them (`createInferBuilder_INTERNAL`, `getPluginRegistry`, ...), none called while the module
registers its classes. So this script compiles three tiny stub libraries that define those symbols, imports the
real module against them, and writes every module attribute and every class's members (enum members included)
to `engines/api/tensorrt-<version>.json`, with each member's kind and, for methods and functions, the parameter
names of every overload (read from pybind11's signature lines; `name=` marks a parameter with a default). tests/engines/test_eng_api_conformance.py checks every TensorRT call
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
PROBE = r"""
import importlib.machinery, importlib.util, json, re, sys
loader = importlib.machinery.ExtensionFileLoader("tensorrt", sys.argv[1])
module = importlib.util.module_from_spec(importlib.util.spec_from_loader("tensorrt", loader))
loader.exec_module(module)


def overloads(name, doc):
    # pybind11 docstrings open with `name(self: T, arg: type = default, ...) -> R`, one line per overload
    out = []
    for line in (doc or "").splitlines():
        found = re.match(r"\s*(?:\d+\.\s*)?" + re.escape(name) + r"\((.*)\)\s*(?:->.*)?$", line)
        if not found or found.group(1).strip() == "*args, **kwargs":
            continue
        params, depth, part = [], 0, ""
        for ch in found.group(1) + ",":  # split on top-level commas (types hold brackets)
            depth += ch in "[(<" and 1 or (ch in "])>" and -1 or 0)
            if ch == "," and depth == 0:
                params.append(part.strip()); part = ""
            else:
                part += ch
        names = [re.split(r"[:=]", p)[0].strip() + ("=" if "=" in p else "") for p in params if p]
        out.append([n for n in names if n not in ("self", "")])
    return out


def details(cls):
    out = {}
    for member in (n for n in dir(cls) if not n.startswith("_") or n == "__init__"):
        raw = next((base.__dict__[member] for base in cls.__mro__ if member in base.__dict__), None)
        if isinstance(raw, property):
            out[member] = "rw" if raw.fset is not None else "ro"
        elif isinstance(raw, cls) or (isinstance(raw, int) and not callable(raw)):
            out[member] = "value"
        elif isinstance(raw, type):
            out[member] = "class"
        elif callable(raw) or isinstance(raw, (staticmethod, classmethod)):
            out[member] = overloads(member, getattr(raw, "__doc__", ""))
        else:
            out[member] = "value"
    return out


members, signatures, functions = {}, {}, {}
for name in dir(module):
    value = getattr(module, name)
    if isinstance(value, type):
        members[name] = sorted(n for n in dir(value) if not n.startswith("__"))
        signatures[name] = details(value)
    elif callable(value) and not name.startswith("_"):
        functions[name] = overloads(name, getattr(value, "__doc__", ""))
json.dump({"module": sorted(n for n in dir(module) if not n.startswith("__")), "members": members,
           "signatures": signatures, "functions": functions}, sys.stdout)
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

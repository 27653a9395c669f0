"""The shape of manifest.json, checked when it is loaded: a damaged or hand-edited manifest (wrong JSON types,
missing keys, a newer writer's format) is a typed ArtifactError naming the key, never a KeyError or
TypeError later in the code that reads it."""
from __future__ import annotations

import re
from typing import Any

from k3trt.contract.errors import ArtifactError
from k3trt.contract.quality import QUALITY_KEY, check_quality_section

HEX64 = re.compile(r"^[0-9a-f]{64}$")
FILE_KEYS = {"path": str, "sha256": str, "bytes": int}
RECORD_KEYS = {"component": str, "variant": str, "graph": dict, "external_data": (dict, type(None)), "opset": int,
               "inputs": list, "outputs": list, "axes": dict, "source_hash": str, "export_key": str,
               "versions": dict, "validation": dict}
RECORD_OPTIONAL = {"extra": dict}
PIPELINE_INTS = ("latent_channels", "movq_scale_factor", "context_dim", "max_text_length")
MAX_DIM = 1 << 16  # no channel count, scale or width of this model family comes near
MAX_TEXT_TOKENS = 4096  # Kandinsky 3 reads 128


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, problem: str) -> None:
        raise ArtifactError(f"{self.where}: {key} {problem}", accepted="a manifest written by `k3trt export`",
                            fix="re-run `k3trt export` to rewrite it; never edit manifest.json by hand")

    def typed(self, key: str, value: Any, kind) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            self.fail(key, f"is {type(value).__name__} {str(value)[:40]!r}, expected {names}")
        return value

    def mapping(self, key: str, value: Any, spec: dict, optional: dict | None = None) -> dict:
        self.typed(key, value, dict)
        for name, kind in spec.items():
            if name not in value:
                self.fail(key, f"lacks the key {name!r}")
            self.typed(f"{key}.{name}", value[name], kind)
        unknown = set(value) - set(spec) - set(optional or {})
        if unknown:
            self.fail(key, f"has unknown key(s) {sorted(unknown)} (written by a newer k3trt?)")
        for name, kind in (optional or {}).items():
            if name in value:
                self.typed(f"{key}.{name}", value[name], kind)
        return value

    def file(self, key: str, value: Any, *, extra: dict | None = None) -> None:
        self.mapping(key, value, FILE_KEYS, extra)
        if not HEX64.match(value["sha256"]):
            self.fail(f"{key}.sha256", "is not a sha256 hex digest")
        if value["bytes"] < 0:
            self.fail(f"{key}.bytes", "is negative")

    def tensors(self, key: str, value: list) -> None:
        for i, spec in enumerate(value):
            self.mapping(f"{key}[{i}]", spec, {"name": str, "dtype": str, "shape": list})
            for dim in spec["shape"]:
                self.typed(f"{key}[{i}].shape", dim, (int, str))

    def record(self, key: str, value: Any) -> None:
        self.mapping(key, value, RECORD_KEYS, RECORD_OPTIONAL)
        self.file(f"{key}.graph", value["graph"])
        if value["external_data"] is not None:
            self.file(f"{key}.external_data", value["external_data"])
        self.tensors(f"{key}.inputs", value["inputs"])
        self.tensors(f"{key}.outputs", value["outputs"])
        multiples = value.get("extra", {}).get("multiples", {})
        self.typed(f"{key}.extra.multiples", multiples, dict)
        for axis, multiple in multiples.items():
            if not isinstance(multiple, int) or isinstance(multiple, bool) or not 1 <= multiple <= 1 << 16:
                self.fail(f"{key}.extra.multiples.{axis}", f"is {multiple!r}, expected an integer in 1..65536")
        for axis, bounds in value["axes"].items():
            self.typed(f"{key}.axes.{axis}", bounds, list)
            if len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) \
                    or not 0 <= bounds[0] <= bounds[1]:
                self.fail(f"{key}.axes.{axis}", f"is {bounds!r}, expected [min, max] integers, min <= max")


def check_manifest_data(data: Any, where: str, schema_version: int) -> dict:
    """Raise ArtifactError unless `data` (parsed manifest.json) has the structure this version reads."""
    check = _Checker(where)
    check.typed("the manifest", data, dict)
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > schema_version:
        raise ArtifactError(f"manifest schema version {version!r} in {where}: written by a newer k3trt",
                            accepted=str(schema_version),
                            fix="upgrade kandinsky3-trt (pip install -U kandinsky3-trt), or re-export with this one")
    if version != schema_version:
        raise ArtifactError(f"manifest schema version {version!r} in {where}", accepted=str(schema_version),
                            fix="re-export the artifacts with this version of k3trt")
    for key, kind in (("source", dict), ("pipeline", dict), ("onnx", dict), ("engines", dict)):
        check.typed(key, data.get(key), kind)
    for key in ("tokenizer", "scheduler"):
        if data.get(key) is not None:
            check.file(key, data[key], extra={"max_length": int, "pad_id": int} if key == "tokenizer" else None)
    for component, variants in data["onnx"].items():
        check.typed(f"onnx.{component}", variants, dict)
        for variant, record in variants.items():
            check.record(f"onnx.{component}.{variant}", record)
            if record["component"] != component or record["variant"] != variant:
                check.fail(f"onnx.{component}.{variant}", "names another component or variant inside")
    if data["onnx"]:
        for key in PIPELINE_INTS:
            check.typed(f"pipeline.{key}", data["pipeline"].get(key), int)
            if not 1 <= data["pipeline"][key] <= MAX_DIM:
                check.fail(f"pipeline.{key}", f"is {data['pipeline'][key]}, outside 1..{MAX_DIM}")
        for key in ("tokenizer", "scheduler"):
            check.typed(key, data.get(key), dict)
        check.typed("tokenizer.max_length", data["tokenizer"].get("max_length"), int)
        if not 1 <= data["tokenizer"]["max_length"] <= MAX_TEXT_TOKENS:  # the tokenizer pads to it: bounded
            check.fail("tokenizer.max_length", f"is {data['tokenizer']['max_length']}, outside 1..{MAX_TEXT_TOKENS}")
        if not 0 <= data["tokenizer"].get("pad_id", 0) < 1 << 31:
            check.fail("tokenizer.pad_id", "is not a token id")
    if data.get(QUALITY_KEY) is not None:  # what `k3trt qualify` measured (contract/quality.py)
        check_quality_section(data[QUALITY_KEY], where)
    for name, entry in data["engines"].items():
        check.typed(f"engines.{name}", entry, dict)
        check.file(f"engines.{name}.file", entry.get("file"))
    return data

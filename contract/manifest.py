"""The artifact directory: a manifest with hashes, versions and I/O specs, read by every later stage.

The runtime reads only this directory. The manifest is the commit point: files are written under
content-keyed names first, and a stage's work becomes visible only when the manifest is atomically replaced.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from k3trt.contract.arguments import check_path
from k3trt.contract.cards import TensorSpec
from k3trt.contract.errors import ArtifactError
from k3trt.contract.manifest_schema import check_manifest_data

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


# ----------------------------------------------------------------------------------------- files
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def inside(root: Path, relative: str) -> Path:
    """Resolve `relative` under `root`, refusing anything that escapes it (absolute paths, '..', symlinks)."""
    root = root.resolve()
    try:
        if not isinstance(relative, str) or "\x00" in relative:
            raise ValueError(relative)
        candidate = (root / os.fsdecode(os.fsencode(relative))).resolve()  # a lone surrogate fails here
    except (TypeError, ValueError, UnicodeEncodeError, OSError):
        raise ArtifactError(f"path {relative!r} in the manifest is not a usable file name",
                            accepted="relative paths inside the artifact directory",
                            fix="re-export the artifacts; never edit manifest paths by hand") from None
    if Path(relative).is_absolute() or (candidate != root and root not in candidate.parents):
        raise ArtifactError(
            f"path {relative!r} points outside the artifact directory {root}",
            accepted="relative paths inside the artifact directory",
            fix="re-export the artifacts; never edit manifest paths by hand",
        )
    return candidate


# ----------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the artifact directory
    sha256: str
    bytes: int

    @classmethod
    def of(cls, root: Path, path: Path) -> "FileRecord":
        return cls(str(path.relative_to(root)), sha256_file(path), path.stat().st_size)


@dataclasses.dataclass(frozen=True)
class OnnxRecord:
    component: str
    variant: str  # a Precision value: fp32 from export, int8 from calibration
    graph: FileRecord
    external_data: FileRecord | None
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, tuple[int, int]]  # dynamic axis name -> inclusive [min, max]
    source_hash: str  # config + weights of the torch component
    export_key: str  # source_hash + export options + package version: unchanged key => no work
    versions: dict[str, str]
    validation: dict[str, Any]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "OnnxRecord":
        data = dict(data)
        data["graph"] = FileRecord(**data["graph"])
        if data.get("external_data"):
            data["external_data"] = FileRecord(**data["external_data"])
        data["inputs"] = tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in data["inputs"])
        data["outputs"] = tuple(TensorSpec(o["name"], o["dtype"], tuple(o["shape"])) for o in data["outputs"])
        data["axes"] = {k: tuple(v) for k, v in data["axes"].items()}
        return cls(**data)

    def files(self) -> list[FileRecord]:
        return [self.graph] + ([self.external_data] if self.external_data else [])


# ----------------------------------------------------------------------------------------- manifest
class Manifest:
    """In-memory view of manifest.json. `save` is the atomic commit point of every stage."""

    def __init__(self, root: str | os.PathLike, data: dict | None = None):
        self.root = Path(root)
        self.data = data if data is not None else {
            "schema_version": SCHEMA_VERSION, "source": {}, "tokenizer": None, "scheduler": None,
            "pipeline": {}, "onnx": {}, "engines": {},
        }

    # --- loading
    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        root = check_path("artifacts", root)
        path = root / MANIFEST_NAME
        if not root.is_dir():
            state = "is a file, not a folder" if root.exists() else "does not exist"
            raise ArtifactError(f"artifact directory {str(root)!r} {state}",
                                fix="run `k3trt export --preset tiny --out DIR` (or --model DIR) first")
        if not path.is_file():
            raise ArtifactError(f"{str(path)!r} is missing: {str(root)!r} is not an artifact directory",
                                fix="point --artifacts at the folder `k3trt export --out` wrote")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ArtifactError(f"{str(path)!r} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})",
                                fix="re-run `k3trt export` to rewrite it") from None

        return cls(root, check_manifest_data(data, repr(str(path)), SCHEMA_VERSION))

    @classmethod
    def load_or_new(cls, root: str | os.PathLike) -> "Manifest":
        return cls.load(root) if (Path(root) / MANIFEST_NAME).is_file() else cls(root)

    # --- ONNX records
    def onnx(self, component: str, variant: str = "fp32") -> OnnxRecord:
        variants = self.data["onnx"].get(component)
        if not variants:
            raise ArtifactError(
                f"component {component!r} is not in {str(self.root / MANIFEST_NAME)!r}",
                accepted=", ".join(self.data["onnx"]) or "(none exported yet)",
                fix=f"run `k3trt export ... --components {component} --out {self.root}`")
        if variant not in variants:
            hint = (f"run `k3trt calibrate --artifacts DIR --component {component}` to add the int8 variant"
                    if variant == "int8" else "re-export")
            raise ArtifactError(f"{component} has no {variant!r} variant", accepted=", ".join(variants), fix=hint)
        return OnnxRecord.from_dict(variants[variant])

    def has_onnx(self, component: str, variant: str = "fp32") -> bool:
        return variant in self.data["onnx"].get(component, {})

    def put_onnx(self, record: OnnxRecord) -> None:
        self.data["onnx"].setdefault(record.component, {})[record.variant] = record.to_dict()

    def components(self) -> list[str]:
        return list(self.data["onnx"])

    # --- files
    def path(self, relative: str) -> Path:
        return inside(self.root, relative)

    def verify(self, records: Iterable[FileRecord]) -> None:
        """Check each file exists and hashes to what the manifest says; name the first one that does not."""
        for rec in records:
            path = self.path(rec.path)
            if not path.is_file():
                raise ArtifactError(f"artifact file {rec.path!r} is missing from {str(self.root)!r}",
                                    fix="re-run the stage that wrote it (`k3trt export`, `calibrate` or `build`)")
            actual = sha256_file(path)
            if actual != rec.sha256:
                raise ArtifactError(
                    f"artifact file {rec.path!r} was modified: sha256 {actual[:12]}… but the manifest says "
                    f"{rec.sha256[:12]}…", fix="re-export it; do not edit artifacts by hand")

    def verify_onnx(self, record: OnnxRecord) -> None:
        self.verify(record.files())

    def file_record(self, key: str) -> FileRecord:
        entry = self.data.get(key)
        if not entry:
            raise ArtifactError(f"the manifest has no {key!r} entry", fix="re-run `k3trt export`")
        return FileRecord(entry["path"], entry["sha256"], entry["bytes"])

    def referenced_paths(self) -> set[str]:
        """Every file the manifest points to (for garbage-collecting superseded files)."""
        paths = {self.data[k]["path"] for k in ("tokenizer", "scheduler") if self.data.get(k)}
        for variants in self.data["onnx"].values():
            for rec in variants.values():
                paths.add(rec["graph"]["path"])
                if rec.get("external_data"):
                    paths.add(rec["external_data"]["path"])
                weight_map = rec.get("extra", {}).get("weight_map")
                if isinstance(weight_map, dict) and weight_map.get("path"):  # LoRA's parameter -> initializer map
                    paths.add(weight_map["path"])
        for eng in self.data["engines"].values():
            paths.add(eng["file"]["path"])
        return paths


def load_onnx_graph(graph_path: Path):
    """The ONNX model at `graph_path` without its external weights; a damaged file is an ArtifactError."""
    import onnx

    try:
        return onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: the file is damaged
        raise ArtifactError(f"{str(graph_path)!r} is not a readable ONNX model ({type(exc).__name__}: "
                            f"{str(exc)[:200]})", fix="re-run the stage that wrote it (`k3trt export`)") from exc


def check_external_data_paths(graph_path: Path, root: Path) -> None:
    """Refuse an ONNX whose external-data locations point outside the artifact directory (path traversal)."""
    import onnx

    model = load_onnx_graph(graph_path)
    folder = graph_path.resolve().parent.relative_to(root.resolve())
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            inside(root, str(folder / location))

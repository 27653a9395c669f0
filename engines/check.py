"""`k3trt check`: lint ONNX for what TensorRT's ONNX parser will not accept, before a long engine build.

Pure Python (onnx only). Each finding names the node and its op type; errors make the command exit 1,
warnings do not. Operator support comes from a data table (below) with its sources; anything not in the table
is a warning, not a guess.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from k3trt.contract.arguments import check_path
from k3trt.contract.errors import ArtifactError, InvalidArgumentError
from k3trt.contract.manifest import FileRecord, Manifest, OnnxRecord, inside
from k3trt.engines.parser_support import ADDED_IN, SUPPORTED, UNSUPPORTED, parser_rejects, type_problem  # noqa: F401

PROTOBUF_LIMIT = 2 * 1024**3
DEFAULT_TRT_VERSION = (10, 0)

# --------------------------------------------------------------------------------------- operator table
# Operator and data-type support live in engines/parser_support.py (with their sources), shared with the
# TensorRT stand-in the tests build against; the names are re-exported here for the lint's readers.

# The newest ONNX opset each TensorRT release's parser covers, from the sources named per row; a release reads
# the row of the newest release at or below it. The parser refuses only opsets below 7 (onnx-tensorrt
# ModelImporter.cpp, 10.1) and parses newer ones op by op, so an opset past the row is a warning, not an error.
# It matters for bf16 variants: ONNX accepts bfloat16 for Conv and InstanceNormalization only from opset 22, so
# the bf16 U-Net and MoVQ are opset 22 (export/variants.py: variant_opset) and want TensorRT >= 10.6.
MIN_OPSET = 9  # operators.md: "the inclusive range of opset 9 to ..." in every 10.x/11.x matrix
PARSER_MAX_OPSET = (
    ((10, 0), 20),   # onnx-tensorrt docs/operators.md at 10.0/10.1: "opset 9 to opset 20"
    ((10, 6), 22),   # onnx-tensorrt docs/Changelog.md 10.6: "Updated ONNX submodule version to 1.17.0" (opset 22)
    ((10, 11), 23),  # Changelog 10.11: "Updated ONNX version to 1.18" (opset 23)
    ((10, 15), 24),  # operators.md at 10.15: "opset 9 to opset 24" (11.0-11.4 keep 24: 11.2's matrix says so)
    ((11, 5), 25),   # TensorRT 11.5 release notes: "Added support for ONNX opset 25"
)


def max_opset(version: tuple[int, int]) -> int:
    """The newest opset documented for TensorRT `version` (the oldest row for older releases)."""
    covered = [opset for since, opset in PARSER_MAX_OPSET if version >= since]
    return covered[-1] if covered else PARSER_MAX_OPSET[0][1]


def first_release_for(opset: int) -> tuple[int, int] | None:
    return next((since for since, top in PARSER_MAX_OPSET if top >= opset), None)
# Tensor types the parser has no mapping for (TensorRT 10 types: DOUBLE (cast down), FLOAT, FLOAT16, BFLOAT16,
# INT32, INT64, FP8 E4M3FN, INT8, INT4, UINT8, BOOL).
UNSUPPORTED_TYPES = {4: "UINT16", 5: "INT16", 8: "STRING", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
                     15: "COMPLEX128", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4"}
INT64_NATIVE_SINCE = (9, 0)  # Changelog 9.0 EA: "The ONNX parser no longer automatically casts INT64 to INT32"
# Constant-input requirements lifted by a release (Changelog): tensor `axes` for Slice 10.3, Pad 10.4,
# Squeeze/Unsqueeze 10.7. Reduce*/CumSum axes must be build-time constants in every 10.x.
CONSTANT_INPUTS = {"Slice": (3, (10, 3)), "Pad": (3, (10, 4)), "Squeeze": (1, (10, 7)), "Unsqueeze": (1, (10, 7)),
                   "CumSum": (1, None), **{op: (1, None) for op in (
                       "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                       "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")}}


@dataclasses.dataclass(frozen=True)
class Finding:
    severity: str  # "error" (the parser or our build will fail) or "warning"
    code: str
    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7} [{self.code}] {self.op_type} {self.node!r}: {self.message}"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    label: str
    path: str
    nodes: int
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]


def parse_trt_version(text: str | None) -> tuple[int, int]:
    if text is None:
        return DEFAULT_TRT_VERSION
    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", str(text))
    if not match or not 8 <= int(match[1]) <= 11:
        raise InvalidArgumentError(f"--trt-version {text!r}", accepted="MAJOR[.MINOR] from 8.0 to 11.x, e.g. 10.0",
                                   fix="pass the TensorRT version you will build with, e.g. --trt-version 10.3")
    return int(match[1]), int(match[2] or 0)


# --------------------------------------------------------------------------------------- graph lint
def _attr(node, name: str, default=None):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attribute_findings(node, label: str, consts: set[str], version: tuple[int, int]) -> list[Finding]:
    out, op = [], node.op_type

    def bad(message: str, severity: str = "error", code: str = "unsupported-attribute"):
        out.append(Finding(severity, code, label, op, message))

    if op == "Resize":
        if _text(_attr(node, "mode", b"nearest")) == "cubic":
            bad("mode 'cubic' (TensorRT supports nearest and linear)")
        if _text(_attr(node, "coordinate_transformation_mode", b"half_pixel")) == "tf_crop_and_resize":
            bad("coordinate_transformation_mode 'tf_crop_and_resize'")
        if _attr(node, "antialias", 0):
            bad("antialias=1 (antialiasing is not supported)")
        if _text(_attr(node, "keep_aspect_ratio_policy", b"stretch")) != "stretch":
            bad("keep_aspect_ratio_policy other than 'stretch'")
    if op in ("MaxPool", "AveragePool", "LpPool") and any(d != 1 for d in _attr(node, "dilations", []) or []):
        bad("dilations other than 1")
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        bad("the Indices output is unsupported")
    if op == "LSTM" and (_attr(node, "input_forget", 0) or _attr(node, "layout", 0)):
        bad("input_forget and layout must be 0")
    if op == "ScatterND" and _text(_attr(node, "reduction", b"none")) != "none":
        bad("reduction other than 'none'")
    if op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
        bad("sparse or string constants")
    if op == "Einsum" and "..." in _text(_attr(node, "equation", b"")):
        bad("ellipsis in the equation (rejected by TensorRT <= 8.x parsers)", "warning")
    if op in CONSTANT_INPUTS:
        index, lifted = CONSTANT_INPUTS[op]
        if len(node.input) > index and node.input[index] and node.input[index] not in consts:
            if lifted is None or version < lifted:
                since = f" before TensorRT {lifted[0]}.{lifted[1]}" if lifted else ""
                bad(f"input {index} ({node.input[index]!r}) must be a build-time constant{since}",
                    code="dynamic-constant-input")
    return out


def tensor_types(model) -> dict[str, int]:
    """ONNX element type of every tensor whose type ONNX shape inference (or the graph itself) states."""
    import onnx

    try:  # types only: a model loaded without its external data infers as well
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # a graph ONNX cannot infer: what it declares is still usable
        graph = model.graph
    values = list(graph.value_info) + list(graph.input) + list(graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _type_findings(node, label: str, types: Mapping[str, int]) -> list[Finding]:
    """An op/type pair TensorRT has no implementation for (engines/parser_support.py: the same table the
    tests' TensorRT stand-in builds with): the parser accepts it, the build fails minutes later."""
    if node.domain not in ("", "ai.onnx"):
        return []
    first_in = types.get(node.input[0]) if node.input and node.input[0] else None
    first_out = types.get(node.output[0]) if node.output and node.output[0] else None
    problem = type_problem(node.op_type, first_in, first_out)
    return [Finding("error", "unsupported-type-for-op", label, node.op_type, problem)] if problem else []


def _node_findings(graph, version: tuple[int, int], functions: set[str], outer: set[str], prefix="",
                   types: Mapping[str, int] | None = None) -> list:
    import onnx

    types = types or {}

    consts = set(outer) | {t.name for t in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for index, node in enumerate(graph.node):
        label = prefix + (node.name or f"#{index}")
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, op) not in functions:
                out.append(Finding("error", "custom-op", label, op, f"domain {node.domain!r} needs a TensorRT "
                                   "plugin registered under this op name"))
        elif parser_rejects(op, version):
            out.append(Finding("error", "unsupported-op", label, op, parser_rejects(op, version)))
        elif op not in SUPPORTED and op not in ADDED_IN and (node.domain, op) not in functions:
            out.append(Finding("warning", "unknown-op", label, op, "not in k3trt's operator table; the parser "
                               "may or may not accept it"))
        if op == "Cast" and _attr(node, "to") in UNSUPPORTED_TYPES:
            out.append(Finding("error", "unsupported-type", label, op,
                               f"casts to {UNSUPPORTED_TYPES[_attr(node, 'to')]}"))
        out += _type_findings(node, label, types)
        out += _attribute_findings(node, label, consts, version)
        for attr in node.attribute:  # If/Loop/Scan bodies
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                out += _node_findings(body, version, functions, consts, f"{label}/{attr.name}/", types)
    return out


def _io_findings(graph, version, axes: Mapping | None) -> list[Finding]:
    out = []
    for kind, values in (("graph input", graph.input), ("graph output", graph.output)):
        for value in values:
            tensor = value.type.tensor_type
            if tensor.elem_type in UNSUPPORTED_TYPES:
                out.append(Finding("error", "unsupported-type", value.name, kind,
                                   f"type {UNSUPPORTED_TYPES[tensor.elem_type]}"))
            if tensor.elem_type == 7 and version < INT64_NATIVE_SINCE:
                out.append(Finding("error", "int64-io", value.name, kind, "INT64 I/O: TensorRT < 9 casts it to "
                                   "INT32, so the bindings no longer match the manifest; export it as int32"))
            if kind == "graph output":
                continue
            if not tensor.HasField("shape"):
                out.append(Finding("error", "unknown-rank", value.name, kind, "rank unknown: TensorRT needs the "
                                   "rank of every input; re-export with shapes"))
                continue
            for i, dim in enumerate(tensor.shape.dim):
                if not dim.dim_param and dim.dim_value <= 0:
                    out.append(Finding("error", "unnamed-dynamic-dim", value.name, kind, f"dimension {i} is "
                                       "dynamic without a name: profiles cannot refer to it; name it in dynamic_axes"))
                elif dim.dim_param and axes is not None and dim.dim_param not in axes:
                    out.append(Finding("warning", "unknown-axis", value.name, kind, f"dimension {i} "
                                       f"{dim.dim_param!r} is not an axis of the manifest ({', '.join(axes)})"))
    return out


def _initializer_findings(graph, version) -> list[Finding]:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = []
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for tensor in graph.initializer:
        if tensor.data_type in UNSUPPORTED_TYPES:
            out.append(Finding("error", "unsupported-type", tensor.name, "initializer",
                               f"type {UNSUPPORTED_TYPES[tensor.data_type]}"))
        if tensor.data_type != 7 or version >= INT64_NATIVE_SINCE or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        values = numpy_helper.to_array(tensor)
        if values.size and (values.max() > np.iinfo(np.int32).max or values.min() < np.iinfo(np.int32).min):
            only_slices = set(consumers.get(tensor.name, [])) <= {"Slice"}
            out.append(Finding("warning" if only_slices else "error", "int64-range", tensor.name, "initializer",
                               "INT64 values outside int32 range are clamped by TensorRT < 9"
                               + (" (harmless as Slice bounds)" if only_slices else "")))
    return out


def _opset_findings(opset: int | None, version: tuple[int, int]) -> list[Finding]:
    if opset is not None and opset < MIN_OPSET:
        return [Finding("error", "opset", "(model)", "opset", f"opset {opset} < {MIN_OPSET}")]
    if opset is None or opset <= max_opset(version):
        return []
    first = first_release_for(opset)
    newer = (f"TensorRT {first[0]}.{first[1]}+ documents it (check with --trt-version {first[0]}.{first[1]})"
             if first else "no supported TensorRT release documents it yet")
    return [Finding("warning", "opset", "(model)", "opset",
                    f"opset {opset}: TensorRT {version[0]}.{version[1]}'s parser documents opsets {MIN_OPSET}.."
                    f"{max_opset(version)} (it parses newer ones op by op); {newer}")]


def lint_model(model, *, trt_version: tuple[int, int] = DEFAULT_TRT_VERSION,
               axes: Mapping | None = None) -> list[Finding]:
    """Findings for an in-memory model (graph-level checks; no file access)."""
    out = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    out += _opset_findings(opset, trt_version)
    functions = {(f.domain, f.name) for f in model.functions}
    out += _io_findings(model.graph, trt_version, axes)
    out += _initializer_findings(model.graph, trt_version)
    out += _node_findings(model.graph, trt_version, functions, set(), types=tensor_types(model))
    return out


# --------------------------------------------------------------------------------------- files
def _file_findings(model, path: Path, root: Path) -> list[Finding]:
    import onnx


    out, external = [], False
    folder = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        external = True
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            target = inside(root, os.path.relpath(folder / location, root.resolve()))
        except ArtifactError:
            out.append(Finding("error", "external-data-path", tensor.name, "initializer",
                               f"external data {location!r} points outside {root}"))
            continue
        if not target.is_file():
            out.append(Finding("error", "external-data-missing", tensor.name, "initializer",
                               f"external data file {location!r} is missing"))
    if path.stat().st_size >= PROTOBUF_LIMIT and not external:
        out.append(Finding("error", "protobuf-limit", "(model)", "model", "the file is over 2 GB without "
                           "external data: protobuf cannot parse it; re-export with external data"))
    return out


def check_onnx_file(path: str | os.PathLike, *, trt_version=DEFAULT_TRT_VERSION, root: str | os.PathLike | None = None,
                    axes: Mapping | None = None, label: str | None = None) -> CheckResult:
    import onnx


    path = check_path("--onnx", path)
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise InvalidArgumentError(f"ONNX file {str(path)!r} {state}", fix="pass --onnx PATH/model.onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: report, do not crash the lint
        finding = Finding("error", "unreadable", "(model)", "model", f"cannot parse the protobuf: {exc}")
        return CheckResult(label or str(path), str(path), 0, (finding,))
    try:
        findings = _file_findings(model, path, Path(root) if root else path.parent)
        findings += lint_model(model, trt_version=trt_version, axes=axes)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, UnicodeError) as exc:
        # protobuf parsed it, but fields hold what no exporter writes (found by fuzzing: bytes for a name)
        finding = Finding("error", "unreadable", "(model)", "model", f"the model's fields are damaged "
                          f"({type(exc).__name__}: {str(exc)[:200]})")
        return CheckResult(label or str(path), str(path), 0, (finding,))
    return CheckResult(label or str(path), str(path), len(model.graph.node), tuple(findings))


def check_artifacts(artifacts: str | os.PathLike, *, trt_version=DEFAULT_TRT_VERSION) -> list[CheckResult]:
    manifest = Manifest.load(artifacts)
    results = integrity_results(manifest)
    for component, variants in manifest.data["onnx"].items():
        for variant, data in variants.items():
            record = OnnxRecord.from_dict(data)
            damaged = _integrity(manifest, record.files(), f"{component}/{variant}", record.graph.path)
            if damaged.findings:  # linting a file that is not what was exported would mislead
                results.append(damaged)
                continue
            results.append(check_onnx_file(manifest.path(record.graph.path), trt_version=trt_version,
                                           root=manifest.root, axes=record.axes, label=f"{component}/{variant}"))
    return results


def _integrity(manifest, records, label: str, path: str) -> CheckResult:
    """Each file present with the manifest's sha256 (what the runtime verifies before loading it)."""
    findings = []
    for record in records:
        try:
            manifest.verify([record])
        except ArtifactError as exc:
            findings.append(Finding("error", "integrity", record.path, "file", exc.what))
    return CheckResult(label, path, 0, tuple(findings))


def integrity_results(manifest) -> list[CheckResult]:
    """Hash checks of the side files and engines, one result per damaged file (ONNX files are checked with
    their lint)."""

    results = []
    for key in ("tokenizer", "scheduler"):
        if manifest.data.get(key):
            record = manifest.file_record(key)
            results.append(_integrity(manifest, [record], key, record.path))
    for name, entry in manifest.data.get("engines", {}).items():
        record = FileRecord(**{k: entry["file"][k] for k in ("path", "sha256", "bytes")})
        results.append(_integrity(manifest, [record], f"engine {name}", record.path))
    return [result for result in results if result.findings]  # intact side files add no line


def format_results(results: Iterable[CheckResult], trt_version: tuple[int, int]) -> str:
    lines, errors, warnings = [], 0, 0
    for result in results:
        n_err = len(result.errors)
        n_warn = len(result.findings) - n_err
        errors, warnings = errors + n_err, warnings + n_warn
        status = "ok" if not result.findings else f"{n_err} error(s), {n_warn} warning(s)"
        lines.append(f"{result.label}: {status} ({result.nodes} nodes, {result.path})")
        lines += [f"  {finding}" for finding in result.findings]
    lines.append(f"TensorRT {trt_version[0]}.{trt_version[1]} parser check: {errors} error(s), "
                 f"{warnings} warning(s)")
    return "\n".join(lines)

"""Reduced-precision ONNX variants (fp16, bf16) made from the validated fp32 export, verified, then committed.

A strongly typed TensorRT engine runs in the types of its ONNX, so the precision decisions live here:
- The converter is NVIDIA ModelOpt's ONNX AutoCast (`convert_to_mixed_precision`), what TensorRT's 10 -> 11
  migration guide names. The nodes the component's card keeps fp32 (export/fp32_islands.py) are excluded by
  exact name; I/O types stay fp32, so a variant has the fp32 export's I/O names, dtypes and axes.
- Each variant is verified before it is recorded: against the fp32 ONNX on ONNX Runtime (equal to torch within
  1e-4, checked at export) with fresh inputs, (a) on ONNX Runtime as it runs the variant and (b) with the
  variant's fp16/bf16 storage emulated faithfully (runtime/backends/storage.py), which is where overflow shows.
  Bounds: the card's parity tolerance for the precision.
- Files go to a staging folder, then to a content-keyed folder; the manifest (`onnx.<component>.<precision>`,
  with the fp32 source's export key and the fp32 node list) is the commit point, so a failed conversion leaves
  the manifest and earlier variants as they were.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from k3trt.contract.cards import card
from k3trt.contract.errors import (
    ArtifactError,
    BackendUnavailableError,
    InvalidArgumentError,
    ValidationError,
)
from k3trt.contract.manifest import (
    FileRecord,
    Manifest,
    OnnxRecord,
    sha256_file,
    sha256_json,
)
from k3trt.contract.tensor_metrics import compare
from k3trt.export.fp32_islands import fp32_nodes
from k3trt.export.onnx_export import PROTOBUF_LIMIT, save_onnx
from k3trt.writing.atomic import save_manifest

CONVERTER = "nvidia-modelopt onnx.autocast.convert_to_mixed_precision"
VERIFY_SEED = 4321


# ----------------------------------------------------------------------------------------- requests
def parse_precisions(text: str | None) -> tuple[str, ...]:
    """'fp16,bf16' -> ('fp16', 'bf16'); fp32 is always exported, so it is accepted and ignored."""
    out = []
    for item in filter(None, (p.strip().lower() for p in (text or "").split(","))):
        if item not in ("fp32", "fp16", "bf16"):
            raise InvalidArgumentError(f"unknown export precision {item!r}", accepted="fp16, bf16 (fp32 always)",
                                       fix="e.g. --precision fp16,bf16; int8 comes from `k3trt calibrate`")
        if item != "fp32":
            out.append(item)
    return tuple(dict.fromkeys(out))


def check_variant_allowed(component: str, precision: str) -> None:
    policy = card(component).precision
    if precision not in policy.converted:
        raise InvalidArgumentError(f"{component} cannot have a converted {precision} variant",
                                   accepted=", ".join(policy.converted) or "none",
                                   fix="drop it from --precision, or name components that can have it")


# ----------------------------------------------------------------------------------------- conversion
def require_autocast():
    try:
        logging.getLogger("modelopt").setLevel(logging.WARNING)
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise BackendUnavailableError(
            f"NVIDIA ModelOpt's ONNX AutoCast is not importable ({exc})",
            accepted="nvidia-modelopt with onnxslim, onnxscript, lief and onnxconverter-common",
            fix="pip install -c constraints/cpu.txt -e '.[export]' (not `nvidia-modelopt[onnx]`: it replaces "
                "the CPU onnxruntime with onnxruntime-gpu)") from None
    logging.getLogger("modelopt").setLevel(logging.WARNING)
    for handler in logging.getLogger("modelopt").handlers:
        handler.setLevel(logging.WARNING)
    return convert_to_mixed_precision


# Operators TensorRT has no kernel for in a precision, kept fp32 (AutoCast casts their inputs to fp32 and their
# outputs back): TensorRT has no bf16 Resize ("TRT does not support BF16 for the Resize operator", NVIDIA/TensorRT
# demo/Diffusion base_model.py, whose `cast_resize_io` does the same for strongly typed bf16 builds). The same
# pairs are engines/parser_support.py's BUILDER_HAS_NO_KERNEL (a test keeps the two equal; export may not import
# engines).
FP32_ONLY_OPS = {"fp16": (), "bf16": ("Resize",)}


def convert(fp32_path: Path, precision: str, keep_fp32: tuple[str, ...]) -> onnx.ModelProto:
    """The mixed-precision model: everything in `precision` except the `keep_fp32` nodes and the ops TensorRT
    cannot run in `precision` (FP32_ONLY_OPS); fp32 I/O; the fp32 export's opset unless an op needs a newer one to
    accept `precision` (`variant_opset`)."""
    autocast = require_autocast()
    exclude = [f"^{re.escape(name)}$" for name in keep_fp32]
    opset = variant_opset(onnx.load(str(fp32_path), load_external_data=False), precision)
    # data_max=inf: the islands are the written policy, not a guess from one random batch
    with _one_scan_dead_node_cleanup(), _without_opset_advice():
        return autocast(str(fp32_path), precision, nodes_to_exclude=exclude,
                        op_types_to_exclude=list(FP32_ONLY_OPS.get(precision, ())) or None, data_max=np.inf,
                        keep_io_types=True, opset=opset)


ONNX_TYPE = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}


def variant_opset(model: onnx.ModelProto, precision: str) -> int:
    """The lowest opset >= the model's at which every op that computes in fp32 accepts `precision`'s type.

    fp16 needs no newer opset. bf16 does where the graph has Conv or InstanceNormalization: ONNX allows bfloat16
    for them only from opset 22 (U-Net, MoVQ), while the T5 graph's float ops accept it at the export's opset.
    AutoCast's own default is 22 for every bf16 model; a lower one keeps the variant readable by the TensorRT
    parsers that document only older opsets (engines/check.py). Ops that touch no fp32 tensor (shape arithmetic
    in int64) stay as they are and do not count."""
    import onnx.defs

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ops = _float_ops(model)

    def accepts(op: str, opset: int) -> bool:
        try:
            schema = onnx.defs.get_schema(op, opset)
        except onnx.defs.SchemaError:
            return True  # not an ONNX op at this opset (a problem for the fp32 export, not for the variant)
        floats = [c for c in schema.type_constraints if "tensor(float)" in c.allowed_type_strs]
        return not floats or any(ONNX_TYPE[precision] in c.allowed_type_strs for c in floats)

    for opset in range(current, max(current, onnx.defs.onnx_opset_version()) + 1):
        if all(accepts(op, opset) for op in ops):
            return opset
    raise ArtifactError(f"no ONNX opset accepts {precision} for every float op of the graph ({sorted(ops)})",
                        fix="use another precision for this component")


def _float_ops(model: onnx.ModelProto) -> set[str]:
    """Op types of the top-level nodes that read or write an fp32 tensor (types from ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)
             + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return {n.op_type for n in graph.node if n.domain in ("", "ai.onnx")
            and any(types.get(t) == onnx.TensorProto.FLOAT for t in list(n.input) + list(n.output))}


@contextlib.contextmanager
def _without_opset_advice():
    """AutoCast warns that bf16 below opset 22 'may fail'; `variant_opset` chose the opset from the ops' schemas."""
    def advice(record: logging.LogRecord) -> bool:
        return "has limited BF16 support" not in record.getMessage()

    logger = logging.getLogger("modelopt.onnx.autocast")
    logger.addFilter(advice)
    try:
        yield
    finally:
        logger.removeFilter(advice)


def remove_dead_nodes(converter) -> None:
    """ModelOpt's rule, one scan: drop top-level nodes whose outputs no node reads and no graph output names."""
    graph = converter.model.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if not any(out in read for out in n.output)]:
        graph.node.remove(node)


@contextlib.contextmanager
def _one_scan_dead_node_cleanup():
    """ModelOpt 0.47's PrecisionConverter._cleanup_no_consumer_nodes finds dead nodes by scanning the whole graph
    once per output tensor (O(nodes^2)): 230 of the 315 s of converting the small U-Net (4125 nodes) to fp16,
    measured with cProfile. The same rule (a node whose outputs no node reads and no graph output names) with one
    scan; tests/export/test_exp_variants.py checks the result is byte-identical to ModelOpt's own."""
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    original = getattr(PrecisionConverter, "_cleanup_no_consumer_nodes", None)
    if original is None:  # another ModelOpt: its own implementation
        yield
        return

    PrecisionConverter._cleanup_no_consumer_nodes = remove_dead_nodes
    try:
        yield
    finally:
        PrecisionConverter._cleanup_no_consumer_nodes = original


def _kept_fp32(model: onnx.ModelProto, wanted: tuple[str, ...], ops: dict[str, str]) -> tuple[str, ...]:
    """The policy nodes still in the converted graph. AutoCast keeps node names and drops only Casts that became
    no-ops (fp32 -> fp32, e.g. T5LayerNorm's `.to(float32)`); any other lost node means the policy was lost."""
    names = {n.name for n in model.graph.node}
    lost = [n for n in wanted if n not in names and ops.get(n) != "Cast"]
    if lost:
        raise ArtifactError(f"{len(lost)} fp32-island node(s) vanished in conversion, e.g. {lost[:3]}",
                            fix="report this with the ModelOpt version; the manifest was left as it was")
    return tuple(n for n in wanted if n in names)


# ----------------------------------------------------------------------------------------- verification
def verification_inputs(component: str, info: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(dims, feeds): fresh inputs at the export recipe's first validation shape."""
    from k3trt.export.components import component_spec

    spec = component_spec(component)
    dims = spec.validate[0]
    feeds = spec.make_inputs(dims, info, torch.Generator().manual_seed(VERIFY_SEED))
    return dims, {k: v.numpy() for k, v in feeds.items()}


def verify_variant(component: str, precision: str, fp32_path: Path, variant: onnx.ModelProto,
                   info: dict) -> tuple[dict, list[str]]:
    """Variant vs fp32 ONNX on ONNX Runtime, run as ONNX Runtime runs it and with its storage emulated."""
    from k3trt.runtime.backends.ort import cpu_session, storage_session

    dims, feeds = verification_inputs(component, info)
    names = card(component).output_names
    reference = cpu_session(fp32_path, flush_denormals=False).run(names, feeds)
    tolerance = card(component).parity_tolerance(precision)
    runs = {"storage": lambda: storage_session(variant).run(names, feeds)}
    if precision == "fp16":  # the CPU provider has no bf16 MatMul/Conv kernels: only the emulation runs bf16
        runs["ort"] = lambda: cpu_session(variant.SerializeToString(), flush_denormals=False).run(names, feeds)
    cases, failures = [], []
    for evaluator, run in runs.items():
        for name, ref, got in zip(names, reference, run()):
            metrics = compare(ref, np.asarray(got, dtype=np.float32))
            ok = metrics.within(**tolerance.bounds())
            cases.append({"evaluator": evaluator, "output": name, "ok": ok, **metrics.as_dict()})
            if not ok:
                failures.append(f"{component} {precision} ({evaluator}) {name}: {metrics} (bound "
                                f"rel_l2 <= {tolerance.rel_l2:g}, cosine >= {tolerance.cosine:g}, finite)")
    return {"reference": "fp32 ONNX on ONNX Runtime CPU", "dims": dims, "bound": tolerance.bounds(),
            "cases": cases}, failures


# ----------------------------------------------------------------------------------------- writing
def _save(model: onnx.ModelProto, staging: Path, fp32: OnnxRecord) -> tuple[Path, Path | None]:
    graph = staging / "model.onnx"
    threshold = PROTOBUF_LIMIT if fp32.external_data is None else 0
    external = save_onnx(model, graph, external_threshold=min(threshold, PROTOBUF_LIMIT))
    onnx.checker.check_model(str(graph))  # by path: works past 2 GB with external data
    return graph, external


def _content_folder(root: Path, component: str, precision: str, staging: Path, graph: Path,
                    external: Path | None) -> Path:
    digest = sha256_json([sha256_file(graph), sha256_file(external) if external else None])[:12]
    final = root / component / f"{precision}-{digest}"
    if not final.exists():
        os.replace(staging, final)
    return final


def make_variant(manifest: Manifest, component: str, precision: str, info: dict, *,
                 log: Callable[[str], None] = print) -> OnnxRecord:
    """Convert, verify and write one variant; returns its record (the caller commits the manifest)."""
    check_variant_allowed(component, precision)
    fp32 = manifest.onnx(component)
    manifest.verify_onnx(fp32)
    fp32_path = manifest.path(fp32.graph.path)
    policy = card(component).precision.islands(precision)
    graph_only = onnx.load(str(fp32_path), load_external_data=False)
    keep, ops = fp32_nodes(policy, graph_only), {n.name: n.op_type for n in graph_only.graph.node}
    del graph_only
    log(f"  {component}: converting to {precision} ({len(keep)} nodes kept fp32 by policy {policy!r}) ...")
    start = time.perf_counter()
    model = convert(fp32_path, precision, keep)
    keep = _kept_fp32(model, keep, ops)
    validation, failures = verify_variant(component, precision, fp32_path, model, info)
    if failures:
        raise ValidationError(failures, fix="the manifest and earlier variants were left as they were; keep "
                                            "more nodes fp32 on the component's card, or use another precision")
    staging = Path(tempfile.mkdtemp(dir=manifest.root, prefix=f".staging-{component}-{precision}-"))
    try:
        graph, external = _save(model, staging, fp32)
        del model
        final = _content_folder(manifest.root, component, precision, staging, graph, external)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = OnnxRecord(
        component=component, variant=precision, graph=FileRecord.of(manifest.root, final / graph.name),
        external_data=FileRecord.of(manifest.root, final / external.name) if external else None,
        opset=next(o.version for o in onnx.load(str(final / graph.name), load_external_data=False).opset_import
                   if o.domain in ("", "ai.onnx")),
        inputs=fp32.inputs, outputs=fp32.outputs, axes=dict(fp32.axes), source_hash=fp32.source_hash,
        export_key=sha256_json({"fp32": fp32.export_key, "precision": precision, "fp32_nodes": keep}),
        versions=fp32.versions, validation=validation,
        extra={**{k: v for k, v in fp32.extra.items() if k in ("multiples", "model_info", "source_folder")},
               "source": f"onnx.{component}.fp32", "fp32_export_key": fp32.export_key, "fp32_policy": policy,
               "fp32_nodes": list(keep), "converter": CONVERTER, "converter_version": _modelopt_version(),
               "seconds": round(time.perf_counter() - start, 2)})
    measured = "; ".join(f"{c['evaluator']} rel_l2 {c['rel_l2']:.2e} cosine {c['cosine']:.6f}"
                         for c in validation["cases"])
    log(f"  {component}: {precision} ok vs fp32 at {validation['dims']}: {measured} ({len(keep)} nodes fp32, "
        f"{record.extra['seconds']} s)")
    return record


def _modelopt_version() -> str:
    import importlib.metadata as md

    return md.version("nvidia-modelopt")


def is_current(manifest: Manifest, component: str, precision: str) -> bool:
    if not manifest.has_onnx(component, precision):
        return False
    derived = manifest.data["onnx"][component][precision].get("extra", {}).get("fp32_export_key")
    return derived == manifest.onnx(component).export_key


def model_info_of(manifest: Manifest, component: str) -> dict:
    info = manifest.onnx(component).extra.get("model_info")
    if info is None:
        raise ArtifactError(f"the {component} fp32 record has no model_info (exported by an older k3trt)",
                            fix=f"re-export: k3trt export ... --components {component} --out {manifest.root} --force")
    return info


def add_variants(artifacts: str | os.PathLike, components, precisions, *,
                 log: Callable[[str], None] = print) -> list[str]:
    """Make every missing or stale (component, precision) variant and commit the manifest once."""
    manifest = Manifest.load(artifacts)
    made = []
    for component in components:
        for precision in precisions:
            check_variant_allowed(component, precision)
    for component in components:
        for precision in precisions:
            if is_current(manifest, component, precision):
                continue
            record = make_variant(manifest, component, precision, model_info_of(manifest, component), log=log)
            manifest.put_onnx(record)
            made.append(f"{component}.{precision}")
    if made:
        save_manifest(manifest)
    return made

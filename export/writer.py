"""Export orchestration: source -> per-component ONNX -> validation -> manifest, incrementally and atomically.

Each component is exported into a staging folder, validated, then moved to a content-keyed folder; the
manifest is replaced only after that, so a failed component leaves the previous good artifacts intact.
Unchanged inputs (source config + weights, export options, package version) do no work.
"""
from __future__ import annotations

import copy
import gc
import importlib.metadata as md
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from k3trt.contract.arguments import check_int, parse_list
from k3trt.contract.cards import LATENT_FACTOR, MAX_TEXT_LENGTH
from k3trt.contract.errors import (
    InvalidArgumentError,
    K3TRTError,
    ModelSourceError,
    ValidationError,
)
from k3trt.contract.manifest import (
    FileRecord,
    Manifest,
    OnnxRecord,
    sha256_file,
    sha256_json,
)
from k3trt.export.components import (
    SPECS,
    component_spec,
    default_components,
    model_info,
)
from k3trt.export.low_memory import (
    check_disk_for_streamed,
    check_low_memory_precisions,
    check_low_memory_source,
    export_streamed_files,
    low_memory_components,
)
from k3trt.export.low_memory_trace import STREAMED
from k3trt.export.onnx_export import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    PROTOBUF_LIMIT,
    export_onnx,
)
from k3trt.export.sources import ModelSource
from k3trt.export.validate import validate_component
from k3trt.writing.atomic import atomic_write_bytes, save_manifest
from k3trt.writing.locking import artifact_lock, staging_dir
from k3trt.writing.ownership import check_output_dir, claim_output_dir

PACKAGE_VERSION = "0.1.0"


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for dist in ("kandinsky3-trt", "torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _write_keyed(root: Path, folder: str, stem: str, data: bytes) -> FileRecord:
    """Small side files (tokenizer, scheduler) under content-keyed names: a new one never overwrites the
    file the current manifest points to."""
    digest = sha256_json(data.decode())[:12]
    path = root / folder / f"{stem}-{digest}.json"
    if not path.is_file():
        atomic_write_bytes(path, data)
    return FileRecord.of(root, path)


def check_tokenizer(tokenizer_json: bytes, spiece: Path) -> None:
    """The runtime tokenizes with `tokenizer.json` alone: prove it gives sentencepiece's own ids (transformers
    has silently built wrong vocabularies from spiece.model before)."""
    import sentencepiece as spm
    from k3trt.export.presets import CORPUS
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(tokenizer_json.decode())
    reference = spm.SentencePieceProcessor(model_file=str(spiece))
    for text in CORPUS.read_text().splitlines()[::23]:
        ids, expected = fast.encode(text, add_special_tokens=False).ids, reference.encode(text)
        if ids != expected:
            raise ModelSourceError(f"tokenizer.json and {str(spiece)!r} disagree on {text!r}: {ids[:8]}... vs "
                                   f"{expected[:8]}...", fix="re-save the tokenizer with "
                                   "`T5Tokenizer.from_pretrained(folder)` (not `T5Tokenizer(vocab_file=...)`)")


def write_side_files(source: ModelSource, manifest: Manifest) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tok_bytes = (Path(tmp) / "tokenizer.json").read_bytes()
    spiece = source.tokenizer_dir / "spiece.model"
    if spiece.is_file():
        check_tokenizer(tok_bytes, spiece)
    tok = _write_keyed(manifest.root, "tokenizer", "tokenizer", tok_bytes)
    manifest.data["tokenizer"] = {**tok.__dict__, "max_length": MAX_TEXT_LENGTH, "pad_id": tokenizer.pad_token_id}
    sched = json.dumps(source.config("scheduler"), indent=2, sort_keys=True).encode()
    manifest.data["scheduler"] = _write_keyed(manifest.root, "scheduler", "scheduler_config", sched).__dict__
    unet = source.config(next(f for f in source.folders() if f.startswith("unet")))
    manifest.data["pipeline"] = {
        "latent_channels": unet.get("in_channels", 4), "movq_scale_factor": LATENT_FACTOR,
        "context_dim": unet["encoder_hid_dim"], "max_text_length": MAX_TEXT_LENGTH,
        "reference": "diffusers.Kandinsky3Pipeline",
    }
    native = preset_native_size(source.root)
    if native:  # the default image size of `k3trt generate` on these artifacts
        manifest.data["pipeline"]["native_size"] = native


def preset_native_size(root: Path) -> int | None:
    """A preset's native image side (its k3trt_preset.json names it), None for other checkpoints."""
    from k3trt.export.presets import PRESETS

    try:
        name = json.loads((root / "k3trt_preset.json").read_text()).get("preset")
    except (OSError, ValueError, AttributeError):
        return None
    return PRESETS[name].native_size if name in PRESETS else None


def export_key(source_hash: str, opset: int, external_threshold: int) -> str:
    return sha256_json({"source": source_hash, "opset": opset, "external_threshold": external_threshold,
                        "k3trt": PACKAGE_VERSION})


def _current(manifest: Manifest, name: str, key: str) -> bool:
    if not manifest.has_onnx(name):
        return False
    record = manifest.onnx(name)
    if record.export_key != key:
        return False
    try:
        manifest.verify_onnx(record)
    except Exception:
        return False
    return True


def _content_folder(root: Path, name: str, staging: Path, graph: Path, external: Path | None) -> Path:
    """Move the staged export to a folder named after its content. An identical earlier export is reused
    as is; nothing the current manifest points to is ever replaced, so the manifest stays the commit point."""
    digest = sha256_json([sha256_file(graph), sha256_file(external) if external else None])[:12]
    final = root / name / f"fp32-{digest}"
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
    return final


def _export_regular(source: ModelSource, spec, info: dict, staging: Path, *, opset: int, external_threshold: int,
                    log):
    """(graph, external data, validation, failures): trace the loaded fp32 module, validate against it."""
    module = source.load(spec.folder)
    trace_inputs = spec.make_inputs(spec.trace, info, torch.Generator().manual_seed(0))
    log(f"  {spec.name}: tracing to ONNX (opset {opset}) ...")
    graph, external = export_onnx(spec, module, trace_inputs, staging, opset=opset,
                                  external_threshold=external_threshold)
    log(f"  {spec.name}: validating against torch on ONNX Runtime at {len(spec.validate)} new shapes ...")
    validation, failures = validate_component(spec, module, graph, info)
    del module
    gc.collect()
    return graph, external, validation, failures


def export_component(source: ModelSource, root: Path, name: str, *, source_hash: str, key: str, opset: int,
                     external_threshold: int, log, streamed: bool = False) -> OnnxRecord:
    """Export, validate and place one component; returns its record (the caller commits the manifest).
    `streamed`: the bounded-memory path (export/low_memory.py), for the components that have one."""
    spec = component_spec(name)
    staging = staging_dir(root, name)  # `.staging-NAME-PID-*`: removed by the next writer if this one dies
    try:
        t0 = time.perf_counter()
        info = model_info(source, spec)
        if streamed:
            graph, external, validation, failures = export_streamed_files(source, spec, info, staging, opset=opset,
                                                                          log=log)
        else:
            graph, external, validation, failures = _export_regular(
                source, spec, info, staging, opset=opset, external_threshold=external_threshold, log=log)
        if failures:
            raise ValidationError(failures, fix="report this with the model config; the previous artifacts "
                                                "were left untouched")
        final = _content_folder(root, name, staging, graph, external)
        record = OnnxRecord(
            component=name, variant="fp32", graph=FileRecord.of(root, final / graph.name),
            external_data=FileRecord.of(root, final / external.name) if external else None, opset=opset,
            inputs=spec.resolved(spec.inputs, info), outputs=spec.resolved(spec.outputs, info),
            axes=dict(spec.axes), source_hash=source_hash, export_key=key, versions=library_versions(),
            validation=validation,
            extra={"multiples": spec.multiples, "seconds": round(time.perf_counter() - t0, 2),
                   "source_folder": spec.folder, "model_info": info, **({"streamed": True} if streamed else {})},
        )
        worst = max(c["rel_l2"] for c in validation["cases"])
        log(f"  {name}: ok (worst rel_l2 {worst:.2e}, {record.extra['seconds']} s)")
        return record
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def drop_stale_variants(manifest: Manifest, name: str, log) -> None:
    """Variants derived from an earlier fp32 export of `name` (fp16/bf16 from conversion, int8 from
    calibration) no longer match it."""
    variants = manifest.data["onnx"].get(name, {})
    fp32_key = variants["fp32"]["export_key"]
    for variant in [v for v, rec in variants.items() if v != "fp32"]:
        derived_from = variants[variant].get("extra", {}).get("fp32_export_key")
        if derived_from and derived_from != fp32_key:
            del variants[variant]
            remake = "`k3trt calibrate`" if variant in ("int8", "fp8") else f"`k3trt export --precision {variant}`"
            log(f"  {name}: dropped the stale {variant} variant (re-run {remake} to rebuild it)")


def collect_garbage(manifest: Manifest) -> None:
    """Remove component folders and side files the manifest no longer references (superseded exports,
    leftovers of a failed run)."""
    referenced = manifest.referenced_paths()
    keep = {Path(p).parent for p in referenced}
    for name in SPECS:
        folder = manifest.root / name
        if folder.is_dir():
            for child in folder.iterdir():
                if child.is_dir() and child.relative_to(manifest.root) not in keep:
                    shutil.rmtree(child, ignore_errors=True)
    for side in ("tokenizer", "scheduler"):
        folder = manifest.root / side
        if folder.is_dir():
            for child in folder.glob("*.json"):
                if str(child.relative_to(manifest.root)) not in referenced:
                    child.unlink(missing_ok=True)


def export_artifacts(source: ModelSource, out: str | os.PathLike, *, components=None,
                     opset: int = DEFAULT_OPSET, external_threshold: int = PROTOBUF_LIMIT,
                     force: bool = False, precisions=(), low_memory: bool = False, log=print) -> dict:
    """Export `components` of `source` into the artifact directory `out`. Returns a summary dict.

    `precisions` (fp16, bf16) adds converted variants of every component (fp32 is always exported).
    `low_memory`: the U-Net and text encoder are streamed, never loaded (export/low_memory.py).
    All-or-nothing: the new manifest is written once, after every component has exported and validated."""
    from k3trt.export.precision_variants import check_variant_allowed

    components = check_export_request(out, components=components, opset=opset,
                                      external_threshold=external_threshold, source_root=source.root)
    components = resolve_components(source, components, low_memory=low_memory, precisions=precisions, log=log)
    for name in components:
        for precision in precisions:
            check_variant_allowed(name, precision)
    keys = export_keys(source, components, opset, external_threshold)
    if low_memory:  # before the output folder is even created
        check_disk_for_streamed(source, out, [n for n in components if force or not _key_matches(out, n, keys[n][1])])
    out = claim_output_dir(out, "artifacts", inputs=(source.root,))
    with artifact_lock(out, log):
        return _export_locked(source, out, components=components, keys=keys, opset=opset,
                              external_threshold=external_threshold, force=force, precisions=precisions,
                              low_memory=low_memory, log=log)


def resolve_components(source, components, *, low_memory: bool, precisions=(), log=print) -> list[str]:
    """`components` (None: every component the model has), checked against `low_memory`'s refusals."""
    if low_memory:
        check_low_memory_source(source)
        check_low_memory_precisions(precisions)
        return low_memory_components(source, components, log)
    return default_components(source) if components is None else components


def export_keys(source: ModelSource, components, opset: int, external_threshold: int) -> dict[str, tuple[str, str]]:
    """name -> (source hash, export key). The key names what is exported (source, opset, threshold, version),
    not how: a streamed and a regular export of the same source validate against the same fp32 computation,
    so either one is up to date for the other (a later run without --low-memory does not re-trace)."""
    keys = {}
    for name in components:
        source_hash = source.source_hash(component_spec(name).folder)
        keys[name] = (source_hash, export_key(source_hash, opset, external_threshold))
    return keys


def _key_matches(out, name: str, key: str) -> bool:
    """The existing manifest's record of `name` has `key` (files not hashed: a cheap estimate before the lock)."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return False
    try:
        manifest = Manifest.load(out)
        return manifest.has_onnx(name) and manifest.onnx(name).export_key == key
    except (K3TRTError, OSError, ValueError, KeyError, TypeError):  # unreadable: the locked run decides
        return False


def check_export_request(out, *, components, opset: int, external_threshold: int, source_root=None) -> list[str]:
    """Every export argument, before any model is loaded: the output folder (new, empty or k3trt's
    artifacts, never the model folder), the components, the opset and the external-data threshold.
    `components` None means every component the model has (resolved by the caller once the model is open)."""

    check_output_dir(out, "artifacts", inputs=(source_root,) if source_root else ())
    if components is None:
        pass
    elif isinstance(components, str):
        components = parse_list("--components", components, list(SPECS))
    elif not isinstance(components, (list, tuple)) or not components:
        raise InvalidArgumentError(f"components={components!r}", accepted=f"a non-empty list of {', '.join(SPECS)}")
    else:
        components = parse_list("--components", ",".join(str(c) for c in components), list(SPECS))
    if isinstance(opset, int) and not isinstance(opset, bool) and opset < MIN_OPSET:
        raise InvalidArgumentError(f"opset {opset} is too old", accepted=f">= {MIN_OPSET}",
                                   fix=f"use --opset {DEFAULT_OPSET} (the default)")
    check_int("opset", opset, MIN_OPSET, MAX_OPSET, f"use --opset {DEFAULT_OPSET} (the default)")
    check_int("external_threshold", external_threshold, 0, PROTOBUF_LIMIT,
              "bytes past which weights go to external data; at most the 2 GB protobuf limit")
    return components


def _export_locked(source: ModelSource, out: Path, *, components, keys: dict, opset: int, external_threshold: int,
                   force: bool, precisions, low_memory: bool, log) -> dict:
    from k3trt.export.precision_variants import is_current, make_variant

    current = Manifest.load_or_new(out)
    staged = Manifest(out, copy.deepcopy(current.data))
    staged.data["source"] = {"label": source.label, "path": str(source.root), "variant": source.variant}
    write_side_files(source, staged)
    summary = {"exported": [], "up_to_date": []}
    for name in components:
        source_hash, key = keys[name]
        if not force and _current(current, name, key):
            log(f"  {name}: up to date (inputs unchanged), skipped")
            summary["up_to_date"].append(name)
            continue
        staged.put_onnx(export_component(source, out, name, source_hash=source_hash, key=key, opset=opset,
                                         external_threshold=external_threshold, log=log,
                                         streamed=low_memory and name in STREAMED))
        drop_stale_variants(staged, name, log)
        summary["exported"].append(name)
    summary["variants"] = []
    for name in components:
        for precision in precisions:
            if not is_current(staged, name, precision):
                info = model_info(source, component_spec(name))
                staged.put_onnx(make_variant(staged, name, precision, info, log=log))
                summary["variants"].append(f"{name}.{precision}")
    if staged.data != current.data:
        save_manifest(staged)  # the commit point
    collect_garbage(staged)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return summary

"""`k3trt export --weights-from DIR --graphs-from ART --out NEW`: a checkpoint of the same configuration
(DreamBooth, a merged LoRA, any same-architecture fine-tune) as a new artifact, without re-tracing.

Each component's traced and cleaned graph is taken from ART as it is, and only its weights are rewritten,
through the weight map the export recorded (export/weight_map.py): every parameter goes into its initializer
(transposed where the export transposed it). Refused before anything is written, with every offending name:
another configuration, a parameter the graph lacks, and a changed weight that the export folded into a computed
constant or stored in one initializer with another (those need a full `k3trt export`). The new graph is then
validated against the new torch module exactly as a full export is, and committed the same way (content
folders, one manifest write). Tracing, folding and shape inference, the bulk of an export, are skipped.
"""
from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import onnx
from onnx import numpy_helper

from k3trt.contract.errors import ArtifactError, ModelSourceError, ValidationError
from k3trt.contract.manifest import FileRecord, Manifest, OnnxRecord
from k3trt.export.components import SPECS, component_spec, model_info
from k3trt.export.onnx_export import PROTOBUF_LIMIT, save_onnx
from k3trt.export.validate import validate_component
from k3trt.export.weight_map import WEIGHT_MAP_NAME, initializer_values, module_config, wrapper_tensors
from k3trt.writing.atomic import save_manifest
from k3trt.writing.locking import artifact_lock, staging_dir
from k3trt.writing.ownership import check_output_dir, claim_output_dir

SHOW = 10


def _listing(items) -> str:
    items = list(items)
    return "; ".join(items[:SHOW]) + (f" ... and {len(items) - SHOW} more" if len(items) > SHOW else "")


def check_same_config(component: str, recorded: dict, new: dict, model_dir) -> None:
    recorded, new = (json.loads(json.dumps(c, sort_keys=True, default=str)) for c in (recorded, new))  # as stored
    differ = sorted(k for k in set(recorded) | set(new) if recorded.get(k) != new.get(k))
    if differ:
        raise ModelSourceError(f"{model_dir}'s {component} has another configuration than the traced graph: "
                               + _listing(f"{k}: {recorded.get(k)!r} -> {new.get(k)!r}" for k in differ),
                               fix="run a full `k3trt export --model DIR` for a different architecture")


def load_weight_map(manifest: Manifest, component: str) -> dict:
    """The fp32 export's weight map (sha256-verified); a typed error for artifacts exported before maps."""
    entry = manifest.onnx(component).extra.get("weight_map")
    if not entry:
        raise ArtifactError(f"{manifest.root}'s {component} export has no weight map",
                            fix="re-export it with this version (`k3trt export --force`)")
    manifest.verify([FileRecord(**entry)])
    return json.loads(manifest.path(entry["path"]).read_text())


def check_checkpoint_config(component: str, weight_map: dict, source) -> None:
    """The checkpoint's config.json against the traced module's config, on the keys both name (config.json
    may leave defaults out): before anything is loaded or written."""
    config = {k: v for k, v in source.config(SPECS[component].folder).items()
              if not k.startswith("_") and k != "transformers_version"}
    recorded = weight_map.get("config", {})
    check_same_config(component, {k: v for k, v in recorded.items() if k in config},
                      {k: v for k, v in config.items() if k in recorded}, source.root)


def rewrite_weights(graph: Path, values: dict, out: Path, *, external: bool) -> tuple[Path, Path | None]:
    """The graph at `graph` with these initializers replaced, saved as `out` (+ external data if `external`)."""
    model = onnx.load(str(graph), load_external_data=True)
    for tensor in model.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    data = save_onnx(model, out, external_threshold=0 if external else PROTOBUF_LIMIT)
    return out, data


def _rewritten_component(old: Manifest, source, name: str, staging: Path, log) -> tuple[OnnxRecord, list]:
    """Rewrite one component's weights from `source` into `staging`, validated; (record fields, failures)."""
    record, spec = old.onnx(name), component_spec(name)
    weight_map_file, weight_map = record.extra["weight_map"], load_weight_map(old, name)
    old.verify_onnx(record)
    module = source.load(spec.folder)
    check_same_config(name, weight_map.get("config", {}), module_config(module), source.root)
    tensors = list(module.named_parameters(remove_duplicate=False)) + wrapper_tensors(spec.wrapper(module))
    values, problems = initializer_values(weight_map, tensors)
    if problems:
        raise ModelSourceError(f"{source.root}'s {name} weights do not fit the traced graph: {_listing(problems)}",
                               fix="run a full `k3trt export --model DIR` for this checkpoint")
    log(f"  {name}: rewriting {len(values)} initializers of the traced graph ...")
    graph, external = rewrite_weights(old.path(record.graph.path), values, staging / "model.onnx",
                                      external=record.external_data is not None)
    del values
    shutil.copyfile(old.path(weight_map_file["path"]), staging / WEIGHT_MAP_NAME)  # same graph, same map
    info = model_info(source, spec)
    log(f"  {name}: validating against torch on ONNX Runtime at {len(spec.validate)} shapes ...")
    validation, failures = validate_component(spec, module, graph, info)
    del module
    gc.collect()
    return (graph, external, validation, info), failures


def export_weights_from(model_dir, graphs_from, out, *, components=None, log=print) -> dict:
    """A new artifact directory `out` for the checkpoint `model_dir`, reusing the graphs in `graphs_from`."""
    from k3trt.export.sources import open_model_dir
    from k3trt.export.writer import _content_folder, export_key, library_versions, placed_weight_map, write_side_files

    old = Manifest.load(graphs_from)
    check_output_dir(out, "artifacts", inputs=(Path(model_dir), old.root))
    source = open_model_dir(model_dir)
    names = components or [n for n in SPECS if old.has_onnx(n) and source.has(SPECS[n].folder)]
    for name in names:  # every refusal before the output folder is created
        check_checkpoint_config(name, load_weight_map(old, name), source)
    out = claim_output_dir(out, "artifacts", inputs=(source.root, old.root))
    with artifact_lock(out, log):
        staged = Manifest.load_or_new(out)
        staged.data["source"] = {"label": source.label, "path": str(source.root), "variant": source.variant,
                                 "graphs_from": str(old.root)}
        write_side_files(source, staged)
        for name in names:
            t0, record = time.perf_counter(), old.onnx(name)
            staging = staging_dir(out, name)
            try:
                (graph, external, validation, info), failures = _rewritten_component(old, source, name, staging, log)
                if failures:
                    raise ValidationError(failures, fix="the new artifacts were not committed")
                final = _content_folder(out, name, staging, graph, external)
                source_hash = source.source_hash(SPECS[name].folder)
                threshold = 0 if record.external_data else PROTOBUF_LIMIT
                staged.put_onnx(OnnxRecord(
                    component=name, variant="fp32", graph=FileRecord.of(out, final / graph.name),
                    external_data=FileRecord.of(out, final / external.name) if external else None,
                    opset=record.opset, inputs=record.inputs, outputs=record.outputs, axes=dict(record.axes),
                    source_hash=source_hash, export_key=export_key(source_hash, record.opset, threshold),
                    versions=library_versions(), validation=validation,
                    extra={**{k: v for k, v in record.extra.items() if k in ("multiples", "source_folder")},
                           "model_info": info, "seconds": round(time.perf_counter() - t0, 2),
                           "graph_from": {"artifacts": str(old.root), "graph_sha256": record.graph.sha256},
                           "weight_map": placed_weight_map(out, staging, final).__dict__}))
                log(f"  {name}: ok ({staged.data['onnx'][name]['fp32']['extra']['seconds']} s)")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        save_manifest(staged)
    return {"rewritten": names}

"""`k3trt refit`: new weights into refittable engines without rebuilding them.

The new model folder's component is exported to ONNX in a temporary folder (same exporter, same opset) and,
for an engine parsed from an fp16/bf16 variant, converted the same way (same converter, same fp32 nodes), so its
initializers have the names and types of the ONNX the engine was parsed from (the parser names refittable
weights after ONNX initializers; the converter may duplicate or retype them). The layouts are compared, and the
names matched, before anything touches the engine; a mismatch fails with the full list, and renamed weights (PEFT
wraps layers as `<layer>.base_layer`) get a hint. The weights go in through TensorRT's ONNX-parser refitter
(`OnnxParserRefitter.refit_from_file`), or by name with `set_named_weights` where it is missing.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

from k3trt.contract.engine_compat import check_engine_compatible
from k3trt.contract.errors import ArtifactError
from k3trt.contract.manifest import FileRecord, Manifest, sha256_file, sha256_json
from k3trt.writing.atomic import atomic_write_bytes, save_manifest

SHOW = 12  # names listed in an error before "... and N more"


# ----------------------------------------------------------------------------------------- matching (pure)
@dataclasses.dataclass(frozen=True)
class WeightMatch:
    matched: tuple[str, ...]
    missing: tuple[str, ...]  # the engine refits them; the new ONNX lacks them
    extra: tuple[str, ...]  # in the new ONNX, not refittable in the engine (constants folded, shape data)
    size_mismatch: tuple[tuple[str, int, int], ...]  # (name, engine count, new count)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.size_mismatch


def _count(shape_or_count) -> int:
    if isinstance(shape_or_count, int):
        return shape_or_count
    return int(math.prod(int(d) for d in shape_or_count))


def match_weights(engine: Mapping[str, object], onnx: Mapping[str, object]) -> WeightMatch:
    """Match engine weight names to ONNX initializer names; values are element counts or shapes."""
    matched = tuple(sorted(n for n in engine if n in onnx))
    sizes = tuple((n, _count(engine[n]), _count(onnx[n])) for n in matched if _count(engine[n]) != _count(onnx[n]))
    return WeightMatch(matched, tuple(sorted(set(engine) - set(onnx))), tuple(sorted(set(onnx) - set(engine))),
                       sizes)


def suggest_renames(missing: Iterable[str], extra: Iterable[str]) -> dict[str, str]:
    """missing engine name -> new name that differs only by PEFT's `.base_layer` wrapping."""
    extra = {n.replace(".base_layer", ""): n for n in extra if ".base_layer" in n}
    return {n: extra[n] for n in missing if n in extra}


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:SHOW])
    return shown + (f" ... and {len(names) - SHOW} more" if len(names) > SHOW else "")


def raise_on_mismatch(match: WeightMatch, engine_name: str, model_dir: str) -> None:
    if match.ok:
        return
    parts = []
    if match.missing:
        parts.append(f"{len(match.missing)} engine weight(s) have no initializer of that name in the new export: "
                     f"{_listing(match.missing)}")
    if match.size_mismatch:
        parts.append("size differs: " + _listing(f"{n} ({a} vs {b})" for n, a, b in match.size_mismatch))
    renames = suggest_renames(match.missing, match.extra)
    peft = renames or any("lora_" in n or ".base_layer" in n for n in match.extra)
    hint = ("the new weights look PEFT/LoRA-wrapped (`.base_layer`, `lora_A/B`): merge the adapter into the base "
            "weights (diffusers `fuse_lora()` + `unload_lora_weights()`, or PEFT `merge_and_unload()`) and save "
            "plain weights before refitting" if peft else
            "refit needs the same architecture and config as the engine's source; rebuild with `k3trt export` + "
            "`k3trt build` for a different model")
    raise ArtifactError(f"cannot refit {engine_name!r} from {model_dir!r}: " + "; ".join(parts), fix=hint)


def refittable_engines(engines: Mapping[str, Mapping], components: Iterable[str] | None,
                       artifacts: str = "ART") -> list[tuple[str, Mapping]]:
    wanted = set(components) if components else None
    picked = [(n, e) for n, e in sorted(engines.items()) if wanted is None or e.get("component") in wanted]
    usable = [(n, e) for n, e in picked if e.get("flags", {}).get("refittable")]
    quantized = [n for n, e in usable if e.get("variant", "fp32") in ("int8", "fp8")]
    if quantized:
        raise ArtifactError(f"engines {quantized} come from a quantized Q/DQ graph: their scales were calibrated "
                            "for the old weights", fix="re-run `k3trt calibrate` and `k3trt build` for new weights")
    if not usable:
        have = ", ".join(n for n, _ in picked) or "none"
        raise ArtifactError(f"no refittable engine in {artifacts} for {sorted(wanted) if wanted else 'any component'}",
                            accepted=f"engines built with --refittable (found: {have})",
                            fix=f"k3trt build --artifacts {artifacts} --refittable ...")
    return usable


# ----------------------------------------------------------------------------------------- TensorRT side
def initializer_layout(model) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (ONNX element type name, shape) of every initializer: what an engine's weights are named after."""
    import onnx

    return {t.name: (onnx.TensorProto.DataType.Name(t.data_type), tuple(t.dims)) for t in model.graph.initializer}


def check_same_layout(engine_source, new_variant, engine_name: str, model_dir: str) -> None:
    """The new weights' variant must name, type and shape its initializers exactly as the variant the engine was
    parsed from (same converter, same fp32 islands); otherwise list the differences before touching the engine."""
    old, new = initializer_layout(engine_source), initializer_layout(new_variant)
    differ = [f"{n} ({old[n][0]}{list(old[n][1])} vs {new[n][0]}{list(new[n][1])})"
              for n in sorted(set(old) & set(new)) if old[n] != new[n]]
    missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    if differ or missing:
        parts = ([f"{len(missing)} initializer(s) of the engine's ONNX are not in the new one: {_listing(missing)}"]
                 if missing else []) + ([f"type/shape differs: {_listing(differ)}"] if differ else [])
        if extra:
            parts.append(f"new names: {_listing(extra)}")
        raise ArtifactError(f"cannot refit {engine_name!r} from {model_dir!r}: " + "; ".join(parts),
                            fix="refit needs the same architecture, config and variant precision; rebuild with "
                                "`k3trt export` + `k3trt build` for a different model")


def host_tensor(array, dtype=None):
    """A numpy initializer (fp32, fp16, or ml_dtypes bfloat16) as a contiguous CPU torch tensor, bit-exact;
    cast to `dtype` (a torch dtype) if given."""
    import numpy as np
    import torch

    if array.dtype.name == "bfloat16":  # numpy has no bf16: reinterpret the bits
        tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return (tensor if dtype is None else tensor.to(dtype)).contiguous()


def export_weights(source, component: str, out_dir: Path, opset: int, *, variant: str = "fp32",
                   keep_fp32: tuple[str, ...] = ()) -> tuple[dict, str, Path]:
    """Export `component` of `source` to ONNX in `out_dir`, converted to `variant` with the same fp32 nodes as
    the engine's source variant (so initializers get the same names and types). Returns (initializer name ->
    array, graph sha256, graph path)."""
    import onnx
    import torch
    from k3trt.export.components import SPECS, model_info
    from k3trt.export.onnx_export import export_onnx, save_onnx
    from onnx import numpy_helper

    spec = SPECS[component]
    module = source.load(spec.folder)
    inputs = spec.make_inputs(spec.trace, model_info(source, spec), torch.Generator().manual_seed(0))
    graph, _ = export_onnx(spec, module, inputs, out_dir, opset=opset)
    if variant != "fp32":
        from k3trt.export.precision_variants import convert

        converted = convert(graph, variant, keep_fp32)
        graph = out_dir / f"model.{variant}.onnx"
        save_onnx(converted, graph)
    model = onnx.load(str(graph), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}, sha256_file(graph), graph


def _refit_from_onnx(trt, refitter, onnx_path: Path | None) -> bool:
    """TensorRT's ONNX-parser refitter: it maps the ONNX's initializers to the engine's weights itself."""
    if onnx_path is None or not hasattr(trt, "OnnxParserRefitter"):
        return False
    from k3trt.runtime.tensorrt_env import trt_logger

    return bool(trt.OnnxParserRefitter(refitter, trt_logger()).refit_from_file(str(onnx_path)))


def refit_engine_bytes(data: bytes, weights: Mapping, engine_name: str, model_dir: str,
                       onnx_path: Path | None = None) -> tuple[bytes, int]:
    """Deserialize, then refit from the new ONNX with the parser refitter (or set every weight by name),
    refit, serialize. Returns (bytes, weights set). NOT VERIFIED ON A GPU here."""
    from k3trt.runtime.tensorrt_env import require_tensorrt, torch_dtype, trt_logger

    trt = require_tensorrt()
    runtime = trt.Runtime(trt_logger())  # kept alive while the engine is in use
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ArtifactError(f"TensorRT could not deserialize {engine_name!r}", fix="rebuild it with k3trt build")
    refitter = trt.Refitter(engine, trt_logger())
    names = list(refitter.get_all_weights())
    prototype = refitter.get_weights_prototype  # type + count the engine expects
    protos = {n: (prototype(n).dtype, int(prototype(n).size)) for n in names}
    match = match_weights({n: c for n, (_, c) in protos.items()}, {n: int(a.size) for n, a in weights.items()})
    raise_on_mismatch(match, engine_name, model_dir)
    alive = []  # host copies must outlive refit_cuda_engine
    if not _refit_from_onnx(trt, refitter, onnx_path):
        for name in match.matched:
            dtype = protos[name][0]
            tensor = host_tensor(weights[name], torch_dtype(dtype))
            alive.append(tensor)
            if not refitter.set_named_weights(name, trt.Weights(dtype, tensor.data_ptr(), tensor.numel())):
                raise ArtifactError(f"TensorRT rejected new weights {name!r} for {engine_name!r}",
                                    fix="rebuild the engine with k3trt build --refittable")
    missing = refitter.get_missing_weights()
    if missing or not refitter.refit_cuda_engine():
        raise ArtifactError(f"refit of {engine_name!r} failed; missing weights: {_listing(missing) or 'none'}",
                            fix="rebuild the engine with k3trt build")
    return bytes(engine.serialize()), len(match.matched)


def refit_artifacts(artifacts: str, model_dir: str, *, components: Iterable[str] | None = None,
                    variant: str | None = None, log: Callable[[str], None] = print) -> list[str]:
    import onnx
    from k3trt.engines.build import remove_superseded
    from k3trt.export.components import SPECS
    from k3trt.export.sources import open_model_dir
    from k3trt.runtime.tensorrt_env import current_env

    env = current_env()  # TensorRT and a GPU first: nothing else is worth doing without them
    manifest = Manifest.load(artifacts)
    targets = refittable_engines(manifest.data.get("engines", {}), components, str(artifacts))
    source = open_model_dir(model_dir, variant=variant)
    done = []
    with tempfile.TemporaryDirectory(dir=manifest.root, prefix=".refit-") as tmp:
        for component, variant in dict.fromkeys((e["component"], e.get("variant", "fp32")) for _, e in targets):
            record = manifest.onnx(component, variant)
            log(f"  {component}: exporting {model_dir} to {variant} ONNX (opset {record.opset}) for its weights ...")
            weights, onnx_sha, onnx_path = export_weights(
                source, component, Path(tmp) / f"{component}-{variant}", manifest.onnx(component).opset,
                variant=variant, keep_fp32=tuple(record.extra.get("fp32_nodes", ())))
            check_same_layout(onnx.load(str(manifest.path(record.graph.path)), load_external_data=False),
                              onnx.load(str(onnx_path), load_external_data=False), component, str(model_dir))
            for name, entry in ((n, e) for n, e in targets
                                if e["component"] == component and e.get("variant", "fp32") == variant):
                check_engine_compatible(name, entry, env, onnx_sha256=None, artifacts=str(artifacts))
                old = entry["file"]["path"]
                data, count = refit_engine_bytes(manifest.path(old).read_bytes(), weights, name, str(model_dir),
                                                 onnx_path)
                path = manifest.root / f"engines/{name}-refit-{sha256_json(onnx_sha + old)[:12]}.plan"
                atomic_write_bytes(path, data)
                folder = SPECS[component].folder
                manifest.data["engines"][name] = {
                    **entry, "file": FileRecord.of(manifest.root, path).__dict__,
                    "refit": {"source": str(model_dir), "source_hash": source.source_hash(folder),
                              "onnx_sha256": onnx_sha, "weights": count,
                              "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
                save_manifest(manifest)
                remove_superseded(manifest, [old])
                log(f"  {name}: refit {count} weights -> {path.relative_to(manifest.root)}")
                done.append(name)
    return done

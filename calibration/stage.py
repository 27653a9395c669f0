"""The calibration stage: trajectories -> ranges -> Q/DQ U-Net -> quality -> manifest, atomically.

Any U-Net whose card allows int8 (`targets.py`): the base U-Net on text-to-image trajectories, the inpainting
U-Net on masked inpainting trajectories, the Flash U-Net on Flash trajectories; the same steps and report.
The int8 model is written to a staging folder, moved to a content-keyed folder (`<component>/int8-<key12>/`)
that nothing references yet, measured, and only then recorded: `save_manifest` is the commit point, and any
failure before it removes the new folder and leaves the previous artifacts (and manifest) as they were.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from k3trt.calibration import collect, quality, quantize
from k3trt.calibration.config import (
    CALIBRATION_VERSION,
    DEFAULT_EXCLUSIONS,
    QuantConfig,
    TrajectoryConfig,
)
from k3trt.calibration.prompts import calibration_prompts, heldout_prompts
from k3trt.calibration.report import unet_label
from k3trt.calibration.sensitivity import SensitivityConfig
from k3trt.calibration.targets import Target, target_of
from k3trt.contract.errors import ArtifactError, InvalidArgumentError
from k3trt.contract.manifest import FileRecord, Manifest, OnnxRecord, sha256_json
from k3trt.writing.atomic import make_temp_dir, save_manifest
from k3trt.writing.locking import staging_dir
from k3trt.writing.ownership import (check_output_dir, install_dir, is_part, mark_part, owner_kind,
                                     remove_unreferenced)

PROTOBUF_LIMIT = 2 * 1024**3
KANDINSKY3_NATIVE_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class CalibrationRequest:
    artifacts: Path
    trajectory: TrajectoryConfig
    quant: QuantConfig = QuantConfig()
    prompts_file: Path | None = None
    num_prompts: int | None = 32  # NVIDIA's diffusion int8 recipe calibrates on ~32 prompts
    heldout: int = 4  # held-out prompts for quality (per-timestep and end-to-end)
    sensitivity: SensitivityConfig | None = None
    out: Path | None = None
    report_dir: Path | None = None
    threads: int | None = None
    external_threshold: int = PROTOBUF_LIMIT
    component: str = "unet"  # which U-Net: any card with an int8 variant (`targets.quantizable`)
    float_parts: str = "fp16"  # what TensorRT 11 runs the non-quantized layers in; fp32: as quantized (faster)
    collector: str | None = None  # torch (CUDA when present, else CPU) or ort; None: `default_collector()`
    model_dir: Path | None = None  # the torch collector's model folder (default: the manifest's source path)

    @property
    def target(self) -> Target:
        return target_of(self.component)

    @property
    def producer(self) -> collect.Producer:
        """Who runs the trajectories and the range pass: the collector, on its device."""
        from k3trt.calibration.torch_collector import check_collector, collector_device, default_collector

        name = check_collector(self.collector or default_collector())
        return collect.Producer(name, collector_device(name), str(self.model_dir) if self.model_dir else None)


def native_size(manifest: Manifest, model_dir: str | Path | None = None) -> int:
    """The preset's native image side (from the model folder's k3trt_preset.json), else Kandinsky 3's 1024."""
    import json

    from k3trt.export.presets import PRESETS

    folder = model_dir or manifest.data.get("source", {}).get("path")
    stamp = Path(folder) / "k3trt_preset.json" if folder else None
    if stamp is not None and stamp.is_file():
        name = json.loads(stamp.read_text()).get("preset")
        if name in PRESETS:
            return PRESETS[name].native_size
    return KANDINSKY3_NATIVE_SIZE


def prepare_root(artifacts: Path, out: Path | None, log, component: str = "unet") -> Path:
    """The directory to write: ART itself, or a fresh copy of it at --out (copied atomically)."""
    Manifest.load(artifacts).onnx(component)  # a typed error now if ART is not an artifact directory with it
    if out is None or out.resolve() == artifacts.resolve():
        return artifacts
    check_output_dir(out, "artifacts", name="--out", inputs=(artifacts,))  # new, empty, or k3trt's artifacts
    if out.exists() and any(out.iterdir()):
        mine = Manifest.load(out)  # an earlier `--out` of the same artifacts may be continued
        if mine.onnx(component).export_key != Manifest.load(artifacts).onnx(component).export_key:
            raise InvalidArgumentError(f"--out {str(out)!r} holds other artifacts",
                                       accepted="a new or empty folder, or an earlier --out of the same ART",
                                       fix="choose another --out folder")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(out.parent, f".{out.name}.copy-")
    try:
        shutil.copytree(artifacts, staging / "art", ignore=shutil.ignore_patterns(".staging-*", ".calib-*", ".k3trt.lock"))
        install_dir(staging / "art", out, "artifacts")  # onto a missing or empty folder: nothing is deleted
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"copied {artifacts} -> {out}")
    return out


def int8_key(fp32: OnnxRecord, ranges: Path, config: QuantConfig, excluded: list[str], threshold: int,
             float_parts: str = "fp16") -> str:
    return sha256_json({"fp32": fp32.export_key, "ranges": ranges.name, "quant": config.as_dict(),
                        "float_parts": float_parts,
                        "excluded": excluded, "options": quantize.EXTRA_OPTIONS, "format": quantize.QDQ_FORMAT,
                        "threshold": threshold, "version": CALIBRATION_VERSION, "ort": quantize._ort_version()})


def build_int8(manifest: Manifest, fp32: OnnxRecord, ranges: Path, excluded: list[str], request, key: str,
               log) -> tuple[Path, bool]:
    """The content-keyed int8 folder, quantized through a staging folder; (folder, created_now)."""
    folder = manifest.root / fp32.component / f"int8-{key[:12]}"
    if manifest.has_onnx(fp32.component, "int8") and manifest.onnx(fp32.component, "int8").export_key == key:
        try:
            manifest.verify_onnx(manifest.onnx(fp32.component, "int8"))
            log(f"int8 {unet_label(fp32.component)} up to date ({folder.relative_to(manifest.root)}, same ranges "
                "and exclusions)")
            return folder, False
        except ArtifactError:
            pass
    staging = staging_dir(manifest.root, f"{fp32.component}-int8")
    try:
        log(f"quantizing: {len(excluded)} Conv/MatMul/Gemm node(s) kept float ...")
        fp16 = request.float_parts == "fp16"
        quantize.quantize_model(manifest.path(fp32.graph.path), ranges, staging, excluded, request.quant,
                                external_threshold=request.external_threshold,
                                name=quantize.QDQ_FP32_NAME if fp16 else "model.onnx")
        if fp16:
            log("float parts to fp16 (TensorRT 11 runs the non-quantized layers in the ONNX's float type) ...")
            quantize.float_parts_to_fp16(staging / quantize.QDQ_FP32_NAME, staging / "model.onnx", fp32.component,
                                         external_threshold=request.external_threshold)
        if is_part(folder):
            shutil.rmtree(folder)  # unreferenced leftover of an interrupted run (k3trt's marker says so)
        mark_part(staging)  # quantize_model keeps only the model files: mark the folder again
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder, True


def make_record(root: Path, folder: Path, fp32: OnnxRecord, key: str, extra: dict) -> OnnxRecord:
    import onnx
    from k3trt.export.writer import library_versions

    graph = folder / "model.onnx"
    data = folder / "model.onnx.data"
    opset = next(o.version for o in onnx.load(str(graph), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    return OnnxRecord(component=fp32.component, variant="int8", graph=FileRecord.of(root, graph),
                      external_data=FileRecord.of(root, data) if data.is_file() else None, opset=opset,
                      inputs=fp32.inputs, outputs=fp32.outputs, axes=dict(fp32.axes), source_hash=fp32.source_hash,
                      export_key=key, versions=library_versions(), validation={},
                      extra={"multiples": fp32.extra.get("multiples", {}), **extra})


def float_parts(root: Path, folder: Path, component: str) -> dict:
    """Manifest facts of the int8 graph's float parts: fp16, with the card's fp32 nodes, from the fp32-float Q/DQ
    graph beside it (kept for the sensitivity analysis)."""
    import onnx
    from k3trt.export.precision_variants import CONVERTER

    if not (folder / quantize.QDQ_FP32_NAME).is_file():
        return {"float_type": "fp32"}
    names = {n.name for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    kept = [n for n in quantize.int8_fp32_nodes(folder / quantize.QDQ_FP32_NAME, component) if n in names]
    return {"float_type": "fp16", "fp32_nodes": kept, "converter": CONVERTER,
            "qdq_fp32_graph": str((folder / quantize.QDQ_FP32_NAME).relative_to(root))}


def qdq_fp32_graph(manifest: Manifest, record: OnnxRecord) -> Path:
    """The int8 U-Net as quantized, fp32 float parts: what the sensitivity analysis swaps layers in (node for
    node against the fp32 graph)."""
    path = record.extra.get("qdq_fp32_graph")
    return manifest.path(path) if path else manifest.path(record.graph.path)


def collect_all(manifest: Manifest, fp32: OnnxRecord, request: CalibrationRequest, log):
    """(calibration trajectories, held-out trajectories, activation ranges). With the torch collector on a fresh
    calibration set the ranges are folded as its trajectories are made (one U-Net pass, not two); otherwise they
    are computed from the cached trajectories afterwards."""
    heldout_set = heldout_prompts(request.heldout)
    calib_set = calibration_prompts(request.prompts_file, request.num_prompts)  # vs the whole held-out file
    options = dict(target=request.target, threads=request.threads, producer=request.producer, log=log)
    fold = folding_range_pass(manifest, fp32, calib_set, request)
    if fold is None:  # calibration prompts need only their U-Net calls: no MoVQ decode (the 1024² peak), no images
        calib = collect.collect(manifest, calib_set, request.trajectory, decode=False, **options)
        ranges = collect_ranges(manifest, fp32, calib, request, log)
    else:
        from k3trt.calibration.torch_collector import save_ranges

        log(f"activation ranges ({request.quant.calibrator.value}) folded into the trajectory pass of the torch "
            f"{fp32.component} on {request.producer.device}")
        with fold:
            calib = collect.collect(manifest, calib_set, request.trajectory, decode=False, range_pass=fold, **options)
            if fold.calls != calib.calls:
                raise ArtifactError(f"the trajectory pass folded {fold.calls} U-Net calls, expected {calib.calls}")
            ranges = save_ranges(fold, ranges_file(manifest, fp32, calib, request))
    heldout = collect.collect(manifest, heldout_set, request.trajectory, **options)
    return calib, heldout, ranges


def ranges_file(manifest: Manifest, fp32: OnnxRecord, calib, request: CalibrationRequest) -> Path:
    return quantize.ranges_path(manifest.root, calib, request.quant, fp32.export_key, request.producer.name)


def range_candidates(manifest: Manifest, fp32: OnnxRecord, request: CalibrationRequest) -> list:
    import onnx

    graph = onnx.load(str(manifest.path(fp32.graph.path)), load_external_data=False)
    return quantize.candidate_nodes(graph, request.quant.op_types)


def folding_range_pass(manifest: Manifest, fp32: OnnxRecord, calib_set, request: CalibrationRequest):
    """A torch RangePass to fold into the trajectory pass when the torch collector will run every calibration
    trajectory now and no ranges are cached; None otherwise (ranges from cache, or a replay over the cache)."""
    producer = request.producer
    if producer.name != "torch":
        return None
    calib = collect.planned(manifest, calib_set, request.trajectory, request.target, decode=False,
                            producer=producer.name)
    if ranges_file(manifest, fp32, calib, request).is_file() or any(f.path.is_file() for f in calib.files):
        return None
    from k3trt.calibration.torch_collector import open_range_pass

    return open_range_pass(manifest.path(fp32.graph.path), fp32.component, request.quant,
                           range_candidates(manifest, fp32, request), manifest=manifest,
                           model_dir=producer.model_dir, device=producer.device, threads=request.threads)


def collect_ranges(manifest: Manifest, fp32: OnnxRecord, calib, request: CalibrationRequest, log) -> Path:
    """Activation ranges of the calibration calls by the request's collector (cached per collector)."""
    producer, fp32_path = request.producer, manifest.path(fp32.graph.path)
    ranges = ranges_file(manifest, fp32, calib, request)
    if producer.name == "torch":
        from k3trt.calibration.torch_collector import compute_ranges

        return compute_ranges(fp32_path, calib, request.quant, ranges, range_candidates(manifest, fp32, request),
                              manifest=manifest, model_dir=producer.model_dir, device=producer.device,
                              threads=request.threads, log=log)
    return quantize.compute_ranges(fp32_path, calib, request.quant, ranges, external=fp32.external_data is not None,
                                   log=log)


def measure(manifest: Manifest, record: OnnxRecord, folder: Path, heldout, request, summary: dict, log) -> dict:
    """Quality on held-out prompts: per timestep (teacher-forced), end to end, optional sensitivity."""
    from k3trt.calibration.sensitivity import analyze

    log(f"quality on {len(heldout.files)} held-out prompts (fake-quant: session.disable_quant_qdq) ...")
    unet, rows = quality.unet_quality(folder / "model.onnx", heldout, threads=request.threads)
    e2e, images = quality.end_to_end(manifest, record, heldout, len(heldout.files), threads=request.threads)
    fused, _ = quality.end_to_end(manifest, record, heldout, len(heldout.files), threads=request.threads,
                                  fused=True)
    result = {"unet": unet, "per_timestep": rows, "end_to_end": e2e,
              "end_to_end_int8_kernels": fused, "images": images}
    if request.sensitivity is not None:
        # one quantized layer at a time against the fp32 graph: the fp32-float Q/DQ graph swaps node for node
        result["sensitivity"] = analyze(qdq_fp32_graph(manifest, record), manifest.path(record.extra["fp32_graph"]),
                                        summary["quantized_nodes"], heldout, rows, request.sensitivity,
                                        threads=request.threads, log=log)
    return result


def collect_garbage(manifest: Manifest, component: str, listed_before: set[str], log=None) -> None:
    """Remove the int8 folders this stage made that the manifest no longer references (marked as k3trt's, or
    listed by the manifest before this run); nothing else in the component's folder is touched."""
    remove_unreferenced(manifest.root, [component], keep=manifest.referenced_paths(), listed_before=listed_before,
                        log=log)


def exclusion_table(config: QuantConfig, matched: dict, excluded: list[str], model) -> dict:
    reasons = dict(DEFAULT_EXCLUSIONS)
    rows = [{"pattern": p, "nodes": len(matched[p]), "why": reasons.get(p, "--exclude")} for p in config.patterns()]
    return {"patterns": rows, "attention_matmuls": len(quantize.activation_matmuls(model, config.op_types)),
            "nodes": excluded}


def settings(request: CalibrationRequest, calib, heldout, fp32: OnnxRecord, ranges: Path) -> dict:
    prompts = {}
    for name, traj, source in (("calibration_prompts", calib, request.prompts_file), ("heldout_prompts", heldout,
                                                                                       None)):
        prompts[name] = {"count": len(traj.files), "source": str(source or "shipped"),
                         "digest": sha256_json([f.prompt for f in traj.files])}
    target = request.target
    return {"component": target.component, "task": target.task, "trajectory": request.trajectory.as_dict(),
            "quant": request.quant.as_dict(), **prompts,
            "fp32_export_key": fp32.export_key, "ranges_cache": ranges.name,
            "collector": {"name": request.producer.name, "device": request.producer.device},
            "library": f"onnxruntime {quantize._ort_version()} quantize_static (QDQ, per_channel, symmetric)",
            "extra_options": quantize.EXTRA_OPTIONS}


def calibrate(request: CalibrationRequest, log=print) -> dict:
    """Run the stage; returns the report payload. Nothing is committed unless every step succeeds."""
    if request.float_parts not in ("fp16", "fp32"):
        raise InvalidArgumentError(f"float parts {request.float_parts!r}", accepted="fp16 (what TensorRT 11 "
                                   "should run), fp32", fix="CalibrationRequest(float_parts='fp16')")
    target = request.target  # a typed error now for a component without an int8 variant
    check_before_copy(request)
    out = Path(request.out) if request.out else None
    new_out = out is not None and not out.exists()
    try:
        root = prepare_root(Path(request.artifacts), out, log, target.component)
        return _calibrate_in(root, request, log)
    except BaseException:
        if new_out and out.is_dir() and owner_kind(out) == "artifacts":
            shutil.rmtree(out, ignore_errors=True)  # the copy this run made: no litter from a failed run
        raise


def check_before_copy(request: CalibrationRequest) -> None:
    """What can be refused from ART itself, before `--out` is copied or anything collected: every --exclude
    pattern matches a node of the fp32 graph, and the prompt files are readable and disjoint."""
    import onnx

    source = Manifest.load(request.artifacts)
    fp32 = source.onnx(request.target.component)
    graph = onnx.load(str(source.path(fp32.graph.path)), load_external_data=False)
    quantize.resolve_exclusions(graph, request.quant)  # a typo in --exclude fails now
    calibration_prompts(request.prompts_file, request.num_prompts, heldout_prompts(request.heldout))


class PhaseClock:
    """Wall and CPU seconds (this process, all threads) of consecutive phases, for the report."""

    def __init__(self):
        self.laps: dict[str, dict] = {}
        self.load_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine inflates wall time
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall_s": round(wall - self._wall, 1), "cpu_s": round(cpu - self._cpu, 1)}
        self._wall, self._cpu = wall, cpu


def _calibrate_in(root: Path, request: CalibrationRequest, log) -> dict:
    import onnx

    from k3trt.calibration import report

    target = request.target
    manifest = Manifest.load(root)
    listed_before = manifest.referenced_paths()
    fp32 = manifest.onnx(target.component)
    manifest.verify_onnx(fp32)
    if request.producer.name == "torch":  # a typed error now, not after the trajectories
        from k3trt.calibration.torch_collector import model_folder

        model_folder(manifest, request.model_dir)
    fp32_path = manifest.path(fp32.graph.path)
    graph = onnx.load(str(fp32_path), load_external_data=False)
    excluded, matched = quantize.resolve_exclusions(graph, request.quant)  # a typo in --exclude fails now
    clock = PhaseClock()
    calib, heldout, ranges = collect_all(manifest, fp32, request, log)
    clock.lap("trajectories_and_ranges")
    key = int8_key(fp32, ranges, request.quant, excluded, request.external_threshold, request.float_parts)
    folder, created = build_int8(manifest, fp32, ranges, excluded, request, key, log)
    clock.lap("quantize")
    try:
        summary = quantize.qdq_summary(onnx.load(str(folder / "model.onnx"), load_external_data=False))
        config = settings(request, calib, heldout, fp32, ranges)
        record = make_record(root, folder, fp32, key, {"calibration": config, "fp32_export_key": fp32.export_key,
                                                       "fp32_graph": fp32.graph.path, "excluded_nodes": excluded,
                                                       **float_parts(root, folder, fp32.component)})
        measured = measure(manifest, record, folder, heldout, request, summary, log)
        clock.lap("heldout_quality")
        payload = report.build_payload(record_path=record.graph.path, settings=config, qdq=summary,
                                       exclusions=exclusion_table(request.quant, matched, excluded, graph),
                                       measured=measured, component=target.component, guided=heldout.guided,
                                       others=tuple(c for c in target.exports() if c != target.component))
        payload["timings"] = clock.laps  # this run's phases (cached trajectories or ranges make them short)
        payload["machine"] = {"cpu_count": os.cpu_count(), "load_average_start": clock.load_start,
                              "load_average_end": [round(x, 2) for x in os.getloadavg()]}
        shown = [f.task_inputs() for f in heldout.files]
        payload["task_inputs"] = list(shown[0]) if shown and shown[0] else []
        report_dir = Path(request.report_dir or root / "calibration" / f"report-int8-{key[:12]}")
        payload["report"] = str(report.write_report(report_dir, payload, heldout.images(), measured["images"],
                                                    inputs=shown))
        short = report.quality_summary(payload)
        record = dataclasses.replace(record, validation={"heldout": short},
                                     extra={**record.extra, "quality": short, "report": payload["report"]})
        manifest.put_onnx(record)
        save_manifest(manifest)  # commit point
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    collect_garbage(manifest, target.component, listed_before, log)
    return payload

"""fp32 ONNX + trajectories -> activation ranges -> explicit Q/DQ INT8 ONNX, with onnxruntime.quantization.

TensorRT-friendly placement: symmetric INT8 (zero point 0) everywhere, weights per output channel,
activations per tensor, Q/DQ only on the inputs of Conv / MatMul-with-constant-weights (Linear) / Gemm,
outputs and biases left float (TensorRT fuses Q/DQ into the next layer and keeps biases float).
Ranges are computed once per (trajectories, calibrator) and cached, so `--exclude` re-quantizes in seconds.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from k3trt.calibration.collect import CACHE_DIR, TrajectorySet
from k3trt.calibration.config import CALIBRATION_VERSION, Calibrator, QuantConfig
from k3trt.calibration.histograms import calibrator_options
from k3trt.contract.cards import card
from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.manifest import sha256_json
from k3trt.writing.ownership import mark_part

QDQ_FORMAT = 3  # bump when the Q/DQ graph changes for the same ranges (part of the int8 content key); 3: fp16 floats
QDQ_FP32_NAME = "qdq-fp32.onnx"  # the Q/DQ graph as quantized (fp32 float parts), beside model.onnx
RANGES_FORMAT = 2  # 2: histograms streamed one U-Net call at a time (1: one prompt's trajectory at a time)
EXTRA_OPTIONS = {
    "ActivationSymmetric": True,  # zero point 0: what TensorRT requires
    "WeightSymmetric": True,
    "MatMulConstBOnly": True,  # honoured by the QOperator path only; QDQ needs `activation_matmuls` below
    "QuantizeBias": False,  # TensorRT takes float biases
    "ForceQuantizeNoInputCheck": False,
}


def candidate_nodes(model, op_types: Iterable[str]) -> list:
    """Nodes quantization may touch: Conv/Gemm, and MatMul whose second input is a weight."""
    inits = {i.name for i in model.graph.initializer}
    ops = set(op_types)
    return [n for n in model.graph.node if n.op_type in ops and
            (n.op_type != "MatMul" or (len(n.input) > 1 and n.input[1] in inits))]


def activation_matmuls(model, op_types: Iterable[str]) -> list[str]:
    """MatMuls of two activations (attention scores and weighting). onnxruntime's QDQ quantizer ignores its
    MatMulConstBOnly option, so these are excluded by name: their inputs (softmax probabilities, Q and K)
    are poorly served by one per-tensor scale, and TensorRT's int8 recipe for diffusion leaves them float."""
    keep = {n.name for n in candidate_nodes(model, op_types)}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and "MatMul" in op_types
            and n.name not in keep]


def resolve_exclusions(model, config: QuantConfig) -> tuple[list[str], dict[str, list[str]]]:
    """Node names to keep float, and which names each pattern matched. A user pattern matching nothing is an
    error (a typo would silently quantize the layer); default patterns may match nothing in other models."""
    names = [n.name for n in candidate_nodes(model, config.op_types)]
    matched = {p: [n for n in names if p == n or p in n] for p in config.patterns()}
    for pattern in config.exclude:
        if not matched[pattern]:
            examples = ", ".join(names[i] for i in np.linspace(0, len(names) - 1, 3, dtype=int)) if names else ""
            raise InvalidArgumentError(
                f"--exclude {pattern!r} matches none of the {len(names)} quantizable nodes",
                accepted=f"an ONNX node name or a substring of one, e.g. {examples}",
                fix="copy a name from the sensitivity report (sensitivity section of quality.json)")
    excluded = {n for found in matched.values() for n in found} | set(activation_matmuls(model, config.op_types))
    return sorted(excluded), matched


# ----------------------------------------------------------------------------------------- ranges
def ranges_path(root: Path, trajectories: TrajectorySet, config: QuantConfig, fp32_export_key: str,
                collector: str = "ort") -> Path:
    key = sha256_json({"data": trajectories.key(), "ranges": config.range_settings(), "fp32": fp32_export_key,
                       "version": CALIBRATION_VERSION, "ort": _ort_version(),
                       "format": RANGES_FORMAT, **({} if collector == "ort" else {"collector": collector})})
    return root / CACHE_DIR / f"ranges-{key[:20]}.json"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _calibrate_method(config: QuantConfig):
    from onnxruntime.quantization import CalibrationMethod

    return {Calibrator.MAX: CalibrationMethod.MinMax, Calibrator.PERCENTILE: CalibrationMethod.Percentile,
            Calibrator.ENTROPY: CalibrationMethod.Entropy}[config.calibrator]


@contextlib.contextmanager
def quiet_library():
    """onnxruntime.quantization prints progress to stdout and warns through the root logger that the model
    was not pre-processed (its optimizer would rename the nodes our exclusions match): keep stdout for
    results and drop that warning."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


class FeedsReader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._iter = iter(feeds)

    def get_next(self):
        return next(self._iter, None)


def compute_ranges(fp32_path: Path, trajectories: TrajectorySet, config: QuantConfig, out: Path, *,
                   external: bool, log=print) -> Path:
    """Activation ranges of every Conv/MatMul/Gemm input over all calibration calls (cached in `out`).

    Streaming: the calibrator sees one U-Net call at a time and folds it into its running histograms (max:
    running min/max) before the next, so peak memory is one call's activations, whatever the number of steps
    and prompts. (onnxruntime's `collect_data` keeps every call it is given until it reduces them: fed a whole
    25-step trajectory at 1024 x 1024, a 57 M-parameter U-Net went past 24 GB.)"""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from tqdm import tqdm

    if out.is_file():
        log(f"reusing cached activation ranges {out.name} ({config.calibrator.value}, same trajectories)")
        return out
    calls = trajectories.calls
    log(f"calibrating activation ranges ({config.calibrator.value}) over {calls} U-Net calls, one at a time ...")
    options = calibrator_options(config)  # the torch collector folds with the same settings
    with tempfile.TemporaryDirectory(dir=out.parent.parent, prefix=".calib-") as tmp:
        mark_part(Path(tmp))  # the next writer may remove it if this process dies
        calibrator = create_calibrator(fp32_path, list(config.op_types), str(Path(tmp) / "augmented.onnx"),
                                       _calibrate_method(config), use_external_data_format=external,
                                       extra_options=options)
        calibrator.infer_session = lean_session(calibrator.augmented_model_path)
        with quiet_library():
            for call in tqdm(trajectories.unet_calls(), total=calls, desc="calibration", unit="call",
                             file=sys.stderr):
                with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per collect_data
                    calibrator.collect_data(FeedsReader([call.feeds]))
            ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, out)
    return out


def lean_session(augmented_path: str):
    """The calibrator's own session as onnxruntime makes it (no graph optimization, so every recorded tensor
    keeps its name), but without the memory arena: the augmented model returns every Conv/MatMul input of a
    U-Net call, and an arena would keep that peak for the whole run."""
    import onnxruntime as ort
    from k3trt.runtime.backends.ort import session_options

    options = session_options(optimize=False, flush_denormals=False, arena=False)
    return ort.InferenceSession(augmented_path, options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------- Q/DQ model
def quantize_model(fp32_path: Path, ranges: Path, out_dir: Path, excluded: list[str], config: QuantConfig, *,
                   external_threshold: int, name: str = "model.onnx") -> tuple[Path, Path | None]:
    """Write the Q/DQ model into `out_dir` (`name`, plus `name`.data past the threshold)."""
    import onnx
    from k3trt.export.onnx_export import save_onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    raw = out_dir / "raw.onnx"
    with quiet_library():
        quantize_static(str(fp32_path), str(raw), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(config.op_types), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(excluded), use_external_data_format=True,
                        calibrate_method=_calibrate_method(config), calibration_cache_path=str(ranges),
                        extra_options={**EXTRA_OPTIONS, "OpTypesToExcludeOutputQuantization": list(config.op_types)})
    fp32_graph = onnx.load(str(fp32_path), load_external_data=False)
    quantized = {n.name for n in candidate_nodes(fp32_graph, config.op_types)} - set(excluded)
    model = onnx.load(str(raw), load_external_data=True)
    keep_float_for_others(model, quantized)
    final = out_dir / name
    external = save_onnx(model, final, external_threshold=external_threshold)
    for leftover in out_dir.iterdir():
        if leftover not in (final, external):
            leftover.unlink()
    return final, external


def float_parts_to_fp16(qdq_fp32: Path, out: Path, component: str, *, external_threshold: int) -> Path | None:
    """The Q/DQ U-Net with its float parts in fp16, the U-Net card's fp32 islands kept: a strongly typed TensorRT
    (11.x always) runs every layer that is not quantized in the ONNX's float type, so an fp32-float Q/DQ graph
    would run them in fp32. Same converter and policy as the fp16 variant (export/variants.py); Q/DQ scales
    become fp16 (allowed from opset 19). Writes `out` (+ `out`.data past the threshold)."""
    import onnx
    from k3trt.export.onnx_export import save_onnx
    from k3trt.export.precision_variants import convert

    model = convert(qdq_fp32, "fp16", int8_fp32_nodes(qdq_fp32, component))
    external = save_onnx(model, out, external_threshold=external_threshold)
    onnx.checker.check_model(str(out))
    return external


def int8_fp32_nodes(graph_path: Path, component: str) -> tuple[str, ...]:
    """The nodes the U-Net's card keeps fp32 in fp16 (the timestep projection), found in `graph_path`."""
    import onnx
    from k3trt.export.fp32_islands import fp32_nodes

    return fp32_nodes(card(component).precision.islands("fp16"), onnx.load(str(graph_path), load_external_data=False))


def keep_float_for_others(model, quantized: set[str]) -> int:
    """Let only the quantized layers read fake-quantized activations. onnxruntime renames a quantized tensor
    for every consumer, so a Reshape on the residual path, an excluded layer, or the attention pooling's
    ReduceMean over the text would otherwise read int8-rounded values. Returns how many inputs were restored."""
    producers = {out: n for n in model.graph.node for out in n.output}
    restored = 0
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
                restored += 1
    return restored


def qdq_summary(model, op_types: Iterable[str] = ("Conv", "MatMul", "Gemm")) -> dict:
    """Which candidate nodes read a DequantizeLinear output (quantized) and which stayed float."""
    producers = {out: n for n in model.graph.node for out in n.output}
    quantized, kept = [], []
    for node in model.graph.node:
        if node.op_type not in set(op_types):
            continue
        reads_dq = any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                       for i in node.input[:2])
        (quantized if reads_dq else kept).append(node.name)
    counts = {op: sum(n.op_type == op for n in model.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    return {"quantized_nodes": quantized, "float_nodes": kept, **counts}

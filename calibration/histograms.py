"""Activation statistics folded one tensor at a time, with ONNX Runtime's calibrators' exact rules.

ONNX Runtime's calibrators (`onnxruntime.quantization.calibrate`) take the ranges the Q/DQ model is quantized
with; this module lets the torch collector produce the same `TensorsData` from torch tensors:

- percentile (the default): `HistogramCollector.collect_absolute_value` replayed on the tensor's device. Its
  bin edges come from the same numpy expressions on two numbers (so they are bit-identical: first call
  `np.histogram(|x|, bins)` over [min |x|, max |x|], later calls the old edges, extended with `np.arange` when
  max |x| grows), and only the counting (`edges[i] <= |x| < edges[i+1]`, last bin closed, what `np.histogram`
  counts) runs on the device with `torch.bucketize`, compared in the dtype numpy compares in. The threshold is
  then ONNX Runtime's own `compute_percentile` on those histograms. Why not numpy: at 1024 x 1024 a U-Net call
  has hundreds of large activations; copying each to the host and sorting it (`np.histogram` on non-uniform
  edges sorts) costs more than the call on a GPU.
- max: the running min and max, then ONNX Runtime's symmetric rule (-max |.|, +max |.|), in float32.
- on the CPU (percentile) and for entropy: ONNX Runtime's `HistogramCollector` itself, fed the host copy:
  exact by construction, and on the CPU faster than counting with torch.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

from k3trt.contract.errors import NonFiniteError

from k3trt.calibration.config import Calibrator, QuantConfig

PERCENTILE_BINS = 2048  # onnxruntime's create_calibrator default for percentile, passed explicitly to both
ENTROPY_BINS = 128  # onnxruntime's create_calibrator defaults for entropy (num_bins, num_quantized_bins)


def calibrator_options(config: QuantConfig) -> dict:
    """The extra options both collectors calibrate with (ONNX Runtime's `create_calibrator` reads the same)."""
    options = {"symmetric": True}  # zero point 0: what TensorRT requires
    if config.calibrator is Calibrator.PERCENTILE:
        options.update(percentile=float(config.percentile), num_bins=PERCENTILE_BINS)
    elif config.calibrator is Calibrator.ENTROPY:
        options.update(num_bins=ENTROPY_BINS, num_quantized_bins=ENTROPY_BINS)
    return options


def make_accumulator(config: QuantConfig, device: str = "cpu"):
    """Percentile histograms on the device for CUDA; on the CPU ONNX Runtime's collector itself is faster (numpy
    counts a 2 M-element activation in 0.09-0.15 s where `torch.bucketize` took 1.7 s, one thread)."""
    options = calibrator_options(config)
    if config.calibrator is Calibrator.MAX:
        return MinMaxRanges(options)
    if config.calibrator is Calibrator.PERCENTILE and device != "cpu":
        return PercentileHistograms(options)
    return HostHistograms(options, config.calibrator)


def _check_finite(name: str, low: float, high: float) -> None:
    if not (np.isfinite(low) and np.isfinite(high)):
        raise NonFiniteError(f"activation {name!r} holds NaN or Inf (min {low}, max {high})",
                             fix="calibrate an fp32 model that runs finite on these prompts (check its export)")


class PercentileHistograms:
    """|x| histograms per tensor, state as ONNX Runtime keeps it: (counts, edges, min, max)."""

    def __init__(self, options: dict):
        self.options = options
        self.state: dict[str, tuple] = {}

    def fold(self, name: str, tensor) -> None:
        import torch

        flat = tensor.detach().reshape(-1).float()
        low, high = (float(v) for v in torch.aminmax(flat))
        _check_finite(name, low, high)
        magnitude = flat.abs()
        top = np.float32(magnitude.max().item())
        if name not in self.state:
            edges = np.histogram_bin_edges(np.array([magnitude.min().item(), top], np.float32),
                                           bins=self.options["num_bins"])
            counts = count_in_bins(magnitude, edges)
            self.state[name] = (counts, edges.astype(np.float32), np.float32(low), np.float32(high))
            return
        old_counts, edges, old_low, old_high = self.state[name]
        if top > edges[-1]:  # onnxruntime: grow the bins at the same width up to the new maximum
            width = edges[1] - edges[0]
            edges = np.hstack((edges, np.arange(edges[-1] + width, top + width, width)))
        counts = count_in_bins(magnitude, edges)
        counts[: len(old_counts)] += old_counts
        self.state[name] = (counts, edges.astype(np.float32), min(old_low, np.float32(low)),
                            max(old_high, np.float32(high)))

    def result(self):
        from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector, TensorsData

        collector = HistogramCollector(method="percentile", symmetric=True, num_bins=self.options["num_bins"],
                                       num_quantized_bins=self.options["num_bins"],
                                       percentile=self.options["percentile"], scenario="same")
        collector.histogram_dict = {name: (c, e, np.array(lo), np.array(hi))
                                    for name, (c, e, lo, hi) in self.state.items()}
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings
            return TensorsData(CalibrationMethod.Percentile, collector.compute_collection_result())


def count_in_bins(values, edges: np.ndarray) -> np.ndarray:
    """What `np.histogram(values, bins=edges)[0]` counts (int64), counted where `values` lives. numpy compares a
    float32 array with float64 edges in float64, so the comparison dtype is numpy's result type."""
    import torch

    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[
        np.result_type(np.float32, edges.dtype)]
    bounds = torch.from_numpy(np.ascontiguousarray(edges)).to(values.device, dtype)
    data = values.to(dtype)
    data = data[(data >= bounds[0]) & (data <= bounds[-1])]
    bins = len(edges) - 1
    index = (torch.bucketize(data, bounds, right=True) - 1).clamp_(max=bins - 1)  # last bin is closed
    return torch.bincount(index, minlength=bins).cpu().numpy().astype(np.int64)


class MinMaxRanges:
    """Running min/max per tensor; ONNX Runtime's symmetric MinMax range at the end."""

    def __init__(self, options: dict):
        self.state: dict[str, tuple[float, float]] = {}

    def fold(self, name: str, tensor) -> None:
        import torch

        low, high = (float(v) for v in torch.aminmax(tensor.detach().float()))
        _check_finite(name, low, high)
        old = self.state.get(name, (low, high))
        self.state[name] = (min(old[0], low), max(old[1], high))

    def result(self):
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        ranges = {}
        for name, (low, high) in self.state.items():
            bound = np.float32(max(abs(np.float32(low)), abs(np.float32(high))))
            ranges[name] = (np.array(-bound, np.float32), np.array(bound, np.float32))
        return TensorsData(CalibrationMethod.MinMax, ranges)


class HostHistograms:
    """ONNX Runtime's own HistogramCollector on host copies (percentile on the CPU, entropy anywhere)."""

    def __init__(self, options: dict, calibrator: Calibrator):
        from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector

        bins = options["num_bins"]
        self.method = {Calibrator.PERCENTILE: CalibrationMethod.Percentile,
                       Calibrator.ENTROPY: CalibrationMethod.Entropy}[calibrator]
        self.collector = HistogramCollector(method=calibrator.value, symmetric=True, num_bins=bins,
                                            num_quantized_bins=options.get("num_quantized_bins", bins),
                                            percentile=options.get("percentile", 100.0), scenario="same")

    @property
    def state(self) -> dict:
        return self.collector.histogram_dict

    def fold(self, name: str, tensor) -> None:
        array = tensor.detach().float().cpu().numpy()
        _check_finite(name, float(np.min(array)), float(np.max(array)))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per call
            self.collector.collect({name: [array]})

    def result(self):
        from onnxruntime.quantization.calibrate import TensorsData

        with contextlib.redirect_stdout(io.StringIO()):
            return TensorsData(self.method, self.collector.compute_collection_result())

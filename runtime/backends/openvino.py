"""OpenVINO backend (CPU): the exported fp32 ONNX, compiled per request shape, in fp32 or bf16.

OpenVINO reads the same fp32 ONNX files ONNX Runtime runs; the precision is a compile setting, not another
ONNX variant. Each component is compiled once per input-shape set with those shapes made static (the CPU
plugin then plans memory and picks kernels for exactly that shape), and OpenVINO's model cache keeps the
compiled blobs on disk, so the next process skips the compile. The inference precision hint is always set
explicitly: left unset, OpenVINO picks bf16 by itself on AMX CPUs, so an "fp32" run would not be fp32 there.

bf16 needs native bf16 arithmetic (AVX-512 BF16 or AMX); elsewhere OpenVINO would emulate it slowly, so it is
refused with a typed error before anything compiles.

int8 is the one precision read from another ONNX variant: the U-Net's calibrated Q/DQ graph (`k3trt calibrate`).
OpenVINO's low-precision transformations turn each Q/DQ-wrapped convolution and matrix product into an integer
kernel (VNNI / AMX-INT8), the float parts run in fp32 (the f32 hint); components without an int8 variant run fp32.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError
from k3trt.contract.manifest import check_external_data_paths
from k3trt.runtime.backends.base import Backend, check_io_signature, onnx_io_ranks
from k3trt.runtime.cpuinfo import cpu_info

# our names -> OpenVINO's inference precision hint; int8 comes from the Q/DQ graph, its float parts run f32
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("K3TRT_CACHE", Path.home() / ".cache" / "k3trt")) / "openvino"


def check_precisions(precisions: Mapping[str, str]) -> None:
    """Every component's precision is one OpenVINO computes here; bf16 only with native bf16 arithmetic."""
    for component, precision in precisions.items():
        if precision not in INFERENCE_PRECISION:
            raise InvalidArgumentError(f"--backend openvino cannot run {component} in {precision}",
                                       accepted=", ".join(INFERENCE_PRECISION),
                                       fix="--precision fp32, bf16 or int8")
    if "bf16" in precisions.values() and not cpu_info().bf16:
        raise BackendUnavailableError(
            f"bf16 needs a CPU with AVX-512 BF16 or AMX; this one is {cpu_info().describe()}",
            accepted="fp32 on this CPU", fix="--precision fp32 (the default), or run on a CPU that reports "
                                             "avx512_bf16 or amx_bf16 in /proc/cpuinfo")


def _openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError("OpenVINO is not installed", accepted="--backend ort (always installed)",
                                      fix="pip install 'kandinsky3-trt[openvino]'") from None
    return openvino


def replace_constants(ov, model, weights: Mapping[str, np.ndarray], component: str) -> None:
    """Swap the Constants the ONNX frontend made from these initializers (named after them) for new ones."""
    from k3trt.contract import errors

    constants = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            for name in op.output(0).get_names() | {op.get_friendly_name()}:
                constants[name] = op
    missing = sorted(set(weights) - set(constants))
    if missing:
        raise errors.BackendRuntimeError(f"OpenVINO's reading of {component} has no constant for {missing[:4]}",
                                         fix="use --backend ort for LoRA on this model")
    for name, array in weights.items():
        new = ov.op.Constant(np.ascontiguousarray(array))
        new.set_friendly_name(name)
        constants[name].output(0).replace(new.output(0))


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, manifest, precision="fp32", *, threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, verify: bool = True):
        super().__init__(manifest, precision)
        # what was asked, "default" (or a component left out of a map) being this backend's baseline, fp32
        check_precisions({c: p.value if p else self.baseline for c, p in self.precision.items()})
        self.ov = _openvino()
        self.core = self.ov.Core()
        self.threads, self.verify = threads, verify
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._compiled: dict[tuple, object] = {}  # (component, input shapes) -> compiled model
        self._verified: set[str] = set()
        self._compile_lock = threading.Lock()  # concurrent first calls compile once
        self._local = threading.local()  # an infer request holds its buffers: one per thread and shape
        self._overrides: dict[str, dict[str, np.ndarray]] = {}  # component -> initializer -> new weight

    def variant_for(self, precision) -> str:
        """The fp32 graph for fp32 and bf16 (the precision is a compile hint); the Q/DQ graph for int8."""
        from k3trt.contract.precision import Precision

        return "int8" if precision == Precision.INT8 else "fp32"

    def config(self, component: str) -> dict:
        config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[self.effective_precision(component)],
                  "PERFORMANCE_HINT": "LATENCY", "CPU_DENORMALS_OPTIMIZATION": True}  # as ORT: flush denormals
        if not self._overrides.get(component):  # changed weights are never cached under the files' key
            config["CACHE_DIR"] = str(self.cache_dir)
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        return config

    def compiled(self, component: str, shapes: Mapping[str, tuple]):
        """The compiled model for these exact input shapes (compiled, or loaded from the disk cache, once)."""
        key = (component, tuple(sorted((name, tuple(shape)) for name, shape in shapes.items())))
        if key in self._compiled:
            return self._compiled[key]
        with self._compile_lock:
            if key not in self._compiled:
                self._compiled[key] = self._compile(component, shapes)
        return self._compiled[key]

    def _ready(self, component: str) -> None:
        """Hashes and the ONNX's I/O names and ranks now (as ONNX Runtime's session checks them); the model
        compiles per input shape on its first call."""
        if self.verify and component not in self._verified:
            self.manifest.verify_onnx(self.record(component))
            self._verified.add(component)
        path = self.manifest.path(self.record(component).graph.path)  # Backend.ready: once per component
        check_io_signature(self.record(component), *onnx_io_ranks(path), str(path))

    def _compile(self, component: str, shapes: Mapping[str, tuple]):
        record = self.record(component)
        path = self.manifest.path(record.graph.path)
        if self.verify and component not in self._verified:
            self.manifest.verify_onnx(record)
            self._verified.add(component)
        check_external_data_paths(path, self.manifest.root)
        model = self.core.read_model(str(path))
        if self._overrides.get(component):
            replace_constants(self.ov, model, self._overrides[component], component)
        model.reshape({name: self.ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.core.compile_model(model, "CPU", self.config(component))

    def set_weights(self, overrides) -> None:
        """Recompile the components whose weights change, their Constants replaced in the read model (the
        other weights stay as read from the files)."""
        overrides = {c: dict(w) for c, w in overrides.items() if w}
        with self._compile_lock:
            changed = set(self._overrides) | set(overrides)
            self._compiled = {k: v for k, v in self._compiled.items() if k[0] not in changed}
            self._overrides = overrides
        self._local = threading.local()

    def infer_request(self, component: str, shapes: Mapping[str, tuple]):
        compiled = self.compiled(component, shapes)
        requests = self._local.__dict__.setdefault("requests", {})
        if id(compiled) not in requests:
            requests[id(compiled)] = (compiled, compiled.create_infer_request())
        return requests[id(compiled)]

    def _run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
        compiled, request = self.infer_request(component, {k: a.shape for k, a in arrays.items()})
        results = request.infer(arrays)  # the request's output buffers are reused by the next call: copy out
        names = [spec.name for spec in self.record(component).outputs]  # OpenVINO keeps the ONNX output order
        return {name: torch.from_numpy(np.array(results[out], copy=True))
                for name, out in zip(names, compiled.outputs)}

    def close(self) -> None:
        with self._compile_lock:
            self._compiled.clear()
        self._local = threading.local()

"""ONNX Runtime backend: CPU here; CUDA and TensorRT execution providers where installed.

On CUDA, I/O binding keeps tensors on the device (torch CUDA tensors in, ORT-allocated CUDA tensors out via
DLPack), so latents never round-trip through host memory between steps.
"""
from __future__ import annotations

import functools
import threading
from typing import Mapping

import numpy as np
import torch
from k3trt.contract.arguments import available_cores, check_threads
from k3trt.contract.errors import ArtifactError, BackendRuntimeError, BackendUnavailableError, InvalidArgumentError
from k3trt.contract.manifest import check_external_data_paths
from k3trt.runtime.backends.base import Backend, check_io_signature, log

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def default_threads() -> int:
    return available_cores()


def onnxruntime():
    """ONNX Runtime, or a typed error naming the extra that installs it (one of cpu / gpu-cu12 / gpu-cu13)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("ONNX Runtime is not installed",
                                      fix="pip install 'kandinsky3-trt[cpu]' (or [gpu-cu12] / [gpu-cu13] on a machine "
                                          "with an NVIDIA GPU: onnxruntime-gpu)") from None
    return ort


def session_options(*, threads: int | None = None, optimize: bool = True, flush_denormals: bool = True,
                    disable_quant_qdq: bool = False, arena: bool = True, spin: bool = True):
    """The one place ONNX Runtime CPU session options are made (runtime, export validation, calibration).

    `arena=False` returns freed activations to the OS instead of keeping each session's peak: calibration's
    sessions run once per large shape, where a kept arena only adds to the process's peak (measured at
    1024 x 1024 on the small preset, one 2-step generation: 4714 MB with the arena, 3607 MB without)."""
    ort = onnxruntime()

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 3
    options.intra_op_num_threads = check_threads(threads) or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if flush_denormals:  # denormal arithmetic is slow on x86; measured 45 -> 38 ms per small U-Net call
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if disable_quant_qdq:  # Q/DQ evaluated as float fake-quant, not fused int8 kernels
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if not spin:  # idle workers sleep at once instead of spinning on the cores (what a timed neighbour needs)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def cpu_session(model, **options):
    """A CPU session for an ONNX path or serialized bytes; keyword options as `session_options`."""
    ort = onnxruntime()

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(**options), providers=["CPUExecutionProvider"])


def storage_session(model, *, threads: int | None = None):
    """An ONNX Runtime CPU session over the storage-emulating rewrite of `model` (runtime/backends/storage.py;
    optimizations off, so the rounding casts stay where they are)."""
    from k3trt.runtime.backends.storage import emulate_storage  # imports onnx: only variant runs need it

    emulated, _ = emulate_storage(model)
    if not any(op.domain in ("", "ai.onnx") and op.version >= 13 for op in emulated.opset_import):
        raise ValueError("storage emulation needs opset >= 13 (bf16 Cast)")
    return cpu_session(emulated.SerializeToString(), threads=threads, optimize=False, flush_denormals=False)


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, manifest, precision="fp32", *, provider: str = "cpu", threads: int | None = None,
                 optimize: bool = True, disable_quant_qdq: bool = False, verify: bool = True,
                 flush_denormals: bool = True, arena: bool = True):
        """`disable_quant_qdq` keeps Q/DQ pairs as fake-quant float ops: on some CPUs (AVX2 without VNNI) the fused
        int8 kernels saturate, so accuracy is measured with it on."""
        super().__init__(manifest, precision)
        ort = onnxruntime()

        threads = check_threads(threads)  # 1..cores: more only oversubscribes (100000 threads hung)
        if not isinstance(provider, str) or provider not in PROVIDERS:
            raise InvalidArgumentError(f"unknown ONNX Runtime provider {provider!r}", accepted=", ".join(PROVIDERS))
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"ONNX Runtime provider {PROVIDERS[provider]} is not available here",
                accepted=", ".join(ort.get_available_providers()),
                fix="pip install 'kandinsky3-trt[gpu]' on a machine with an NVIDIA GPU, or use --provider cpu")
        self.provider, self.threads, self.optimize = provider, threads or default_threads(), optimize
        self.disable_quant_qdq, self.verify, self.flush_denormals = disable_quant_qdq, verify, flush_denormals
        self.arena = bool(arena)
        self._sessions: dict[str, object] = {}
        self._overrides: dict[str, dict[str, np.ndarray]] = {}  # component -> initializer -> new weight
        self._open_lock = threading.Lock()  # concurrent first calls open one session, not several

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.provider == "cpu" else "cuda")

    def session(self, component: str):
        """The component's session, opened once; `InferenceSession.run` itself is safe to call concurrently."""
        session = self._sessions.get(component)
        if session is None:
            with self._open_lock:
                session = self._sessions.get(component)
                if session is None:
                    session = self._sessions[component] = self._open(component)
        return session

    def _open(self, component: str):
        ort = onnxruntime()

        record = self.record(component)
        if self.verify:
            self.manifest.verify_onnx(record)
        path = self.manifest.path(record.graph.path)
        check_external_data_paths(path, self.manifest.root)
        if record.variant == "bf16" and self.provider == "cpu":  # no bf16 MatMul/Conv kernels on the CPU provider
            return self._bf16_on_cpu(path)
        options = session_options(threads=self.threads, optimize=self.optimize,
                                  flush_denormals=self.flush_denormals, disable_quant_qdq=self.disable_quant_qdq,
                                  arena=self.arena)
        providers = [PROVIDERS[self.provider]] + (["CPUExecutionProvider"] if self.provider != "cpu" else [])
        values = self._with_overrides(component, options)
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
            session.k3trt_weights = values  # kept alive with the session
            return session
        except Exception as exc:  # onnxruntime's errors have no common base: a corrupt file is an artifact error
            raise ArtifactError(f"ONNX Runtime cannot load {component} from {str(path)!r}: "
                                f"{type(exc).__name__}: {str(exc)[:300]}",
                                fix="re-run `k3trt export` (or the stage that wrote it)") from exc

    def _ready(self, component: str) -> None:
        """Open the session now (its hash is verified on opening) and check its I/O names and ranks."""
        session = self.session(component)
        if hasattr(session, "get_inputs"):
            check_io_signature(self.record(component), _ranks(session.get_inputs()), _ranks(session.get_outputs()),
                               str(self.manifest.path(self.record(component).graph.path)))

    def set_weights(self, overrides) -> None:
        """New sessions for the components whose weights change, with only the changed initializers given to
        ONNX Runtime (`SessionOptions.add_initializer`); the rest load from the unchanged files as always."""
        overrides = {c: {n: np.ascontiguousarray(a) for n, a in w.items()} for c, w in overrides.items() if w}
        for component in overrides:
            if self.record(component).variant == "bf16" and self.provider == "cpu":
                raise InvalidArgumentError(f"new weights for the bf16 {component} on the CPU provider",
                                           accepted="fp32 or fp16 variants", fix="--precision fp32")
        with self._open_lock:
            for component in set(self._overrides) | set(overrides):
                self._sessions.pop(component, None)  # a running call keeps its old session to the end
            self._overrides = overrides

    def _with_overrides(self, component: str, options):
        """Attach the component's replaced initializers; the OrtValues must outlive the session."""
        ort = onnxruntime()
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self._overrides.get(component, {}).items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        return values

    def _bf16_on_cpu(self, path):
        """bf16 storage emulated on fp32 kernels (runtime/backends/storage.py): each bf16 tensor is rounded to
        bf16 where it is made, so results match a bf16 device's up to accumulation order."""
        import onnx

        log.info("running %s with bf16 storage emulated on the CPU provider", path)
        return storage_session(onnx.load(str(path)), threads=self.threads)

    def _run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.session(component)
        names = [o.name for o in session.get_outputs()]
        try:
            if self.provider == "cpu":
                arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
                return {n: torch.from_numpy(a) for n, a in zip(names, session.run(names, arrays))}
            return self._run_bound(session, names, feeds)
        except Exception as exc:
            if not isinstance(exc, _ort_errors()):  # only ONNX Runtime's own exceptions (they share no base)
                raise
            raise BackendRuntimeError(f"ONNX Runtime failed running {component}: {type(exc).__name__}: "
                                      f"{str(exc)[:300]}", fix=f"run `k3trt check --artifacts {self.manifest.root}`"
                                      " (damaged files?) and re-export if it reports errors") from exc

    def _run_bound(self, session, names, feeds) -> dict[str, torch.Tensor]:
        binding = session.io_binding()
        kept = []  # keep contiguous inputs alive until the run ends
        for name, tensor in feeds.items():
            tensor = tensor.to(self.device).contiguous()
            kept.append(tensor)
            binding.bind_input(name, "cuda", tensor.device.index or 0, _NP_DTYPE[tensor.dtype],
                               list(tensor.shape), tensor.data_ptr())
        for name in names:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        return {n: torch.from_dlpack(v.to_dlpack()) for n, v in zip(names, binding.get_outputs())}

    def close(self) -> None:
        with self._open_lock:
            self._sessions.clear()


def _ranks(args) -> dict[str, int]:
    return {arg.name: len(arg.shape) for arg in args}


_NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}


@functools.lru_cache(maxsize=1)
def _ort_errors() -> tuple[type[BaseException], ...]:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:
        return ()
    return tuple(cls for cls in vars(state).values() if isinstance(cls, type) and issubclass(cls, Exception))


"""The backend interface: run one exported component on named tensors.

A backend is built from a Manifest and a precision per component; `run(component, feeds)` takes and returns
torch tensors keyed by the ONNX input/output names. Shapes are checked against the manifest's axis ranges
before anything runs, so an out-of-range request fails with the range and the fix, not deep inside a kernel.
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import threading
import time
from typing import Iterable, Mapping

import torch
from k3trt.contract.cards import COMPONENTS
from k3trt.contract.errors import ArtifactError, BackendUnavailableError, InvalidArgumentError, ShapeError
from k3trt.contract.manifest import Manifest, OnnxRecord, load_onnx_graph
from k3trt.contract.precision import Precision, Resolved, requested_precision, resolve_precision, variant_of

log = logging.getLogger("k3trt")

TIMING_WINDOW = 1024  # per component: the last calls' seconds (a ring), so a long-running server stays bounded


class StageTimings(collections.defaultdict):
    """component -> a ring of the last TIMING_WINDOW call durations (seconds), plus lifetime call counts and sums.

    Reads like the dict of lists it replaces (`sum(t["unet"])`, `len(...)`, `.clear()`); `record` is
    thread-safe, and memory stays bounded however long the process serves."""

    def __init__(self, window: int = TIMING_WINDOW):
        super().__init__(lambda: collections.deque(maxlen=window))
        self.calls: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def record(self, component: str, seconds: float) -> None:
        with self._lock:
            self[component].append(seconds)
            self.calls[component] += 1
            self.seconds[component] += seconds


def precision_map(precision: str | Precision | Mapping[str, str] | None) -> dict[str, Precision | None]:
    """One precision for all components, or a per-component mapping, each parsed once; None ("default", or a
    component left out of the map) means the backend's baseline (fp32 on ONNX Runtime and OpenVINO, the cards'
    defaults on TensorRT)."""
    if isinstance(precision, Mapping):
        unknown = set(precision) - set(COMPONENTS)
        if unknown:
            raise InvalidArgumentError(f"unknown component(s) {sorted(unknown)} in the precision map",
                                       accepted=", ".join(COMPONENTS))
        return {c: requested_precision(precision.get(c)) for c in COMPONENTS}
    # A single --precision int8 quantizes what can have an int8 variant (the U-Nets); the rest runs at baseline.
    asked = requested_precision(precision)
    return {c: asked for c in COMPONENTS}


def check_feeds(record: OnnxRecord, feeds: Mapping[str, torch.Tensor]) -> None:
    check_shapes(record, {name: tuple(tensor.shape) for name, tensor in feeds.items()})


def check_shapes(record: OnnxRecord, shapes: Mapping[str, tuple]) -> None:
    """Every input present, ranks right, fixed dims equal, dynamic dims inside the manifest's ranges."""
    expected = {t.name for t in record.inputs}
    if set(shapes) != expected:
        raise InvalidArgumentError(f"{record.component} got inputs {sorted(shapes)}", accepted=str(sorted(expected)))
    bound: dict[str, int] = {}
    for spec in record.inputs:
        shape = tuple(shapes[spec.name])
        if len(shape) != len(spec.shape):
            raise ShapeError(f"{record.component}.{spec.name} has shape {shape}",
                             accepted=f"rank {len(spec.shape)}: {spec.shape}")
        for dim, want in zip(shape, spec.shape):
            if isinstance(want, int):
                if dim != want:
                    raise ShapeError(f"{record.component}.{spec.name} has shape {shape}", accepted=str(spec.shape))
                continue
            lo, hi = record.axes.get(want, (1, 1 << 31))
            multiple = record.extra.get("multiples", {}).get(want, 1)
            if not lo <= dim <= hi or dim % multiple:
                raise ShapeError(
                    f"{record.component}.{spec.name} axis {want!r} = {dim} is outside what the artifacts allow",
                    accepted=f"{lo}..{hi}" + (f", a multiple of {multiple}" if multiple > 1 else ""),
                    fix="change the request (image size, batch, prompt) or re-export/rebuild for that range")
            if bound.setdefault(want, dim) != dim:
                raise ShapeError(f"{record.component}: axis {want!r} is {bound[want]} in one input and {dim} in "
                                 f"{spec.name}", fix="all inputs must agree on shared axes")


def check_io_signature(record: OnnxRecord, inputs: Mapping[str, int], outputs: Mapping[str, int],
                       where: str) -> None:
    """The names and ranks a loaded model declares (`inputs`/`outputs`: name -> rank) against the manifest's
    record: a foreign model behind a matching hash is refused before it runs."""
    for kind, declared, specs in (("inputs", inputs, record.inputs), ("outputs", outputs, record.outputs)):
        expected = {spec.name: len(spec.shape) for spec in specs}
        if dict(declared) != expected:
            raise ArtifactError(f"{record.component} ({record.variant}) in {where} has {kind} "
                                f"{_signature(declared)}, but the manifest records {_signature(expected)}",
                                accepted="the model the manifest describes",
                                fix="re-run the stage that wrote it (`k3trt export`); never replace artifact files "
                                    "by hand")


def onnx_io_ranks(graph_path) -> tuple[dict[str, int], dict[str, int]]:
    """(inputs, outputs) as name -> rank, read from the ONNX graph without its weights, for backends whose
    loaded model does not expose the ONNX I/O (OpenVINO renames and reshapes)."""
    graph = load_onnx_graph(graph_path).graph  # a damaged file: ArtifactError, as on ONNX Runtime
    weights = {i.name for i in graph.initializer}  # old IRs list initializers among the inputs
    rank = lambda value: len(value.type.tensor_type.shape.dim)
    return ({v.name: rank(v) for v in graph.input if v.name not in weights},
            {v.name: rank(v) for v in graph.output})


def _signature(ranks: Mapping[str, int]) -> str:
    return ", ".join(f"{name} (rank {rank})" for name, rank in sorted(ranks.items())) or "(none)"


class Backend(abc.ABC):
    """Runs exported components. Subclasses implement `_run`; `run` adds checks and timing."""

    name = "abstract"
    baseline = "fp32"  # what "default" means on this backend (see k3trt.contract.precision.resolve_precision)
    auto_choice = None  # what `auto` chose, when it did (k3trt.runtime.backends.auto.AutoChoice)

    def __init__(self, manifest: Manifest, precision: str | Mapping[str, str] | None = "fp32"):
        self.manifest = manifest
        self.precision = precision_map(precision)
        self._explicit = isinstance(precision, Mapping)
        self._resolved: dict[str, Resolved] = {}
        self.timings = StageTimings()  # seconds per call, bounded

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def resolve(self, component: str) -> Resolved:
        """The variant and compute precision of `component`: one resolution, from the card and the manifest."""
        if component not in self._resolved:
            requested = self.precision.get(component)  # task components: baseline
            found = resolve_precision(self.manifest.data["onnx"], component, requested, baseline=self.baseline,
                                      explicit=self._explicit and requested is not None,
                                      artifacts=str(self.manifest.root), variant_for=self.variant_for)
            if requested not in (None, found.precision):  # e.g. int8 asked, the text encoder has none
                log.warning("%s has no %s ONNX variant in %s: running it in %s", component, requested,
                            self.manifest.root, found.precision)
            self._resolved[component] = found
        return self._resolved[component]

    def variant_for(self, precision: Precision) -> str:
        """The ONNX variant `precision` runs from (a hook: OpenVINO compiles the fp32 graph at any precision)."""
        return variant_of(precision)

    def record(self, component: str) -> OnnxRecord:
        return self.manifest.onnx(component, self.resolve(component).variant)

    def axes(self, component: str) -> dict[str, tuple[int, int]]:
        """The range of each dynamic axis `component` runs with here: the exported ONNX's. A backend of prebuilt
        engines narrows them to the engine's optimization profile; requests and batches are sized by these."""
        return dict(self.record(component).axes)

    def limits_record(self, component: str) -> OnnxRecord:
        """`record(component)` with `axes(component)`: what `check_shapes` checks a request against."""
        return dataclasses.replace(self.record(component), axes=self.axes(component))

    def effective_precision(self, component: str) -> str:
        """The precision `component` actually runs in (parity picks its tolerance by this)."""
        return self.resolve(component).precision.value

    def ready(self, components: Iterable[str]) -> None:
        """Open and verify (hashes, I/O signatures) every component a request will run, before its first step:
        a replaced or foreign file is a typed error before any work, not after the denoising loop. Backends
        that load lazily override `_ready`; each component is made ready once."""
        done = self.__dict__.setdefault("_ready_done", set())
        for component in components:
            if component not in done:
                self._ready(component)
                done.add(component)

    def _ready(self, component: str) -> None:
        """The default: nothing to open ahead (the torch reference runs modules, not files)."""

    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feeds(self.record(component), feeds)
        start = time.perf_counter()
        out = self._run(component, feeds)
        self.timings.record(component, time.perf_counter() - start)
        return out

    @abc.abstractmethod
    def _run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ...

    def set_weights(self, overrides: Mapping[str, Mapping[str, object]]) -> None:
        """Run with these initializers replaced: component -> initializer name -> array in the initializer's
        type (runtime/lora.py). The whole desired state: a component or name left out runs its base weights.
        Call between generations, not during one."""
        raise BackendUnavailableError(f"the {self.name} backend cannot change weights by name",
                                      accepted="backends ort, openvino and trt",
                                      fix="use --backend ort (or merge the adapter and `k3trt export "
                                          "--weights-from`)")

    def weight_graph(self, component: str) -> str:
        """The ONNX file (relative path) whose initializers this backend runs for `component`."""
        return self.record(component).graph.path

    def close(self) -> None:
        """Release sessions/engines; the backend is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


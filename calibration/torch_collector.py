"""The torch collector: trajectories and activation ranges from the torch modules, on CUDA when there is one.

`k3trt calibrate --collector torch` runs the fp32 trajectories through the torch modules the ONNX was exported
from (same runtime loop, same seeds; the modules on the device), then replays every calibration U-Net call
through the torch U-Net with a forward pre-hook on each Conv/Linear whose ONNX node the Q/DQ placement reads
(`activation_map`), folding each activation into ONNX Runtime's statistics (`histograms`). The ranges file is
ONNX Runtime's own format (`save_tensors_data`), so quantization, the int8 record and the quality measurement
are the same code for both collectors. `--collector ort` is ONNX Runtime's CPU calibrator (`quantize.py`).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Mapping

from k3trt.runtime.backends.base import Backend
from k3trt.contract.errors import ArtifactError, InvalidArgumentError, ModelSourceError

COLLECTORS = ("torch", "ort")


def default_collector() -> str:
    """torch: the collector that can use a GPU, and on 2 shared CPU cores the faster one per calibration call
    (trajectory call + range pass; docs/results/calibration_collectors.json)."""
    return "torch"


def check_collector(name: str) -> str:
    if name not in COLLECTORS:
        raise InvalidArgumentError(f"--collector {name!r}", accepted=", ".join(COLLECTORS),
                                   fix="--collector torch (CUDA when present, else CPU) or ort (CPU)")
    return name


def collector_device(name: str) -> str:
    """Where the collector runs: torch on CUDA when torch sees a GPU, else the CPU; ort always on the CPU."""
    import torch

    return "cuda" if name == "torch" and torch.cuda.is_available() else "cpu"


def model_folder(manifest, model_dir: str | Path | None) -> Path:
    """The model folder the artifacts were exported from (--model, else the manifest's source path)."""
    root = model_dir or manifest.data.get("source", {}).get("path")
    if not root or not Path(root).is_dir():
        raise ModelSourceError(f"--collector torch needs the model folder the artifacts came from; {root!r} is not "
                               "a folder", accepted="a diffusers-layout model folder",
                               fix="pass --model DIR, or use --collector ort (ONNX Runtime, no model folder)")
    return Path(root)


def load_module(source, component: str, device: str):
    """The export wrapper of `component` (what was traced to ONNX), fp32, eval, on `device`."""
    from k3trt.export.components import SPECS

    spec = SPECS[component]
    return spec.wrapper(source.load(spec.folder)).eval().to(device)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads for the block, restored after (None: leave torch's). On a shared CPU, torch's
    OpenMP workers spin-wait for each other: 2 threads on 2 busy cores ran a tiny U-Net call 10-100x slower
    than 1 thread, so `--threads` bounds them as it bounds ONNX Runtime's."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchModulesBackend(Backend):
    """The runtime's backend interface over the torch modules on one device: the fp32 trajectories of the torch
    collector (text encoder, U-Net, MoVQ as the task needs them, each loaded on first use)."""

    name = "torch-calibration"

    def __init__(self, manifest, model_dir: str | Path | None = None, *, device: str = "cpu",
                 threads: int | None = None, range_pass: "RangePass | None" = None):
        """`range_pass`: its hooked module runs that component's calls, folding their activations as the
        trajectories are made (one U-Net pass instead of a trajectory pass and a replay)."""
        from k3trt.export.sources import open_source_dir

        super().__init__(manifest, "fp32")
        self.threads = threads if device == "cpu" else None
        self.source = open_source_dir(model_folder(manifest, model_dir),
                                      variant=manifest.data.get("source", {}).get("variant"))
        self._device = device
        self._modules: dict = {}
        self.range_pass = range_pass

    @property
    def device(self):
        import torch

        return torch.device(self._device)

    def _run(self, component: str, feeds: Mapping) -> dict:
        import torch

        from k3trt.export.components import SPECS

        spec = SPECS[component]
        if self.range_pass is not None and component == self.range_pass.component:
            return {spec.output_names[0]: self.range_pass.call(feeds)}
        if component not in self._modules:
            self._modules[component] = load_module(self.source, component, self._device)
        with torch.inference_mode(), torch_threads(self.threads):
            out = self._modules[component](*(feeds[n].to(self._device) for n in spec.input_names))
        return {spec.output_names[0]: out}

    def close(self) -> None:
        self._modules.clear()


class RangePass:
    """The torch U-Net with a folding pre-hook on every Conv/Linear whose input the Q/DQ placement reads:
    `fold(feeds)` runs one U-Net call and folds each mapped activation, once per ONNX tensor per call (the
    exporter merges identical inputs: one SiLU(time embedding) feeds every norm MLP); `result()` is ONNX
    Runtime's TensorsData. Use as a context manager (the hooks are removed on exit)."""

    def __init__(self, fp32_path: Path, source, component: str, config, candidates, *, device: str = "cpu",
                 threads: int | None = None):
        """`candidates`: the Q/DQ placement's candidate nodes of the ONNX at `fp32_path`
        (`quantize.candidate_nodes`)."""
        from k3trt.calibration import activation_map, histograms
        from k3trt.export.components import SPECS

        module = load_module(source, component, "cpu")  # the map hashes weights on the host, once
        self.activations = activation_map.derive(fp32_path, module, candidates)
        self.module, self.component, self.device = module.to(device), component, device
        self.threads = threads if device == "cpu" else None
        self.accumulator = histograms.make_accumulator(config, device)
        self.input_names = SPECS[component].input_names
        self._seen: set[str] = set()
        self._calls: dict[str, int] = {}
        self._handles: list = []
        self.calls = 0  # U-Net calls folded so far

    def __enter__(self) -> "RangePass":
        modules = dict(self.module.named_modules())
        for qualname, names in self.activations.inputs.items():
            self._handles.append(modules[qualname].register_forward_pre_hook(self._hook(qualname, names)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, qualname: str, names: tuple[str, ...]):
        def hook(_module, args):
            index = self._calls.get(qualname, 0)
            self._calls[qualname] = index + 1
            if index < len(names) and names[index] not in self._seen:
                self._seen.add(names[index])
                self.accumulator.fold(names[index], args[0])
        return hook

    def fold(self, feeds: Mapping) -> None:
        """One U-Net call on `feeds` (numpy arrays by input name), every mapped activation folded."""
        import torch

        self.call({n: torch.from_numpy(feeds[n]) for n in self.input_names})

    def call(self, feeds: Mapping):
        """One U-Net call on `feeds` (torch tensors by input name), every mapped activation folded; returns the
        module's output (the trajectory pass uses it as the U-Net's answer)."""
        import torch

        self._seen.clear(), self._calls.clear()
        with torch.inference_mode(), torch_threads(self.threads):
            out = self.module(*(feeds[n].to(self.device) for n in self.input_names))
        if self._seen != self.activations.tensors:
            missing = sorted(self.activations.tensors - self._seen)
            raise ArtifactError(f"{len(missing)} mapped activations were not computed by the torch {self.component} "
                                f"(e.g. {', '.join(missing[:3])})", fix="re-export the artifacts from this model folder")
        self.calls += 1
        return out

    def result(self):
        return self.accumulator.result()


def open_range_pass(fp32_path: Path, component: str, config, candidates, *, manifest, model_dir=None,
                    device: str = "cpu", threads: int | None = None) -> RangePass:
    """A RangePass over the torch `component` of the model folder the artifacts came from (not yet entered)."""
    from k3trt.export.sources import open_source_dir

    source = open_source_dir(model_folder(manifest, model_dir),
                             variant=manifest.data.get("source", {}).get("variant"))
    return RangePass(fp32_path, source, component, config, candidates, device=device, threads=threads)


def save_ranges(ranges: RangePass, out: Path) -> Path:
    """ONNX Runtime's calibration cache at `out`, written atomically (a killed run leaves no half file)."""
    import shutil

    from onnxruntime.quantization.calibrate import save_tensors_data

    from k3trt.writing.atomic import make_temp_dir

    staging = make_temp_dir(out.parent, f".{out.name}.")  # ONNX Runtime writes by file name, not to a handle
    try:
        save_tensors_data(ranges.result(), staging / out.name)
        (staging / out.name).replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def compute_ranges(fp32_path: Path, trajectories, config, out: Path, candidates, *, manifest, model_dir=None,
                   device: str = "cpu", threads: int | None = None, log=print) -> Path:
    """The torch collector's activation ranges over every calibration U-Net call, replayed from the cached
    trajectories, saved as ONNX Runtime's calibration cache at `out` (reused when present). One call's
    activations at a time, as `quantize`'s. (A fresh run folds them into the trajectory pass instead:
    `stage.collect_all`.)"""
    from tqdm import tqdm

    if out.is_file():
        log(f"reusing cached activation ranges {out.name} ({config.calibrator.value}, same trajectories)")
        return out
    component = trajectories.target.component
    log(f"calibrating activation ranges ({config.calibrator.value}) with the torch {component} on {device} over "
        f"{trajectories.calls} U-Net calls ...")
    with open_range_pass(fp32_path, component, config, candidates, manifest=manifest, model_dir=model_dir,
                         device=device, threads=threads) as ranges:
        for call in tqdm(trajectories.unet_calls(), total=trajectories.calls, desc="calibration (torch)",
                         unit="call", file=sys.stderr):
            ranges.fold(call.feeds)
        save_ranges(ranges, out)
    return out

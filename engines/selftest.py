"""`k3trt selftest [--gpu]`: prove the engine stage works on this machine, in one command.

Without --gpu: the CPU half (export the tiny preset, lint it, plan 1024x1024 engines), which runs anywhere.
With --gpu: the tiny preset's three compared components (text encoder, U-Net, MoVQ decoder) are exported, and
these parts run in turn, each reported as passed, failed or skipped with the reason; none aborts the others:

  torch on CUDA        the torch modules on CUDA vs ONNX Runtime fp32 (CPU)           needs CUDA
  torch CUDA graph     a CUDA-graph replay of the torch U-Net vs eager calls          needs CUDA
  calibration on CUDA  `calibrate --collector torch` at 1024x1024, int8 vs fp32       needs CUDA
  TensorRT <precision> build the 3 engines, TrtBackend vs ONNX Runtime and torch      needs CUDA + TensorRT
  TensorRT CUDA graph  TrtBackend with CUDA graphs vs direct runs (fp16 U-Net)        needs CUDA + TensorRT

Precisions: fp16 unless --precisions says otherwise (3 builds per precision). Exit status: 0 every part ran and
passed, 1 a part failed, 3 nothing failed but a part was skipped (no GPU at all: every part).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from k3trt.contract.cards import card
from k3trt.contract.engine_compat import MIN_COMPUTE_CAPABILITY
from k3trt.contract.manifest import Manifest
from k3trt.contract.precision import Precision
from k3trt.contract.tensor_metrics import compare

from k3trt.engines import selftest_cuda

# Parity bounds of engines vs the fp32 references are on the cards (`ComponentCard.engine`), not verified on a GPU.
GRAPH_TOLERANCE = selftest_cuda.GRAPH_TOLERANCE  # a replay runs the same kernels as a direct enqueue
EXIT_PASSED, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 3
DEFAULT_PRECISIONS = ("fp16",)
SHAPES = {"text_encoder": {"batch": 2, "sequence": 128},
          "unet": {"batch": 2, "height": 8, "width": 8, "context": 77},
          "movq_decoder": {"batch": 1, "height": 8, "width": 8}}
RESOLUTION = "64x64"  # the tiny preset's native size: latent 8x8


@dataclasses.dataclass(frozen=True)
class Row:
    component: str
    precision: str
    reference: str
    output: str
    max_abs: float
    rel_l2: float
    cosine: float
    ok: bool


def format_table(rows: list[Row]) -> str:
    head = f"{'component':13} {'precision':9} {'vs':6} {'output':18} {'max_abs':>10} {'rel_l2':>10} " \
           f"{'cosine':>10}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.component:13} {r.precision:9} {r.reference:6} {r.output:18} {r.max_abs:10.3g} "
                     f"{r.rel_l2:10.3g} {r.cosine:10.6f}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)


def _prepare(work: Path, log) -> tuple:
    from k3trt.export.presets import write_preset
    from k3trt.export.sources import open_model_dir
    from k3trt.export.writer import export_artifacts

    model_dir = work / "tiny-model"
    if not (model_dir / "model_index.json").is_file():
        log("writing the tiny preset ...")
        write_preset("tiny", model_dir)
    source = open_model_dir(model_dir)
    log(f"exporting {', '.join(SHAPES)} to ONNX ...")
    export_artifacts(source, work / "artifacts", components=list(SHAPES), log=lambda m: None)
    return source, Manifest.load(work / "artifacts")


def cpu_selftest(work: Path, log) -> int:
    from k3trt.engines.check import check_artifacts, format_results
    from k3trt.engines.plan import make_plan

    _, manifest = _prepare(work, log)
    results = check_artifacts(manifest.root)
    log(format_results(results, (10, 0)))
    plan = make_plan(manifest, resolutions=["1024x1024"], batch="1-4")
    unet = next(c for c in plan.components if c.component == "unet")
    log(f"plan ok: unet batch {unet.profile.axis('batch')}, latent {unet.profile.axis('height').max}")
    failed = any(r.errors for r in results)
    log("CPU self-test " + ("FAILED" if failed else "passed") + "; run `k3trt selftest --gpu` on a GPU machine")
    return 1 if failed else 0


def _feeds(source, component: str) -> dict:
    from k3trt.export.components import SPECS, model_info

    spec = SPECS[component]
    return spec.make_inputs(SHAPES[component], model_info(source, spec), torch.Generator().manual_seed(1))


def _references(source, manifest, feeds: dict) -> dict:
    """{component: {"ort": outputs, "torch": outputs}} in fp32 on the CPU."""
    from k3trt.export.components import SPECS
    from k3trt.runtime.backends.ort import OrtBackend

    refs = {}
    with OrtBackend(manifest, "fp32") as ort:
        for component, inputs in feeds.items():
            spec = SPECS[component]
            with torch.no_grad():
                module = spec.wrapper(source.load(spec.folder)).eval()
                out = module(*(inputs[n] for n in spec.input_names))
            refs[component] = {"ort": ort.run(component, inputs), "torch": {spec.output_names[0]: out}}
    return refs


def _compare(component, precision, refs, outputs, bounds) -> list[Row]:
    rows = []
    for reference, expected in refs.items():
        for name, ref in expected.items():
            m = compare(ref, outputs[name].float().cpu())
            rows.append(Row(component, precision, reference, name, m.max_abs, m.rel_l2, m.cosine, m.within(**bounds)))
    return rows


def _precisions(requested, manifest, env, log) -> list[str]:
    usable = []
    for name in requested or DEFAULT_PRECISIONS:
        need = MIN_COMPUTE_CAPABILITY.get(Precision.parse(name))
        if need and env.compute_capability < need:
            log(f"skipping TensorRT {name}: needs compute capability {need[0]}.{need[1]}")
        elif name in ("int8", "fp8") and not manifest.has_onnx("unet", name):
            log(f"skipping TensorRT {name}: no {name} U-Net variant (run `k3trt calibrate` on the artifacts)")
        else:
            usable.append(name)
    return usable


class Skipped(Exception):
    """A part that cannot run here; the message says why."""


@dataclasses.dataclass
class Part:
    name: str
    rows: list
    status: str  # passed | failed | skipped
    why: str = ""


def run_part(name: str, work: Callable[[], list], log, *, missing: str | None = None) -> Part:
    """One self-test part; an exception is that part's failure (reported), not the end of the self-test."""
    if missing:
        return Part(name, [], "skipped", missing)
    log(f"-- {name}")
    try:
        rows = work()
    except Skipped as why:
        return Part(name, [], "skipped", str(why))
    except Exception as exc:  # noqa: BLE001 -- reported as this part's failure; the next part still runs
        return Part(name, [], "failed", f"{type(exc).__name__}: {exc}")
    failed = [r for r in rows if not r.ok]
    return Part(name, rows, "failed" if failed or not rows else "passed",
                f"{len(failed)} comparison(s) out of bounds" if failed else "" if rows else "no comparison ran")


def _missing(check) -> str | None:
    from k3trt.contract.errors import BackendUnavailableError

    try:
        check()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def _trt_precision(manifest, precision: str, feeds: dict, refs: dict, log) -> list[Row]:
    from k3trt.engines.build import build_engines
    from k3trt.engines.plan import make_plan
    from k3trt.runtime.backends.trt import TrtBackend

    plan = make_plan(manifest, precision=precision, components=list(SHAPES), resolutions=[RESOLUTION], batch="1",
                     create_variants=True, log=log)
    build_engines(plan, manifest, log=log)
    chosen = {c.component: c.precision.precision.value for c in plan.components}
    rows = []
    with TrtBackend(manifest, chosen) as backend:
        for component, inputs in feeds.items():
            bounds = card(component).engine_tolerance(chosen[component]).bounds()
            rows += _compare(component, chosen[component], refs[component], backend.run(component, inputs), bounds)
    return rows


def tensorrt_parts(manifest, feeds, refs, precisions, log) -> list[Part]:
    from k3trt.runtime.tensorrt_env import current_env, require_cuda, require_tensorrt

    missing = _missing(require_tensorrt) or _missing(require_cuda)
    if missing:
        names = [f"TensorRT {p}" for p in (precisions or DEFAULT_PRECISIONS)] + ["TensorRT CUDA graph"]
        return [Part(name, [], "skipped", missing) for name in names]
    env = current_env()
    log(f"TensorRT {env.trt_version} on {env.gpu_name} (compute capability {env.compute_capability})")
    parts = [run_part(f"TensorRT {p}", lambda p=p: _trt_precision(manifest, p, feeds, refs, log), log)
             for p in _precisions(precisions, manifest, env, log)]
    return parts + [run_part("TensorRT CUDA graph", lambda: _graph_check(manifest, feeds, log), log)]


def gpu_selftest(work: Path, precisions, log) -> int:
    from k3trt.runtime.tensorrt_env import require_cuda

    no_cuda = _missing(require_cuda)
    if no_cuda:
        log(f"selftest --gpu: nothing can run here: {no_cuda}")
        return report(cuda_parts(None, None, None, None, work, log, no_cuda)
                      + tensorrt_parts(None, None, None, precisions, log), log)
    source, manifest = _prepare(work, log)
    feeds = {c: _feeds(source, c) for c in SHAPES}
    refs = _references(source, manifest, feeds)
    return report(cuda_parts(source, manifest, feeds, refs, work, log)
                  + tensorrt_parts(manifest, feeds, refs, precisions, log), log)


def cuda_parts(source, manifest, feeds, refs, work: Path, log, missing: str | None = None) -> list[Part]:
    return [run_part("torch on CUDA", lambda: selftest_cuda.reference_rows(source, feeds, refs, _compare), log,
                     missing=missing),
            run_part("torch CUDA graph", lambda: selftest_cuda.graph_rows(source, feeds, _compare), log,
                     missing=missing),
            run_part("calibration on CUDA",
                     lambda: selftest_cuda.calibration_rows(manifest, source.root, work, log, Row), log,
                     missing=missing)]


def report(parts: list[Part], log) -> int:
    rows = [r for part in parts for r in part.rows]
    if rows:
        log(format_table(rows))
    for part in parts:
        log(f"{part.status:8} {part.name}" + (f": {part.why}" if part.why else ""))
    status = {p.status for p in parts}
    code = EXIT_FAILED if "failed" in status else EXIT_SKIPPED if "skipped" in status else EXIT_PASSED
    log({EXIT_PASSED: "GPU self-test passed", EXIT_FAILED: "GPU self-test FAILED",
         EXIT_SKIPPED: "GPU self-test incomplete: the skipped parts above did not run (exit status 3)"}[code])
    return code


def _graph_check(manifest, feeds, log) -> list[Row]:
    """CUDA-graph replay vs direct enqueue on the fp16 U-Net, with two different inputs of one shape."""
    from k3trt.runtime.backends.trt import TrtBackend

    if "unet-fp16" not in manifest.data.get("engines", {}):
        raise Skipped("no fp16 U-Net engine was built (add fp16 to --precisions)")
    second = {k: (v * 0.5 if v.is_floating_point() and k != "encoder_attention_mask" else v)
              for k, v in feeds["unet"].items()}
    rows = []
    with TrtBackend(manifest, {"unet": "fp16"}) as direct, TrtBackend(manifest, {"unet": "fp16"},
                                                                     cuda_graphs=True) as graphs:
        for label, inputs in (("graph#1", feeds["unet"]), ("graph#2", second)):
            want = direct.run("unet", inputs)
            graphs.run("unet", inputs)  # capture on first use; the second call replays
            got = graphs.run("unet", inputs)
            rows += _compare("unet", "fp16", {label: want}, got, GRAPH_TOLERANCE)
    return rows


def run_selftest(*, gpu: bool = False, precisions=None, keep: str | None = None,
                 log: Callable[[str], None] = print) -> int:
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="k3trt-selftest-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return gpu_selftest(work, precisions, log) if gpu else cpu_selftest(work, log)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

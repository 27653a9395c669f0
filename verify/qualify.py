"""`k3trt qualify`: every reduced precision this machine can run, measured end to end against fp32 on held-out
prompts in one interleaved run, and recorded in the manifest (contract/quality.py) for `--precision auto` and for
the warnings an explicit precision gets.

Candidates: bf16 on OpenVINO where the CPU has native bf16 (AVX-512 BF16 or AMX), int8 where `k3trt calibrate`
wrote the U-Net's Q/DQ variant, on OpenVINO (integer kernels) where installed, else on ONNX Runtime. The fp32
reference is what `--backend auto` runs (the fastest exact backend); with an int8 candidate on ONNX Runtime,
ONNX Runtime fp32 is timed too, so the int8 U-Net is compared with the fp32 one on the same kernels library. Each side is first warmed up on every prompt (one step: sessions, allocations,
and OpenVINO's per-shape compiles, since the U-Net's context length follows the prompt), then the prompts run in
turn, every side per prompt (fp32, bf16, int8, fp32, ...), so a change of machine load hits all sides alike.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

from k3trt.contract.errors import ArtifactError, BackendUnavailableError, NonFiniteError
from k3trt.contract.manifest import Manifest
from k3trt.contract.quality import QUALITY_KEY, is_current, onnx_keys
from k3trt.contract.tensor_metrics import compare, psnr
from k3trt.runtime.backends.auto import choose_backend, openvino_installed
from k3trt.runtime.cpuinfo import cpu_info
from k3trt.verify.bench_stats import utc_now, versions
from k3trt.writing.atomic import save_manifest
from k3trt.writing.locking import artifact_lock

COMPONENTS = ("text_encoder", "unet", "movq_decoder")
MAX_RECORDED_PSNR_DB = 150.0  # identical images are infinite dB; JSON holds finite numbers (fp32 noise is ~100 dB)


@dataclasses.dataclass(frozen=True)
class Side:
    label: str  # "fp32 openvino"
    precision: str
    backend: str


def candidates(manifest: Manifest, asked: Sequence[str] | None = None, *,
               has_openvino: bool | None = None) -> list[Side]:
    """The reduced precisions to measure: those asked (each must run here, else a typed error naming why), or
    every one this machine and install can run."""
    has_openvino = openvino_installed() if has_openvino is None else has_openvino
    why_not = {"bf16": None if cpu_info().bf16 and has_openvino else
               ("OpenVINO is not installed" if not has_openvino else
                f"the CPU has no native bf16 arithmetic ({cpu_info().describe()})"),
               "int8": None if manifest.has_onnx("unet", "int8") else
               f"{manifest.root} has no int8 U-Net (run `k3trt calibrate --artifacts {manifest.root}` first)"}
    backend = {"bf16": "openvino", "int8": "openvino" if has_openvino else "ort"}
    for precision in asked or ():
        if why_not[precision] is not None:
            raise BackendUnavailableError(f"cannot qualify {precision} here: {why_not[precision]}",
                                          accepted=", ".join(p for p, w in why_not.items() if w is None) or "none",
                                          fix="leave --precision out to measure what this machine can run")
    chosen = [p for p in (asked or why_not) if why_not[p] is None]
    if not chosen:
        raise BackendUnavailableError("no reduced precision can run here: " +
                                      "; ".join(f"{p}: {w}" for p, w in why_not.items()),
                                      fix="install OpenVINO on a CPU with AVX-512 BF16/AMX, or `k3trt calibrate`")
    return [Side(f"{p} {backend[p]}", p, backend[p]) for p in chosen]


def sides_for(reduced: list[Side], *, has_openvino: bool | None = None) -> list[Side]:
    """fp32 on the backend auto picks first (the reference), ONNX Runtime fp32 too when int8 is measured."""
    reference = choose_backend("fp32", has_openvino=has_openvino).backend
    sides = [Side(f"fp32 {reference}", "fp32", reference)]
    if any(s.backend == "ort" for s in reduced) and reference != "ort":
        sides.append(Side("fp32 ort", "fp32", "ort"))
    return sides + reduced


def measure(open_side: Callable[[Side], object], sides: list[Side], prompts: Sequence[str], request: dict,
            log: Callable[[str], None]) -> dict[str, dict]:
    """label -> {"images": [one per prompt], "total_s": [...], "unet_s": [...]}, interleaved per prompt."""
    pipes = {s.label: open_side(s) for s in sides}
    runs = {s.label: {"images": [], "total_s": [], "unet_s": [], "non_finite": None} for s in sides}
    warm = {**request, "steps": 1}  # every prompt's shapes (its context length) compiled before any timing:
    for label, pipe in pipes.items():  # OpenVINO compiles per input shape, the U-Net's context varies by prompt
        log(f"warming up {label} ...")
        for index, prompt in enumerate(prompts):
            _generate(pipe, runs[label], prompt, warm, index, timed=False, reference=label == sides[0].label)
    for index, prompt in enumerate(prompts):
        for label, pipe in pipes.items():
            _generate(pipe, runs[label], prompt, request, index, reference=label == sides[0].label)
        log(f"prompt {index + 1}/{len(prompts)} done")
    for pipe in pipes.values():
        pipe.close()
    return runs


def _generate(pipe, run: dict, prompt: str, request: dict, seed: int, *, timed: bool = True,
              reference: bool = False) -> None:
    """One generation into `run`; a reduced precision's NaN/Inf is its result (recorded, the side stops), the
    fp32 reference's is an error."""
    if run["non_finite"]:
        return
    pipe.backend.timings.clear()
    start = time.perf_counter()
    try:
        images = pipe.generate(prompt, **request, seed=seed, output_type="np")
    except NonFiniteError as exc:
        if reference:
            raise
        if timed:  # a warm-up step is not the measured request: only the timed runs decide
            run["non_finite"] = str(exc)
        return
    if timed:
        run["total_s"].append(time.perf_counter() - start)
        run["unet_s"] += list(pipe.backend.timings["unet"])
        run["images"].append(images)


def records(manifest: Manifest, sides: list[Side], runs: dict, *, threads: int, request: dict,
            prompts: int, load: dict | None = None) -> dict[str, dict]:
    """precision -> its quality record (contract/quality.py), against the first side (fp32, auto's backend)."""
    reference = sides[0]
    ref = runs[reference.label]
    ms = {label: statistics.median(run["total_s"]) * 1e3 for label, run in runs.items() if run["total_s"]}
    unet_ms = {label: statistics.median(run["unet_s"]) * 1e3 for label, run in runs.items() if run["unet_s"]}
    out = {}
    for side in sides[1:]:
        if side.precision == "fp32":
            continue
        run = runs[side.label]
        common = {"backend": side.backend, "reference_backend": reference.backend, "machine": cpu_info().describe(),
                  "threads": threads, "load_average": dict(load or {}), "date": utc_now(), "prompts": prompts,
                  "steps": request["steps"], "guidance": request["guidance"],
                  "resolution": f"{request['width']}x{request['height']}", "versions": versions(),
                  "onnx_keys": {**onnx_keys(manifest.data, dict.fromkeys(COMPONENTS, "fp32")),
                                **onnx_keys(manifest.data, {"unet": _variant(side.precision)})}}
        if run["non_finite"]:  # the worst quality there is: never auto, always warned about
            out[side.precision] = {"psnr_db": 0.0, "cosine": -1.0, "non_finite": run["non_finite"], **common}
            continue
        db = [min(float(psnr(r, c)), MAX_RECORDED_PSNR_DB) for r, c in zip(ref["images"], run["images"])]
        cosine = [compare(r, c).cosine for r, c in zip(ref["images"], run["images"])]
        same = next(s.label for s in sides if s.precision == "fp32" and s.backend == side.backend)
        out[side.precision] = {
            "psnr_db": min(db), "psnr_db_mean": statistics.fmean(db), "cosine": min(cosine),
            "total_ms": ms[side.label], "fp32_total_ms": ms[reference.label],
            "speedup": ms[reference.label] / ms[side.label],
            "unet_step_ms": unet_ms[side.label], "fp32_unet_step_ms_same_backend": unet_ms[same],
            "unet_speedup_same_backend": unet_ms[same] / unet_ms[side.label], **common,
        }
    return out


def _variant(precision: str) -> str:
    return "fp32" if precision == "bf16" else precision  # OpenVINO computes bf16 from the fp32 graph


def save_records(root, measured: dict[str, dict], log: Callable[[str], None]) -> Manifest:
    """Under the artifact lock: the manifest re-read, its ONNX unchanged since the measurement (else a typed
    error, nothing written), the quality section updated, the manifest replaced atomically."""
    with artifact_lock(root, log):
        manifest = Manifest.load(root)
        for precision, record in measured.items():
            if not is_current(record, manifest.data):
                raise ArtifactError(f"the ONNX files {precision} was measured on changed during `k3trt qualify`",
                                    fix="re-run `k3trt qualify` once the other command has finished")
        manifest.data[QUALITY_KEY] = {**manifest.data.get(QUALITY_KEY, {}), **measured}
        save_manifest(manifest)
    return manifest

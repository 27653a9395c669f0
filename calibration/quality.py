"""Quality of a Q/DQ model against fp32, on held-out prompts only, with fake-quant semantics.

Per timestep: the int8 U-Net is fed the fp32 trajectory's own inputs (teacher forcing), so each number is
that step's quantization error alone. End to end: the int8 pipeline runs free with the fp32 run's seed and
the images are compared by PSNR. Sessions set `session.disable_quant_qdq`: on AVX2 CPUs without VNNI the fused
int8 kernels saturate, so the graph's own Q/DQ (fake-quant) semantics are what a correct int8 engine computes.
"""
from __future__ import annotations

import copy
import dataclasses
import sys

import numpy as np
from k3trt.calibration.collect import TrajectorySet
from k3trt.contract.manifest import Manifest, OnnxRecord
from k3trt.contract.tensor_metrics import compare, psnr


def fake_quant_session(model, threads: int | None = None, *, optimize: bool = True):
    """An ONNX Runtime CPU session (path or serialized bytes) that keeps Q/DQ as float fake-quant ops."""
    from k3trt.runtime.backends.ort import cpu_session

    return cpu_session(model, threads=threads, optimize=optimize, disable_quant_qdq=True, arena=False)


def guided(noise: np.ndarray, guidance: float | None) -> np.ndarray:
    """The runtime's classifier-free guidance on a [uncond, cond] batch: (g + 1) * cond - g * uncond; `None`:
    an unguided U-Net (Flash), whose output is the noise the sampler uses."""
    if guidance is None:
        return noise
    uncond, cond = np.split(noise, 2)
    return (guidance + 1.0) * cond - guidance * uncond


@dataclasses.dataclass(frozen=True)
class TimestepOutputs:
    """fp32 and candidate U-Net outputs on the held-out calls, grouped by timestep (descending)."""
    timesteps: tuple[int, ...]
    reference: dict  # timestep -> list of fp32 outputs (one per prompt)
    candidate: dict  # timestep -> list of candidate outputs


def run_calls(session, calls, label: str = "int8 U-Net", progress: bool = True) -> TimestepOutputs:
    from tqdm import tqdm

    reference, candidate = {}, {}
    for call in tqdm(list(calls), desc=label, unit="call", file=sys.stderr, leave=False, disable=not progress):
        reference.setdefault(call.timestep, []).append(call.noise_pred)
        candidate.setdefault(call.timestep, []).append(session.run([call.output], call.feeds)[0])
    return TimestepOutputs(tuple(sorted(reference, reverse=True)), reference, candidate)


def per_timestep(outputs: TimestepOutputs, guidance: float | None) -> list[dict]:
    """Cosine / relative L2 per timestep, pooled over prompts (and the worst single prompt), for the raw U-Net
    output (both guidance halves) and for the guided noise the scheduler actually uses."""
    rows = []
    for t in outputs.timesteps:
        ref, cand = outputs.reference[t], outputs.candidate[t]
        pooled = compare(np.stack(ref), np.stack(cand))
        singles = [compare(r, c).cosine for r, c in zip(ref, cand)]
        g = compare(np.stack([guided(r, guidance) for r in ref]), np.stack([guided(c, guidance) for c in cand]))
        rows.append({"timestep": t, "cosine": pooled.cosine, "rel_l2": pooled.rel_l2, "max_abs": pooled.max_abs,
                     "finite": pooled.finite, "min_prompt_cosine": min(singles), "guided_cosine": g.cosine,
                     "guided_rel_l2": g.rel_l2})
    return rows


def summarize(rows: list[dict]) -> dict:
    worst = min(rows, key=lambda r: r["cosine"])
    return {"mean_cosine": float(np.mean([r["cosine"] for r in rows])), "worst_cosine": worst["cosine"],
            "worst_timestep": worst["timestep"], "mean_rel_l2": float(np.mean([r["rel_l2"] for r in rows])),
            "worst_rel_l2": max(r["rel_l2"] for r in rows),
            "mean_guided_cosine": float(np.mean([r["guided_cosine"] for r in rows])),
            "worst_guided_cosine": min(r["guided_cosine"] for r in rows),
            "finite": all(r["finite"] for r in rows)}


def unet_quality(model_path, heldout: TrajectorySet, *, threads: int | None = None) -> tuple[dict, list[dict]]:
    """(summary, per-timestep rows) of the Q/DQ U-Net at `model_path` on every held-out call."""
    session = fake_quant_session(model_path, threads)
    rows = per_timestep(run_calls(session, heldout.unet_calls()), heldout.config.guidance if heldout.guided else None)
    return summarize(rows), rows


def int8_manifest(manifest: Manifest, record: OnnxRecord) -> Manifest:
    """An in-memory manifest that already lists `record`: the pipeline can run it before anything commits."""
    view = Manifest(manifest.root, copy.deepcopy(manifest.data))
    view.put_onnx(record)
    return view


def end_to_end(manifest: Manifest, record: OnnxRecord, heldout: TrajectorySet, count: int, *,
               threads: int | None = None, fused: bool = False) -> tuple[list[dict], np.ndarray]:
    """Free-running task (the trajectories' own: text to image, inpainting on the same image and mask, Flash)
    with only the calibrated U-Net in int8, on the first `count` held-out prompts with their fp32 seeds: PSNR
    against the cached fp32 images. `fused=True` uses ONNX Runtime's int8 kernels instead of fake-quant."""
    from k3trt.runtime.backends.registry import make_backend
    from k3trt.runtime.pipeline import Pipeline
    from tqdm import tqdm

    view = int8_manifest(manifest, record)
    backend = make_backend("ort", view, {record.component: record.variant}, threads=threads,
                           disable_quant_qdq=not fused, arena=False)
    pipe, cfg = Pipeline(view, backend), heldout.config
    rows, images = [], []
    label = "end to end (int8 kernels)" if fused else "end to end (fake-quant)"
    for item in tqdm(heldout.files[:count], desc=label, unit="prompt", file=sys.stderr, leave=False):
        image = heldout.target.run(pipe, item.prompt, item.seed, cfg, item.task_inputs())
        reference = item.load()["image"]
        rows.append({"prompt": item.prompt, "seed": item.seed, "psnr_db": psnr(reference, image),
                     "finite": bool(np.isfinite(image).all())})
        images.append(image)
    pipe.close()
    return rows, np.concatenate(images)
